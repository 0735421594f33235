import numpy as np
import pytest
import torch
from conftest import write_lines

from bench.data import EOS, StreamChunks, build_vocabulary, encode, load_corpus, tokenize
from bench.errors import BenchError


@pytest.mark.parametrize("length,batch_size,bptt", [(1, 1, 1), (17, 3, 4), (100, 10, 5), (101, 7, 35), (5, 8, 2)])
def test_stream_chunks_predict_every_token_once_in_order(length, batch_size, bptt):
    ids = np.arange(1, length + 1)
    chunks = StreamChunks(ids, eos=0, batch_size=batch_size, bptt=bptt)
    inputs = torch.cat([chunks[i][0] for i in range(len(chunks))], dim=1)
    targets = torch.cat([chunks[i][1] for i in range(len(chunks))], dim=1)
    mask = torch.cat([chunks[i][2] for i in range(len(chunks))], dim=1)
    assert targets[mask].tolist() == ids.tolist()  # stream by stream, chunk by chunk: the corpus in order
    assert inputs[mask].tolist() == [0, *ids[:-1].tolist()]  # each target's input is the token before it
    assert all(chunks[i][0].shape[0] == batch_size for i in range(len(chunks)))


def test_vocabulary_sorted_by_training_count_then_first_occurrence():
    vocab = build_vocabulary(tokenize(["b a c", "a c a"]))
    assert vocab.words == ["a", "c", EOS, "b"]  # c (first at 2) before <eos> (first at 3)
    assert vocab.counts.tolist() == [3, 2, 2, 1]
    assert vocab.unk is None and vocab.eos == 2


def test_out_of_vocabulary_words_become_unk_or_a_user_error():
    with_unk = build_vocabulary(tokenize(["a <unk> b"]))
    assert encode(["a", "zebra"], with_unk, "x").tolist() == [with_unk.words.index("a"), with_unk.unk]
    without_unk = build_vocabulary(tokenize(["a b"]))
    with pytest.raises(BenchError, match="'zebra' is not in the training vocabulary"):
        encode(["a", "zebra"], without_unk, "x")


def test_file_corpus_counts_tokens_with_an_eos_per_line(tiny_ptb):
    corpus = load_corpus("ptb", tiny_ptb)
    assert len(corpus.splits["train"]) == 20 * (3 + 6 + 3 + 3)
    assert len(corpus.splits["valid"]) == 6 + 1 + 3 + 1
    assert corpus.vocab.words[corpus.splits["test"][-1]] == EOS
    assert corpus.vocab.words[corpus.splits["valid"][8]] == "<unk>"  # zebra
    counts = corpus.vocab.counts
    unigram = (counts + 1) / (counts.sum() + len(counts))
    expected = np.exp(-np.mean(np.log(unigram[corpus.splits["test"]])))
    assert corpus.unigram_perplexity("test") == pytest.approx(expected, rel=1e-12)


def test_missing_or_empty_corpus_is_a_user_error(tiny_ptb, tmp_path):
    with pytest.raises(BenchError, match="ptb/ptb.train.txt, ptb/ptb.valid.txt, ptb/ptb.test.txt missing under"):
        load_corpus("ptb", tmp_path / "nowhere")
    (tiny_ptb / "ptb" / "ptb.valid.txt").unlink()
    with pytest.raises(BenchError, match=r"^corpus 'ptb' not found: ptb/ptb.valid.txt missing under"):
        load_corpus("ptb", tiny_ptb)  # the missing split's file, alone
    write_lines(tiny_ptb / "ptb" / "ptb.valid.txt", ["a cat"])
    (tiny_ptb / "ptb" / "ptb.test.txt").write_text("")
    with pytest.raises(BenchError, match="test file is empty"):
        load_corpus("ptb", tiny_ptb)
    with pytest.raises(BenchError, match="unknown corpus 'ptbb'"):
        load_corpus("ptbb")


def test_a_streamed_corpus_reads_as_the_in_memory_reader(tmp_path):
    """wikitext-103 is read line by line into id arrays; the same files read as wikitext-2 (whole, through
    `datasets`) give the same vocabulary, counts and ids: ties by first occurrence, <eos> included, empty
    lines, lines ended by \n only (not by \r, form feed or U+2028) and a last line without one."""
    lines = {"train": "b a c\n\n a <unk> c a \n= = title = =\fx\u2028y a\r\nb b",
             "valid": "a z c\n\nb\n", "test": "c\u2028a q\n"}
    for name in ("wikitext-2", "wikitext-103"):
        for split, text in lines.items():
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / f"{split}.txt").write_text(text, encoding="utf-8")
    streamed, whole = load_corpus("wikitext-103", tmp_path), load_corpus("wikitext-2", tmp_path)
    assert streamed.vocab.words == whole.vocab.words and streamed.vocab.words[:3] == [EOS, "a", "="]
    assert streamed.vocab.counts.tolist() == whole.vocab.counts.tolist()
    for split in ("train", "valid", "test"):
        assert streamed.splits[split].dtype == np.int32  # 4 bytes a token
        assert streamed.splits[split].tolist() == whole.splits[split].tolist()
        # the batches are the same int64 ones
        streamed_chunk, whole_chunk = (StreamChunks(c.splits[split], c.vocab.eos, 2, 3)[0] for c in (streamed, whole))
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(streamed_chunk, whole_chunk))
    assert streamed.splits["valid"].tolist()[:2] == [streamed.vocab.words.index("a"), streamed.vocab.unk]


def test_a_streamed_corpus_names_a_bad_line_or_an_unknown_word(tmp_path):
    folder = tmp_path / "wikitext-103"
    write_lines(folder / "train.txt", ["a b", "b"])
    write_lines(folder / "valid.txt", ["a"])
    (folder / "test.txt").write_bytes(b"a\nb \xff\n")
    with pytest.raises(BenchError, match=r"test.txt, line 2: not UTF-8 text \(byte 0xff\)"):
        load_corpus("wikitext-103", tmp_path)
    write_lines(folder / "test.txt", ["a c"])
    with pytest.raises(BenchError, match="wikitext-103 test: word 'c' is not in the training vocabulary"):
        load_corpus("wikitext-103", tmp_path)
