"""Corpora, vocabularies and language-model batches.

Every corpus goes through Hugging Face `datasets` (`load_dataset("text", ...)` over local files, cached as
Arrow; a Hub name as the online fallback) and ends as three contiguous arrays of token ids.

Tokens follow the PTB convention: whitespace-split words and an end-of-sentence token `<eos>` at each line
end. The vocabulary comes from the training split only, ids sorted by descending training frequency (the
frequency-based output layers rely on that); out-of-vocabulary words map to `<unk>` when the corpus has one.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import platformdirs
import torch
from torch.utils.data import DataLoader, Dataset

from bench.corpora import CORPORA, FILE_CORPORA, SPLITS, FileCorpus, locate
from bench.errors import BenchError
from bench.inputs import check_text_file

EOS = "<eos>"
UNK = "<unk>"
SYNTHETIC_VERSION = 1  # bump when the generator changes, so cached corpora are regenerated

HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


@dataclass(frozen=True)
class Vocabulary:
    words: list[str]  # id -> word, by descending training count (ties: first occurrence)
    counts: np.ndarray  # training count of each id

    def __len__(self) -> int:
        return len(self.words)

    @property
    def eos(self) -> int:
        return self.words.index(EOS)

    @property
    def unk(self) -> int | None:
        return self.words.index(UNK) if UNK in self.words else None


@dataclass(frozen=True)
class Corpus:
    name: str
    vocab: Vocabulary
    splits: dict[str, np.ndarray]  # split -> int64 token ids, `<eos>` after every line
    oracle_log_probs: dict[str, np.ndarray] | None = None  # synthetic only: the generator's log p per token

    def unigram_perplexity(self, split: str = "test") -> float:
        """Perplexity of `split` under the add-one unigram estimated on train: the ceiling any model must beat."""
        p = (self.vocab.counts + 1.0) / (self.vocab.counts.sum() + len(self.vocab))
        return float(np.exp(-np.log(p[self.splits[split]]).mean()))

    def oracle_perplexity(self, split: str = "test") -> float | None:
        """exp(mean -log p) under the generating process: the floor no model can beat (synthetic only)."""
        if self.oracle_log_probs is None:
            return None
        return float(np.exp(-self.oracle_log_probs[split].mean()))


def tokenize(lines: list[str]) -> list[str]:
    return [word for line in lines for word in (*line.split(), EOS)]


def build_vocabulary(train_tokens: list[str], known_words: list[str] | None = None) -> Vocabulary:
    """Vocabulary of the training tokens (plus `known_words` never seen in train, with count 0)."""
    words, first, counts = np.unique(np.array(train_tokens, dtype=object), return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    vocab_words, vocab_counts = list(words[order]), counts[order]
    if known_words:
        unseen = [w for w in known_words if w not in set(vocab_words)]
        vocab_words += unseen
        vocab_counts = np.concatenate([vocab_counts, np.zeros(len(unseen), dtype=np.int64)])
    return Vocabulary(words=vocab_words, counts=vocab_counts.astype(np.int64))


def encode(tokens: list[str], vocab: Vocabulary, where: str) -> np.ndarray:
    """Token ids; OOV words become `<unk>`, or a user error naming the word when the corpus has none."""
    ids = pd.Index(vocab.words).get_indexer(tokens)
    missing = ids < 0
    if missing.any():
        if vocab.unk is None:
            word = tokens[int(np.argmax(missing))]
            raise BenchError(f"{where}: word {word!r} is not in the training vocabulary and the corpus has no {UNK}")
        ids[missing] = vocab.unk
    return ids.astype(np.int64)


def _read_local(paths: dict[str, Path]) -> dict[str, list[str]]:
    from datasets import load_dataset

    for split, path in paths.items():
        if not os.access(path, os.R_OK):
            raise BenchError(f"{path}: the {split} file cannot be read")
        check_text_file(path, split)
    dataset = load_dataset("text", data_files={s: str(p) for s, p in paths.items()})
    return {split: dataset[split]["text"] for split in paths}


def _read_hub(name: str, spec: FileCorpus) -> dict[str, list[str]]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(spec.hub_name, spec.hub_config)
    except Exception as error:  # whatever the Hub answered (no such dataset, a dropped connection)
        raise BenchError(f"corpus {name!r}: reading {spec.hub_name} from the Hugging Face Hub failed "
                         f"({type(error).__name__}); put {', '.join(spec.files.values())} under the data folder "
                         "instead") from None
    return {split: dataset[HUB_SPLITS[split]][spec.hub_column] for split in SPLITS}


def _read_file_corpus(name: str, data_dir: str | Path | None) -> dict[str, list[str]]:
    spec = FILE_CORPORA[name]
    paths = locate(name, spec, data_dir)
    return _read_hub(name, spec) if paths is None else _read_local(paths)


# A streamed corpus (WikiText-103: 103M training tokens) is never held as lists of lines or of tokens -- a
# Python string a token would take several GB. Its files are read line by line twice: once to count the
# training words, once to write every split's ids into an int32 array (4 bytes a token; batches are made
# int64 a chunk at a time, StreamChunks). Memory: the vocabulary and the ids.


def _local_lines(path: Path) -> Iterator[str]:
    """The lines of `path`, ended by \n only, as `datasets` reads them; not UTF-8 is a user error naming the
    line (check_text_file would read the file whole)."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise BenchError(f"{path}, line {number}: not UTF-8 text (byte {line[error.start]:#04x}); save the "
                                 "file as UTF-8") from None


def _hub_lines(name: str, spec: FileCorpus, split: str) -> Iterator[str]:
    from datasets import load_dataset

    try:
        rows = load_dataset(spec.hub_name, spec.hub_config, split=HUB_SPLITS[split], streaming=True)
    except Exception as error:  # whatever the Hub answered (no such dataset, a dropped connection)
        raise BenchError(f"corpus {name!r}: reading {spec.hub_name} from the Hugging Face Hub failed "
                         f"({type(error).__name__}); put {', '.join(spec.files.values())} under the data folder "
                         "instead") from None
    return (row[spec.hub_column] for row in rows)


def streamed_vocabulary(lines: Iterable[str]) -> Vocabulary:
    """build_vocabulary of the training lines, counted a line at a time: ids by descending count, ties in
    order of first occurrence (a Counter keeps it, and the sort is stable)."""
    counts = Counter()
    for line in lines:
        counts.update(line.split())
        counts[EOS] += 1
    words = sorted(counts, key=counts.__getitem__, reverse=True)  # reverse keeps ties' order in Python's sort
    return Vocabulary(words=words, counts=np.array([counts[w] for w in words], dtype=np.int64))


def streamed_ids(lines: Iterable[str], vocab: Vocabulary, where: str) -> np.ndarray:
    """encode(tokenize(lines)) a line at a time, into an array of 4 bytes a token (int32)."""
    index, unk, ids = {word: i for i, word in enumerate(vocab.words)}, vocab.unk, array("i")
    for line in lines:
        for word in line.split():
            i = index.get(word, unk)
            if i is None:
                raise BenchError(f"{where}: word {word!r} is not in the training vocabulary and the corpus has "
                                 f"no {UNK}")
            ids.append(i)
        ids.append(vocab.eos)
    return np.frombuffer(ids, dtype=np.int32)


def read_streamed(name: str, data_dir: str | Path | None) -> tuple[Vocabulary, dict[str, np.ndarray]]:
    """The vocabulary and split ids of the streamed corpus `name`, from its files or the Hub's stream."""
    spec = FILE_CORPORA[name]
    paths = locate(name, spec, data_dir)
    for split, path in (paths or {}).items():
        if not os.access(path, os.R_OK) or path.stat().st_size == 0:
            raise BenchError(f"{path}: the {split} file cannot be read or is empty")

    def lines(split: str) -> Iterator[str]:
        return _hub_lines(name, spec, split) if paths is None else _local_lines(paths[split])

    vocab = streamed_vocabulary(lines("train"))
    if not any(w != EOS for w in vocab.words):
        raise BenchError(f"corpus {name!r}: the training split has no words")
    return vocab, {split: streamed_ids(lines(split), vocab, f"{name} {split}") for split in SPLITS}


def synthetic_lines(seed: int) -> tuple[dict[str, list[str]], dict[str, np.ndarray], list[str]]:
    """The synthetic corpus of `seed` (generated once, cached per user): lines per split, the oracle's log p
    per token per split, and the language's whole vocabulary."""
    from datasets import load_dataset

    from bench.synthetic import SyntheticLanguage, write_corpus

    directory = Path(platformdirs.user_cache_dir("bench")) / f"synthetic-v{SYNTHETIC_VERSION}-seed{seed}"
    if not (directory / "test.logprob.npy").exists():
        directory.mkdir(parents=True, exist_ok=True)
        write_corpus(directory, seed=seed)
    dataset = load_dataset("text", data_files={s: str(directory / f"{s}.txt") for s in SPLITS})
    oracle = {s: np.load(directory / f"{s}.logprob.npy") for s in SPLITS}
    return {s: dataset[s]["text"] for s in SPLITS}, oracle, SyntheticLanguage(seed).vocabulary


def load_corpus(name: str, data_dir: str | Path | None = None, seed: int = 0) -> Corpus:
    """The corpus `name` as token-id arrays. `seed` only matters for `synthetic`."""
    if name not in CORPORA:
        raise BenchError(f"unknown corpus {name!r}: choose one of {', '.join(CORPORA)}")
    if name in FILE_CORPORA and FILE_CORPORA[name].streamed:
        vocab, splits = read_streamed(name, data_dir)
        return Corpus(name=name, vocab=vocab, splits=splits)
    oracle, known_words = None, None
    if name == "synthetic":
        lines, oracle, known_words = synthetic_lines(seed)
    else:
        lines = _read_file_corpus(name, data_dir)
    tokens = {split: tokenize(lines[split]) for split in SPLITS}
    if not any(t != EOS for t in tokens["train"]):
        raise BenchError(f"corpus {name!r}: the training split has no words")
    vocab = build_vocabulary(tokens["train"], known_words)
    splits = {split: encode(tokens[split], vocab, f"{name} {split}") for split in SPLITS}
    return Corpus(name=name, vocab=vocab, splits=splits, oracle_log_probs=oracle)


# --------------------------------------------------------------------------------------------------------
# Language-model batches
#
# A split of M tokens is predicted from a stream that starts with one extra <eos> (the "previous sentence
# end"), so every token of the split -- the first word and every <eos> included -- is predicted exactly
# once, as n-gram toolkits count them. The M (input, target) pairs are cut into B parallel streams of
# L = ceil(M / B) steps; the last stream is padded and the padding masked out:
#
#     targets  t0 t1 t2 ... t{M-1}             stream 0:  t0     ... t{L-1}
#                                     ---->    stream 1:  tL     ... t{2L-1}
#                                              ...
#                                              stream B-1: ...  t{M-1} pad pad
#
# Each stream is then read in chunks of `bptt` steps; batch i is column block i of all B streams, so
# consecutive batches continue the same streams and a recurrent model carries its hidden state across
# them (detached at every chunk boundary: truncated BPTT). The feed-forward and n-gram models carry their
# last n-1 words the same way.
#
# A DDP run of W processes trains on the same B streams, each process on a contiguous block of B/W of them,
# read in the same chunk order, so that every process's state still follows its own streams:
#
#                 chunk 0   chunk 1   chunk 2 ...
#     stream 0   |--------|--------|--------|     process 0: streams [0, B/W)
#     ...        |--------|--------|--------|
#     stream B/W |--------|--------|--------|     process 1: streams [B/W, 2B/W)
#     ...
#
# Lightning's DistributedSampler would deal whole chunks to the processes in turn instead (chunk 0 to
# process 0, chunk 1 to process 1, ...): each state would then carry into a chunk that does not follow it.
# Validation and test are not split: every process scores the whole split, in one stream's exact figures.
# --------------------------------------------------------------------------------------------------------


def batchify(ids: np.ndarray, eos: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, mask), each (B, L): the split as B parallel streams, every token predicted once; the
    ids keep their dtype."""
    inputs = np.concatenate([np.array([eos], dtype=ids.dtype), ids[:-1]])
    length = -(-len(ids) // batch_size)
    pad = batch_size * length - len(ids)
    mask = np.concatenate([np.ones(len(ids), dtype=bool), np.zeros(pad, dtype=bool)])
    inputs, targets = (np.concatenate([a, np.full(pad, eos, dtype=ids.dtype)]) for a in (inputs, ids))
    return tuple(torch.from_numpy(a.reshape(batch_size, length)) for a in (inputs, targets, mask))


def process_streams(streams: torch.Tensor, rank: int, processes: int) -> torch.Tensor:
    """Process `rank`'s streams of a DDP run of `processes` (see the diagram above): rows
    [rank*B/W, (rank+1)*B/W) of the B streams (B, L), whole (bench.config checks that W divides B)."""
    share = streams.shape[0] // processes
    return streams[rank * share:(rank + 1) * share]


class StreamChunks(Dataset):
    """Chunk i = steps [i*bptt, (i+1)*bptt) of every stream (of process `rank`'s streams of `processes`):
    one ready-made batch per item."""

    def __init__(self, ids: np.ndarray, eos: int, batch_size: int, bptt: int, rank: int = 0, processes: int = 1):
        self.inputs, self.targets, self.mask = (process_streams(a, rank, processes)
                                                for a in batchify(ids, eos, batch_size))
        self.bptt = bptt

    def __len__(self) -> int:
        return -(-self.inputs.shape[1] // self.bptt)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        window = slice(i * self.bptt, (i + 1) * self.bptt)
        return self.inputs[:, window].long(), self.targets[:, window].long(), self.mask[:, window]


class LanguageModelData(pl.LightningDataModule):
    """Stream batches of one corpus for training (in order: the state carries) and evaluation.

    Every token is scored from its whole history, as the rnnlm toolkit and n-gram toolkits score: scoring
    in B > 1 streams gives the scores of one stream (the model re-scores the start of each stream, see
    bench.models.base), with B times fewer sequential steps. Scoring needs no truncation, so it reads
    long chunks of about `eval_tokens` tokens in all (never shorter than the training chunks): every chunk
    costs the loop a fixed overhead, and a class softmax one product per class present (PTB test, 100
    classes, one stream: 1.23 s in 256-token chunks, 0.69 s in 4096-token ones).
    """

    def __init__(self, corpus: Corpus, batch_size: int, bptt: int, eval_batch_size: int = 1,
                 eval_tokens: int = 4096):
        super().__init__()
        self.corpus, self.batch_size, self.bptt = corpus, batch_size, bptt
        self.eval_batch_size, self.eval_bptt = eval_batch_size, max(eval_tokens // eval_batch_size, bptt, 1)

    def _loader(self, split: str, batch_size: int, bptt: int, rank: int = 0, processes: int = 1) -> DataLoader:
        chunks = StreamChunks(self.corpus.splits[split], self.corpus.vocab.eos, batch_size, bptt, rank, processes)
        return DataLoader(chunks, batch_size=None, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """This process's streams (all of them outside a DDP run)."""
        return self._loader("train", self.batch_size, self.bptt, self.trainer.global_rank, self.trainer.world_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.eval_batch_size, self.eval_bptt)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, self.eval_bptt)
