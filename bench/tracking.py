"""W&B, the way every `bench` command uses it: which mode, and the settings of every run.

Online needs a login and a server that answers: W&B itself would retry an unreachable server for its whole
init timeout (60 s) on every run, so a host that cannot be reached picks offline at once, for the whole
command. No run records system metrics (the record has its own figures): W&B's monitor process would
outlive a killed command.
"""

from __future__ import annotations

import functools
import netrc
import os
import socket
from urllib.parse import urlsplit

REACH_SECONDS = 3.0


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def wandb_logged_in() -> bool:
    """Whether W&B credentials are configured ($WANDB_API_KEY or a netrc entry for the W&B host), read
    without network: wandb has no public offline check (wandb.login prompts on a terminal without a key)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(urlsplit(base_url()).hostname) is not None
    except (OSError, netrc.NetrcParseError):
        return False


@functools.cache
def wandb_reachable(url: str) -> bool:
    """Whether the W&B server at `url` accepts a connection within REACH_SECONDS (once per process)."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=REACH_SECONDS).close()
    except (OSError, ValueError):
        return False
    return True


def wandb_mode(use_wandb: bool = True) -> str:
    """disabled with --no-wandb; else $WANDB_MODE when set; else online when logged in and the server answers,
    offline otherwise."""
    if not use_wandb:
        return "disabled"
    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() and wandb_reachable(base_url())
                                            else "offline")
    return "offline" if mode == "dryrun" else mode


def wandb_settings():
    """The settings of every run: quiet, a bounded wait for the server, no system-metrics process."""
    import wandb

    return wandb.Settings(silent=True, init_timeout=60, x_disable_stats=True)
