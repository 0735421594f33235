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
