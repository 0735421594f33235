"""Sweeps across machines: whether a storage is shared with other hosts and a folder is on this one.

The rule is deliberately simple. A path is on a network file system when the mount holding it (the longest
mount point of /proc/mounts above it) has one of NETWORK_FILESYSTEMS' types; without /proc/mounts (not Linux)
every path counts as local. A storage is shared across hosts when it is an RDB server (any URL that is not
SQLite or a journal file), or its file is on a network file system.

Storage files are for one machine. SQLite locks with fcntl(), which is broken on many NFS implementations
(the SQLite FAQ). Optuna's journal lock is made for NFS (an atomic symlink), but the journal has no heartbeat:
bench recovers a trial whose worker died by looking for its process, on its host only, so a trial whose
worker died on another machine stays RUNNING until a command starts there. Several machines share one
PostgreSQL (or MySQL) storage, whose heartbeat recovers any worker's trial.
"""

from __future__ import annotations

import re
from pathlib import Path

from bench.store import DEFAULT_STORAGE, storage_file

MOUNTS = Path("/proc/mounts")
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "lustre", "gpfs", "fuse.sshfs",
                                 "beegfs"})


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding `path` (which need not exist yet); None where /proc/mounts is not."""
    try:
        table = MOUNTS.read_text()
    except OSError:
        return None
    path, found, kind = Path(path).resolve(), None, None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # the kernel writes a space in a mount point as \040 (tab \011, newline \012, backslash \134)
        point = Path(re.sub(r"\\([0-7]{3})", lambda code: chr(int(code.group(1), 8)), fields[1]))
        if path.is_relative_to(point) and (found is None or len(point.parts) >= len(found.parts)):
            found, kind = point, fields[2]  # a later mount on the same point hides the earlier one
    return kind


def on_network_filesystem(path: Path) -> bool:
    return filesystem_type(path) in NETWORK_FILESYSTEMS


def sharing_warnings(storage_url: str | None, run_root: Path | None) -> list[str]:
    """One line per risk of running the sweep on several hosts: a storage file on a network file system (see
    above), and a storage shared across hosts with a run folder on this machine (a trial requeued on another
    host would not find its checkpoints)."""
    url, file, warnings = storage_url or DEFAULT_STORAGE, storage_file(storage_url), []
    networked = file is not None and on_network_filesystem(file)
    if networked:
        risk = ("it has no heartbeat, so a trial whose worker dies on another host stays running until a command "
                "starts there" if url.startswith("journal:") else "SQLite's locks are unreliable there")
        warnings.append(f"{file} is on a {filesystem_type(file)} file system and {risk}: give several "
                        "machines one PostgreSQL storage")
    shared = networked or not url.startswith(("sqlite:", "journal:"))
    if shared and run_root is not None and not on_network_filesystem(run_root):
        warnings.append(f"the storage is shared across hosts but the run folder {run_root} is on a local file "
                        "system: a trial requeued on another host will not find its checkpoints (give --run-dir a "
                        "shared folder)")
    return warnings
