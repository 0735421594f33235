import math

import numpy as np
import pytest

from bench.synthetic import EOS, SyntheticLanguage, write_corpus


@pytest.fixture(scope="module")
def language():
    return SyntheticLanguage(seed=0)


@pytest.fixture(scope="module")
def sampled(language):
    return language.sample(600, np.random.default_rng(1))


def stream(sentences):
    return [w for s in sentences for w in [*s, EOS]]


def test_vocabulary(language):
    vocab = language.vocabulary
    assert len(vocab) == len(set(vocab)) and 2500 <= len(vocab) <= 3500
    assert EOS in vocab and "<unk>" not in vocab
    assert all(w == EOS or (w.isalpha() and w.islower()) for w in vocab)


def test_score_recovers_the_sampled_log_probs(language, sampled):
    sentences, log_probs = sampled
    tokens = stream(sentences)
    assert len(log_probs) == len(tokens) == sum(len(s) + 1 for s in sentences)
    assert np.all(log_probs <= 0) and np.all(np.isfinite(log_probs))
    scored = language.score(tokens)
    assert math.isclose(math.exp(-log_probs.mean()), math.exp(-scored.mean()), rel_tol=0, abs_tol=1e-9)
    np.testing.assert_allclose(scored, log_probs, rtol=0, atol=1e-12)
    assert 5 <= len(tokens) / len(sentences) - 1 <= 25  # average sentence length


def test_score_rejects_impossible_streams(language, sampled):
    sentence = sampled[0][0]
    with pytest.raises(ValueError):
        language.score(["nosuchword", EOS])
    with pytest.raises(ValueError):
        language.score([EOS])  # empty sentence
    with pytest.raises(ValueError):
        language.score([*sentence, sentence[0], EOS])  # a determiner/noun cannot follow a complete sentence's end


def test_next_distribution_sums_to_one(language, sampled):
    sentences, log_probs = sampled
    assert math.isclose(sum(language.next_distribution([]).values()), 1.0, abs_tol=1e-12)
    t = 0
    for sentence in sentences[:60]:
        for i in range(len(sentence) + 1):
            dist = language.next_distribution(sentence[:i])
            assert math.isclose(sum(dist.values()), 1.0, abs_tol=1e-12)
            token = sentence[i] if i < len(sentence) else EOS
            assert math.isclose(math.log(dist[token]), log_probs[t], abs_tol=1e-12)
            t += 1


def test_write_corpus_is_deterministic(tmp_path):
    sizes = (300, 50, 50)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        (tmp_path / name).mkdir()
        write_corpus(tmp_path / name, seed=seed, sentences=sizes)
    files = [f"{s}.txt" for s in ("train", "valid", "test")] + [f"{s}.logprob.npy" for s in ("train", "valid", "test")]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()


def test_written_log_probs_match_the_text(tmp_path):
    write_corpus(tmp_path, seed=0, sentences=(200, 30, 40))
    language = SyntheticLanguage(0)
    for split, n in (("train", 200), ("valid", 30), ("test", 40)):
        lines = (tmp_path / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        log_probs = np.load(tmp_path / f"{split}.logprob.npy")
        assert len(lines) == n and log_probs.dtype == np.float64
        tokens = [w for line in lines for w in [*line.split(" "), EOS]]
        assert len(log_probs) == len(tokens)
        np.testing.assert_array_equal(language.score(tokens), log_probs)


def test_agreement_across_relative_clauses(language, sampled):
    def number(word):
        return language.category(word)[1]  # ('N'|'VT'|'VI'|'COP', 'sg'|'pl', ...)

    checked = 0
    for sentence in sampled[0]:
        if "that" not in sentence:
            continue
        states = language.trace(sentence)
        subject = next(w for w in sentence if language.category(w)[0] == "N")  # the first noun heads the subject
        # the main verb: the first token read in the main clause's first VP state
        i = next(i for i, s in enumerate(states) if s[0] == "vp" and s[3] == 1)
        verb = sentence[i]
        assert language.category(verb)[0] in ("VT", "VI", "COP")
        assert number(verb) == number(subject)
        # every verb or copula of the wrong number has probability 0 there
        dist = language.next_distribution(sentence[:i])
        wrong = "pl" if number(subject) == "sg" else "sg"
        assert not any(language.category(w)[0] in ("VT", "VI", "COP") and number(w) == wrong for w in dist)
        assert dist[verb] > 0
        checked += 1
    assert checked >= 100
