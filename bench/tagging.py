"""Tagging corpora (BIO chunk tags) and their padded sentence batches.

A tagging corpus is a list of sentences per split, each a pair (word ids, tag ids). Files go through
Hugging Face `datasets` like the language-model corpora (bench.data): `load_dataset("text", ...)` over the
local files, the Hub as the online fallback.

    conll2000   CoNLL-2000 chunking (Tjong Kim Sang & Buchholz 2000): `word POS chunk` per line, a blank
                line after each sentence; train and test files, a validation split carved from train with a
                fixed seed (the release has none).
    synthetic   the sentences of the synthetic language (bench.synthetic) with their noun phrases tagged by
                grammatical number, B-SG/I-SG or B-PL/I-PL: "the big cats" is B-PL I-PL I-PL. Number shows
                only on the head noun at the end of the phrase and "the", "my", ... fit either, so tagging a
                phrase's first words needs the words to its right: a left-to-right tagger must guess.

Words: the vocabulary is the training words seen at least twice, by descending frequency, after `<pad>`
(id 0) and `<unk>` (id 1); other words map to `<unk>`. Tags: `O` first, then the other tags of all splits, sorted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

from bench.corpora import CONLL2000, SPLITS, TAGGING_CORPORA, locate
from bench.errors import BenchError
from bench.inputs import check_text_file

PAD, UNK = "<pad>", "<unk>"
TAG = re.compile(r"O|[BI]-\S+")
VALID_FRACTION, VALID_SEED = 0.1, 0  # the validation split carved from CoNLL-2000's train: fixed for every run
MIN_COUNT = 2  # training occurrences a word needs to get its own embedding

Sentence = tuple[list[str], list[str]]  # words, tags


@dataclass(frozen=True)
class TaggedCorpus:
    name: str
    words: list[str]  # id -> word; <pad> = 0, <unk> = 1
    tags: list[str]  # id -> tag; O = 0
    splits: dict[str, list[tuple[np.ndarray, np.ndarray]]]  # split -> sentences (word ids, tag ids)

    def tokens(self, split: str) -> int:
        return sum(len(words) for words, _ in self.splits[split])


# ------------------------------------------------------------------------------------------------ reading


def parse_conll(lines: list[str], where: str) -> list[Sentence]:
    """Sentences of `word POS chunk` lines separated by blank lines; a malformed line is a user error
    naming `where` and the line number."""
    sentences, words, tags = [], [], []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        if len(fields) != 3:
            raise BenchError(f"{where}:{number}: expected 3 columns (word POS chunk), got {len(fields)}")
        if not TAG.fullmatch(fields[2]):
            raise BenchError(f"{where}:{number}: chunk tag {fields[2]!r} is not O, B-X or I-X")
        words.append(fields[0])
        tags.append(fields[2])
    if words:
        sentences.append((words, tags))
    return sentences


def _read_conll2000(data_dir: str | Path | None) -> dict[str, list[Sentence]]:
    from datasets import load_dataset

    paths = locate("conll2000", CONLL2000, data_dir)
    if paths is None:
        sentences = _read_conll2000_hub()
    else:
        for split, path in paths.items():
            check_text_file(path, split)
        dataset = load_dataset("text", data_files={s: str(p) for s, p in paths.items()})
        sentences = {split: parse_conll(dataset[split]["text"], str(path)) for split, path in paths.items()}
    train = sentences["train"]
    held_out = np.random.default_rng(VALID_SEED).permutation(len(train))[:round(VALID_FRACTION * len(train))]
    is_valid = np.zeros(len(train), dtype=bool)
    is_valid[held_out] = True
    return {"train": [s for s, v in zip(train, is_valid) if not v], "valid": [s for s, v in zip(train, is_valid) if v],
            "test": sentences["test"]}


def _read_conll2000_hub() -> dict[str, list[Sentence]]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(CONLL2000.hub_name)
    except Exception as error:  # whatever the Hub answered (no such dataset, a dropped connection)
        raise BenchError(f"corpus 'conll2000': reading {CONLL2000.hub_name} from the Hugging Face Hub failed "
                         f"({type(error).__name__}); put {', '.join(CONLL2000.files.values())} under the data "
                         "folder instead") from None
    names = dataset["train"].features["chunk_tags"].feature.names
    return {split: [(row["tokens"], [names[t] for t in row["chunk_tags"]]) for row in dataset[split]]
            for split in ("train", "test")}


def noun_phrase_tags(words: list[str], category) -> list[str]:
    """BIO tags of the noun phrases (DET? ADJ* N) of a synthetic sentence, typed by the head noun's number.

    An adjective run not closed by a noun is predicative ("is big"), so it stays O."""
    tags, start = ["O"] * len(words), None
    for i, word in enumerate(words):
        kind = category(word)
        if kind[0] == "DET" or (kind[0] == "ADJ" and start is None):
            start = i
        elif kind[0] == "N":
            first = i if start is None else start
            tags[first:i + 1] = [f"B-{kind[1].upper()}"] + [f"I-{kind[1].upper()}"] * (i - first)
            start = None
        elif kind[0] != "ADJ":
            start = None
    return tags


def _read_synthetic(seed: int) -> dict[str, list[Sentence]]:
    from bench.data import synthetic_lines
    from bench.synthetic import SyntheticLanguage

    lines, _, _ = synthetic_lines(seed)
    category = SyntheticLanguage(seed).category
    return {split: [(line.split(), noun_phrase_tags(line.split(), category)) for line in lines[split] if line.strip()]
            for split in SPLITS}


def load_tagged_corpus(name: str, data_dir: str | Path | None = None, seed: int = 0) -> TaggedCorpus:
    """The tagging corpus `name` as id arrays. `seed` only matters for `synthetic`."""
    if name not in TAGGING_CORPORA:
        raise BenchError(f"unknown tagging corpus {name!r}: choose one of {', '.join(TAGGING_CORPORA)}")
    sentences = _read_synthetic(seed) if name == "synthetic" else _read_conll2000(data_dir)
    if not sentences["train"]:
        raise BenchError(f"corpus {name!r}: the training split has no sentences")
    train_words = np.concatenate([np.array(words, dtype=object) for words, _ in sentences["train"]])
    unique, first, counts = np.unique(train_words, return_index=True, return_counts=True)
    # Words seen once stay out, so <unk> is trained on them and means something for the unseen test words.
    order = np.lexsort((first, -counts))
    words = [PAD, UNK, *unique[order][counts[order] >= MIN_COUNT]]
    # Every split's tags (CoNLL-2000's I-LST occurs only in test): the gold stays as written, and a tag
    # never seen in training is simply never predicted.
    all_tags = {tag for split in SPLITS for _, tags in sentences[split] for tag in tags}
    tags = ["O", *sorted(all_tags - {"O"})]
    word_id = {word: i for i, word in enumerate(words)}
    tag_id = {tag: i for i, tag in enumerate(tags)}

    def encode(sentence: Sentence) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([word_id.get(w, word_id[UNK]) for w in sentence[0]], dtype=np.int64),
                np.array([tag_id[t] for t in sentence[1]], dtype=np.int64))

    splits = {split: [encode(s) for s in sentences[split]] for split in SPLITS}
    return TaggedCorpus(name=name, words=words, tags=tags, splits=splits)


# ------------------------------------------------------------------------------------------------ batches
#
# A batch is B sentences padded with <pad> (id 0) to the longest: words (B, T), tags (B, T), lengths (B,).
# The tagger packs the padded batch (pack_padded_sequence), so the backward direction of a bidirectional
# layer starts at each sentence's own last word, not at the padding, and masks padding out of the loss:
#
#     the  big  cats  sleep  <pad> <pad>       length 4
#     a    cat  is    big    in    ...         length 6
# --------------------------------------------------------------------------------------------------------


def pad_batch(sentences: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    words = pad_sequence([torch.from_numpy(w) for w, _ in sentences], batch_first=True)
    tags = pad_sequence([torch.from_numpy(t) for _, t in sentences], batch_first=True)
    return words, tags, torch.tensor([len(w) for w, _ in sentences])


class TaggingData(pl.LightningDataModule):
    """Sentence batches: shuffled for training (seeded by the run's seed), in corpus order for scoring."""

    def __init__(self, corpus: TaggedCorpus, batch_size: int, eval_batch_size: int = 256):
        super().__init__()
        self.corpus, self.batch_size, self.eval_batch_size = corpus, batch_size, eval_batch_size

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(self.corpus.splits[split], batch_size=batch_size, shuffle=shuffle, collate_fn=pad_batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
