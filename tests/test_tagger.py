
import numpy as np
import optuna
import pytest
import torch

from bench.cli import main
from bench.config import make_config
from bench.corpora import resolve_data_dir
from bench.harness import run_experiment
from bench.models.base import span_scores
from bench.models.birnn import BiRNNTagger
from bench.synthetic import SyntheticLanguage
from bench.tagging import load_tagged_corpus, noun_phrase_tags, pad_batch


def test_span_f1_equals_the_hand_count():
    gold = [["B-NP", "I-NP", "O", "B-VP", "B-NP"], ["B-PP", "B-NP", "I-NP", "I-NP"]]
    predicted = [["B-NP", "I-NP", "O", "B-NP", "B-NP"], ["B-PP", "B-NP", "I-NP", "O"]]
    # gold spans: NP(0-1) VP(3) NP(4) | PP(0) NP(1-3)                      -> 5
    # predicted:  NP(0-1) NP(3) NP(4) | PP(0) NP(1-2)                      -> 5
    # correct:    NP(0-1), NP(4), PP(0)                                   -> 3
    scores = span_scores(gold, predicted)
    assert scores["precision"] == pytest.approx(3 / 5)
    assert scores["recall"] == pytest.approx(3 / 5)
    assert scores["f1"] == pytest.approx(3 / 5)
    assert scores["accuracy"] == pytest.approx(7 / 9)
    # an I- tag after O starts a chunk, as conlleval counts it
    assert span_scores([["O", "I-NP", "I-NP"]], [["O", "B-NP", "I-NP"]])["f1"] == pytest.approx(1.0)


def test_synthetic_noun_phrases_are_tagged_by_the_head_nouns_number():
    language = SyntheticLanguage(0)
    words = {}
    for word in language.vocabulary:
        words.setdefault(language.category(word)[:2], word)
    the, adjective, cats, cat = words[("DET", "any")], words[("ADJ", 0)], words[("N", "pl")], words[("N", "sg")]
    verb, copula = words[("VI", "pl")], words[("COP", "sg")]
    sentence = [the, adjective, cats, verb, the, cat, copula, adjective]
    assert noun_phrase_tags(sentence, language.category) == ["B-PL", "I-PL", "I-PL", "O", "B-SG", "I-SG", "O", "O"]
    assert noun_phrase_tags([adjective, cats, verb], language.category) == ["B-PL", "I-PL", "O"]


def test_padding_has_no_effect_on_the_loss():
    torch.manual_seed(0)
    model = BiRNNTagger(50, ["O", "B-X", "I-X"], cell="lstm", hidden_size=8, embedding_size=6).eval()
    rng = np.random.default_rng(0)
    sentences = [(rng.integers(2, 50, n), rng.integers(0, 3, n)) for n in (3, 7, 5)]
    words, tags, lengths = pad_batch(sentences)
    batched, mask, _ = model.token_nll(words, tags, lengths)
    assert mask.sum() == 15 and batched[~mask].abs().sum() == 0
    for row, sentence in enumerate(sentences):
        alone, _, _ = model.token_nll(*pad_batch([sentence]))
        torch.testing.assert_close(batched[row, :len(sentence[0])], alone[0], rtol=1e-6, atol=1e-7)


def test_a_left_to_right_tagger_scores_clearly_below_the_bidirectional_one():
    settings = {"max_epochs": 1, "hidden_size": 32, "embedding_size": 32, "layers": 1}
    both = run_experiment(make_config("birnn", settings, quick=True), progress=False)
    left = run_experiment(make_config("birnn", {**settings, "bidirectional": False}, quick=True), progress=False)
    assert both["test_f1"] > 0.9
    assert both["test_f1"] - left["test_f1"] > 0.1
    assert 0 < left["test_precision"] <= 1 and both["tokens_per_second"] > 0 and both["test_seconds"] > 0
    again = run_experiment(make_config("birnn", settings, quick=True), progress=False)
    assert again["test_f1"] == both["test_f1"] and again["valid_f1_per_epoch"] == both["valid_f1_per_epoch"]


def test_conll2000_splits_and_counts():
    if not (resolve_data_dir() / "conll2000" / "train.txt").is_file():
        pytest.skip(f"CoNLL-2000 not found under {resolve_data_dir()}")
    corpus = load_tagged_corpus("conll2000")
    # counts from the corpus README: 8,936 train sentences (a tenth held out for validation), 2,012 test, 47,377
    # test tokens; 23 chunk labels over both files
    assert len(corpus.splits["train"]) + len(corpus.splits["valid"]) == 8936
    assert len(corpus.splits["valid"]) == 894
    assert len(corpus.splits["test"]) == 2012 and corpus.tokens("test") == 47377
    assert len(corpus.tags) == 23 and corpus.tags[0] == "O"


@pytest.mark.parametrize("line,message", [
    ("Confidence NN", "train.txt:2: expected 3 columns (word POS chunk), got 2"),
    ("Confidence NN X-NP", "train.txt:2: chunk tag 'X-NP' is not O, B-X or I-X"),
])
def test_malformed_tagging_file_exits_2_naming_file_and_line(tmp_path, capsys, line, message):
    folder = tmp_path / "conll2000"
    folder.mkdir()
    (folder / "train.txt").write_text(f"The DT B-NP\n{line}\n\n")
    (folder / "test.txt").write_text("The DT B-NP\n\n")
    argv = ["train", "birnn", "--corpus", "conll2000", "--data-dir", str(tmp_path), "--storage",
            f"sqlite:///{tmp_path}/r.db"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path}/r.db") == []


def test_tagger_and_language_models_take_their_own_corpora(capsys):
    assert main(["train", "birnn", "--corpus", "ptb"]) == 2
    assert "birnn needs a tagging corpus: choose one of synthetic, conll2000, got 'ptb'" in capsys.readouterr().err
    assert main(["train", "lstm", "--corpus", "conll2000"]) == 2
    assert "lstm needs a language-model corpus" in capsys.readouterr().err
    assert main(["train", "birnn", "--set", "bptt=5"]) == 2
    assert "unknown hyper-parameter 'bptt' for birnn" in capsys.readouterr().err
