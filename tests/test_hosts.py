"""Sweeps across hosts and devices: shared storages and run folders (bench.hosts), one GPU per worker."""

import functools
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

import bench.hosts
from bench.cli import main
from bench.hosts import filesystem_type, sharing_warnings
from bench.sweep_spec import load_spec
from bench.sweeps import run_sweep, take_device, visible_gpus, worker_devices

TINY = """
model: rnn-bptt
corpus: synthetic
fixed: {hidden_size: 8, batch_size: 64, bptt: 10, eval_batch_size: 64}
budget: {epochs: 1, minutes: 0.01}
study: hosts
trials: 1
search:
  lr: {type: log-float, low: 0.5, high: 5}
"""


@pytest.fixture
def mounts(tmp_path, monkeypatch) -> Path:
    """A mounts table: / local, tmp_path/shared on NFS, tmp_path/shared/scratch local again, and a share whose
    mount point has a space (written \\040, as the kernel does)."""
    table = tmp_path / "mounts"
    table.write_text(f"/dev/sda1 / ext4 rw,relatime 0 0\n"
                     f"tmpfs {tmp_path} tmpfs rw 0 0\n"
                     f"server:/export {tmp_path}/shared nfs4 rw,vers=4.2 0 0\n"
                     f"/dev/sdb1 {tmp_path}/shared/scratch xfs rw 0 0\n"
                     f"//nas/team {tmp_path}/team\\040drive cifs rw 0 0\n")
    monkeypatch.setattr(bench.hosts, "MOUNTS", table)
    return tmp_path


def test_a_path_is_on_the_file_system_of_the_longest_mount_point_above_it(mounts):
    assert filesystem_type(mounts / "shared" / "runs" / "not-yet") == "nfs4"
    assert filesystem_type(mounts / "shared" / "scratch" / "runs") == "xfs"
    assert filesystem_type(mounts / "sharedness") == "tmpfs"  # a prefix of the name is not a parent folder
    assert filesystem_type(mounts / "team drive" / "r.journal") == "cifs"
    assert filesystem_type(Path("/etc")) == "ext4"


def test_without_a_mounts_table_every_path_is_local(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.hosts, "MOUNTS", tmp_path / "absent")
    assert filesystem_type(tmp_path) is None
    assert sharing_warnings(f"journal:{tmp_path}/r.journal", tmp_path / "runs") == []


def test_a_shared_storage_with_a_local_run_folder_warns(mounts):
    server = "postgresql+psycopg://bench@db-host/bench"
    [local] = sharing_warnings(server, mounts / "runs")
    assert local.startswith(f"the storage is shared across hosts but the run folder {mounts / 'runs'} is on a local "
                            "file system")
    assert sharing_warnings(server, mounts / "shared" / "runs") == []
    assert sharing_warnings(f"sqlite:///{mounts}/r.db", mounts / "runs") == []  # one machine's: nothing to say
    assert sharing_warnings(f"journal:{mounts}/r.journal", mounts / "runs") == []
    assert sharing_warnings("sqlite:///:memory:", mounts / "runs") == []


def test_a_storage_file_on_a_network_file_system_warns_for_itself_and_a_local_run_folder(mounts):
    journal, database = mounts / "shared" / "r.journal", mounts / "team drive" / "r.db"
    file, folder = sharing_warnings(f"journal:{journal}", mounts / "runs")
    assert file == (f"{journal} is on a nfs4 file system and it has no heartbeat, so a trial whose worker dies on "
                    "another host stays running until a command starts there: give several machines one PostgreSQL "
                    "storage")
    assert folder.startswith("the storage is shared across hosts")
    [file] = sharing_warnings(f"sqlite:///{database}", mounts / "shared" / "runs")
    assert file.startswith(f"{database} is on a cifs file system and SQLite's locks are unreliable there")


def test_a_sweep_warns_on_stderr_and_still_runs(mounts, capsys):
    (mounts / "spec.yaml").write_text(TINY)
    (mounts / "shared").mkdir()
    storage = f"journal:{mounts}/shared/r.journal"
    assert main(["sweep", str(mounts / "spec.yaml"), "--storage", storage, "--no-progress", "--no-wandb",
                 "--run-dir", str(mounts / "runs")]) == 0
    output = capsys.readouterr()
    warnings = [line for line in output.err.splitlines() if line.startswith("bench: warning:")]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"bench: warning: {mounts}/shared/r.journal is on a nfs4 file system and")
    assert warnings[1].startswith(f"bench: warning: the storage is shared across hosts but the run folder "
                                  f"{mounts / 'runs'} is on a local file system")
    assert "trial 0 COMPLETE" in output.out


# ------------------------------------------------------------------------------------------- one GPU per worker


def test_worker_i_gets_gpu_i_and_workers_beyond_the_gpus_share_them_round_robin():
    assert worker_devices(2, ["0", "1"]) == ["0", "1"]
    assert worker_devices(5, ["0", "1"]) == ["0", "1", "0", "1", "0"]
    assert worker_devices(1, ["0", "1", "2"]) == ["0"]
    assert worker_devices(3, []) == [None, None, None]


@pytest.mark.parametrize("listed, count, visible", [
    (None, 3, ["0", "1", "2"]),
    (None, 0, []),
    ("4,6", None, ["4", "6"]),  # the user's choice of GPUs, shared out among the workers
    ("MIG-8a1f,MIG-77c0", None, ["MIG-8a1f", "MIG-77c0"]),
    ("", None, []),
])
def test_the_visible_gpus_are_named_as_cuda_visible_devices_names_them(monkeypatch, listed, count, visible):
    if listed is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)

    def device_count():
        assert count is not None, "counted although CUDA_VISIBLE_DEVICES names the GPUs"
        return count

    monkeypatch.setattr(torch.cuda, "device_count", device_count)
    assert visible_gpus() == visible


def test_each_worker_process_sees_only_the_device_it_takes(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    devices = multiprocessing.get_context("fork").SimpleQueue()
    for device in [*worker_devices(2, ["3", "5"]), None]:
        devices.put(device)
    take_device(devices)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    take_device(devices)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    take_device(devices)  # no GPU: nothing set
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def note_device(folder: Path) -> None:
    """A sweep's worker_init (run first in each worker process): write down the GPU the process sees."""
    (folder / str(os.getpid())).write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))


def test_a_sweep_of_two_workers_on_two_gpus_gives_each_its_own(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the forked workers inherit it; CUDA stays unused
    (tmp_path / "spec.yaml").write_text(TINY.replace("trials: 1", "trials: 2"))
    (tmp_path / "seen").mkdir()
    run_sweep(load_spec(tmp_path / "spec.yaml"), storage_url=f"journal:{tmp_path}/r.journal", n_jobs=2,
              use_wandb=False, progress=False, worker_init=functools.partial(note_device, tmp_path / "seen"))
    assert sorted(path.read_text() for path in (tmp_path / "seen").iterdir()) == ["0", "1"]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the command's own process is left as it was
