"""The corpora the suite knows, their files, and where to find them. Free of heavy imports: the command line
lists the corpora and fails on a missing one before it loads torch (bench.data and bench.tagging read them).

The data folder is --data-dir, else $BENCH_DATA_DIR, else `shared/data` beside the checkout when there is
one (where the tests look too), else a per-user cache folder. A corpus missing there is read from the
Hugging Face Hub -- unless HF_HUB_OFFLINE is set, or the Hub does not answer within HUB_TIMEOUT seconds.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class FileCorpus:
    """A corpus read from text files under the data directory, with a Hub dataset as online fallback."""

    files: dict[str, str]  # split -> path relative to the data directory
    hub_name: str
    hub_config: str | None = None
    hub_column: str = "text"
    streamed: bool = False  # read line by line into id arrays (bench.data.read_streamed): too big for token lists


FILE_CORPORA = {
    "ptb": FileCorpus(
        files={s: f"ptb/ptb.{s}.txt" for s in SPLITS},
        hub_name="ptb_text_only", hub_config=None, hub_column="sentence",
    ),
    "wikitext-2": FileCorpus(
        files={s: f"wikitext-2/{s}.txt" for s in SPLITS},
        hub_name="Salesforce/wikitext", hub_config="wikitext-2-v1", hub_column="text",
    ),
    "wikitext-103": FileCorpus(
        files={s: f"wikitext-103/{s}.txt" for s in SPLITS},
        hub_name="Salesforce/wikitext", hub_config="wikitext-103-v1", hub_column="text", streamed=True,
    ),
}
CORPORA = ("synthetic", *FILE_CORPORA)
TAGGING_CORPORA = ("synthetic", "conll2000")
CONLL2000 = FileCorpus(files={s: f"conll2000/{s}.txt" for s in ("train", "test")}, hub_name="eriktks/conll2000")
HUB_HOST, HUB_TIMEOUT = "huggingface.co", 2.0


def default_data_dir() -> Path:
    """`shared/data` beside the checkout (an editable install; the tests read it too), else a per-user cache."""
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "data"
    if beside_checkout.is_dir():
        return beside_checkout
    import platformdirs

    return Path(platformdirs.user_cache_dir("bench")) / "data"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """--data-dir, else $BENCH_DATA_DIR, else default_data_dir()."""
    return Path(data_dir or os.environ.get("BENCH_DATA_DIR") or default_data_dir())


def hub_unreachable() -> str | None:
    """Why the Hub cannot be tried, or None. A connection in a thread bounds the DNS lookup too, which
    socket timeouts do not (with no network, `datasets` spent 30-45 s in retries before failing)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    answered = []

    def connect():
        try:
            socket.create_connection((HUB_HOST, 443), timeout=HUB_TIMEOUT).close()
            answered.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_TIMEOUT)
    return None if answered else f"{HUB_HOST} did not answer within {HUB_TIMEOUT:g} s"


def locate(name: str, corpus: FileCorpus, data_dir: str | Path | None = None) -> dict[str, Path] | None:
    """The corpus's local files per split, or None when they are missing and the Hub is to be tried; a user
    error naming the missing files and the folder when the Hub cannot be tried either."""
    root = resolve_data_dir(data_dir)
    paths = {split: root / relative for split, relative in corpus.files.items()}
    missing = [corpus.files[split] for split, path in paths.items() if not path.is_file()]
    if not missing:
        return paths
    reason = hub_unreachable()
    if reason:
        raise BenchError(f"corpus {name!r} not found: {', '.join(missing)} missing under {root} (--data-dir or "
                         f"$BENCH_DATA_DIR), and the Hugging Face Hub ({corpus.hub_name}) not tried: {reason}")
    return None


def require(name: str, data_dir: str | Path | None = None) -> None:
    """Fail at once, before torch is loaded, when corpus `name` has neither its files nor the Hub to read."""
    corpus = FILE_CORPORA.get(name) or (CONLL2000 if name == "conll2000" else None)
    if corpus is not None:
        locate(name, corpus, data_dir)
