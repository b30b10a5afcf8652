"""Scoring rules on hand-written cases, and the aggregate report."""

import itertools

import pytest

from trainer.eval.report import aggregate
from trainer.eval.scoring import (
    answer_kind,
    corpus_word_error_rate,
    normalize_vqa,
    parse_choice,
    score,
    vqa_soft_accuracy,
    word_edit_distance,
    word_error_rate,
)


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("Yes.", "yes", 1.0),
        ("yes", "Yes", 1.0),
        ("Yes, there is a blue triangle.", "yes", 1.0),
        ("No, there is not.", "yes", 0.0),
        ("no", "no", 1.0),
        ("NO!", "no", 1.0),
        ("There is a triangle.", "yes", 0.0),  # neither word: wrong, not a guess
        ("", "no", 0.0),
    ],
)
def test_yesno(prediction, answer, expected):
    assert score(prediction, {"task": "yesno", "answer": answer}) == expected


def test_yesno_rejects_non_binary_reference():
    with pytest.raises(ValueError, match="s1"):
        score("yes", {"id": "s1", "task": "yesno", "answer": "maybe"})


CHOICES = ["red", "blue", "green"]


@pytest.mark.parametrize("prediction", ["B", "b", "(B)", "B.", "B)", "B) blue", "B. blue", "B: blue", "blue", "Blue.",
                                        "B blue", "The answer is blue."])
@pytest.mark.parametrize("answer", ["B", "blue", "(B)"])
def test_choice_correct(prediction, answer):
    assert score(prediction, {"task": "choice", "answer": answer, "choices": CHOICES}) == 1.0


@pytest.mark.parametrize("prediction", ["A", "(C)", "C. green", "red", "D", "blue or green", "", "C blue"])
def test_choice_wrong(prediction):
    assert score(prediction, {"task": "choice", "answer": "B", "choices": CHOICES}) == 0.0


def test_choice_labelled_options_and_article_texts():
    # Options stored with their labels, and an option text that starts with "a".
    choices = ["A. a red circle", "B. a blue square"]
    assert parse_choice("a blue square", choices) == 1
    assert parse_choice("A", choices) == 0
    assert score("B", {"task": "choice", "answer": "a blue square", "choices": choices}) == 1.0


def test_choice_reference_must_be_an_option():
    with pytest.raises(ValueError, match="q7"):
        score("A", {"id": "q7", "task": "choice", "answer": "purple", "choices": CHOICES})
    with pytest.raises(ValueError, match="choices"):
        score("A", {"task": "choice", "answer": "A"})


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The Red.", "red"),
        ("Three", "3"),
        ("an apple, two pears", "apple 2 pears"),
        ("2.5", "2.5"),
        ("1,000", "1000"),
        ("dont", "don't"),
        ("top-right", "top right"),
    ],
)
def test_normalize_vqa(text, normalised):
    assert normalize_vqa(text) == normalised


def test_open_exact_match():
    assert score("Red.", {"task": "open", "answer": "red"}) == 1.0
    assert score("three", {"task": "open", "answer": "3"}) == 1.0
    assert score("a red one", {"task": "open", "answer": "red"}) == 0.0
    # Unknown task types fall back to open.
    assert score("The circle", {"task": "caption", "answer": "circle"}) == 1.0
    assert score("circle", {"answer": "circle"}) == 1.0


def _vqa_reference(prediction, references):
    """The VQA formula spelled out over all 10-choose-9 subsets."""
    accs = []
    for subset in itertools.combinations(range(len(references)), len(references) - 1):
        matches = sum(normalize_vqa(references[i]) == normalize_vqa(prediction) for i in subset)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize("n_match", range(0, 11))
def test_vqa_soft_accuracy_ten_answers(n_match):
    references = ["two"] * n_match + ["3"] * (10 - n_match)
    got = score("2", {"task": "open", "answer": "2", "answers": references})
    assert got == pytest.approx(_vqa_reference("2", references))
    # Known values of VQA accuracy: 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3+ -> 0.9 or 1.
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}.get(n_match, 1.0)
    assert got == pytest.approx(expected)


def test_soft_accuracy_short_reference_lists():
    assert vqa_soft_accuracy("3", ["3", "three"]) == 1.0
    assert vqa_soft_accuracy("4", ["3", "three"]) == 0.0
    assert vqa_soft_accuracy("3", ["3"]) == 1.0
    # Two of three references agree with the prediction: 2 subsets give 1/2, one gives 1.
    assert vqa_soft_accuracy("red", ["red", "red", "blue"]) == pytest.approx(2 / 3)


def test_word_edit_distance_against_known_cases():
    assert word_edit_distance([], []) == 0
    assert word_edit_distance("a b c".split(), "a b c".split()) == 0
    assert word_edit_distance("a x c".split(), "a b c".split()) == 1  # substitution
    assert word_edit_distance("a c".split(), "a b c".split()) == 1  # deletion
    assert word_edit_distance("a b b c".split(), "a b c".split()) == 1  # insertion
    assert word_edit_distance("c b a".split(), "a b c".split()) == 2
    assert word_edit_distance("kitten sat".split(), "sitting".split()) == 2


def test_asr_score():
    assert word_error_rate("The cat sat.", "the cat sat") == 0.0
    assert word_error_rate("the cat", "the cat sat on") == 0.5
    assert score("the dog sat on", {"task": "asr", "answer": "the cat sat on"}) == pytest.approx(0.75)
    # Many insertions: WER above 1 clips the score at 0.
    assert score("a b c d e f", {"task": "asr", "answer": "x"}) == 0.0
    assert score("", {"task": "asr", "answer": ""}) == 1.0


def test_aggregate():
    records = [
        {"id": "a", "task": "yesno", "mode": "text", "score": 1.0, "parsed": "yes"},
        {"id": "a", "task": "yesno", "mode": "audio", "score": 0.0, "parsed": "no"},
        {"id": "b", "task": "yesno", "mode": "text", "score": 1.0, "parsed": "no"},
        {"id": "b", "task": "yesno", "mode": "audio", "score": 1.0, "parsed": "no"},
        {"id": "c", "task": "open", "mode": "text", "score": 0.5, "source": "vg_relation"},
        {"id": "c", "task": "open", "mode": "audio", "score": 0.0, "source": "vg_relation"},
    ]
    report = aggregate(records)
    assert report["n"] == 3
    assert report["vl_score"] == pytest.approx(100 * 2.5 / 3)
    assert report["va_score"] == pytest.approx(100 / 3)
    assert report["gap"] == pytest.approx(report["vl_score"] - report["va_score"])
    yesno = report["by_task"]["yesno"]
    assert (yesno["vl_score"], yesno["va_score"], yesno["gap"], yesno["n"]) == (100.0, 50.0, 50.0, 2)
    assert (yesno["vl_yes_rate"], yesno["va_yes_rate"]) == (50.0, 0.0)
    assert report["by_task"]["open"] == {"vl_score": 50.0, "va_score": 0.0, "gap": 50.0, "n": 1}
    assert report["by_source"]["vg_relation"]["n"] == 1


def test_aggregate_single_mode_has_no_gap():
    report = aggregate([{"id": "a", "task": "open", "mode": "text", "score": 1.0}])
    assert report["vl_score"] == 100.0 and report["va_score"] is None and report["gap"] is None
    with pytest.raises(ValueError, match="mode"):
        aggregate([{"id": "a", "task": "open", "mode": "video", "score": 1.0}])


@pytest.mark.parametrize(
    "text, choices, kind",
    [
        ("red", None, "colour"),
        ("Red.", None, "colour"),
        ("red circle", None, "other"),  # one colour word, nothing else
        ("3", None, "number"),
        ("three", None, "number"),  # VQA normalisation: number words are counts
        ("top left", None, "position"),
        ("centre", None, "position"),
        ("the top", None, "other"),  # an article is not a grid word
        ("yes", None, "yesno"),
        ("No, there is not.", None, "yesno"),
        ("B", ["circle", "square", "star"], "option"),
        ("square", ["circle", "square", "star"], "option"),  # the option's text names it too
        ("D", ["circle", "square", "star"], "other"),  # no fourth option
        ("B", None, "other"),  # a letter without options is no kind
        ("", None, "other"),
        ("What colour is the circle?", None, "other"),
    ],
)
def test_answer_kind(text, choices, kind):
    assert answer_kind(text, choices) == kind


def test_corpus_word_error_rate_counts_words_not_samples():
    pairs = [("the red", "the blue"),  # 1 edit in 2 words
             ("where is the red square at the top", "where is the red square at the top")]  # 0 in 8
    assert corpus_word_error_rate(pairs) == pytest.approx(1 / 10)  # the per-sample mean would be 0.25
    assert corpus_word_error_rate([("a b c", "a")]) == pytest.approx(2.0)  # insertions count
    assert corpus_word_error_rate([("Is there a Red Star?", "is there a red star")]) == 0.0  # case, punctuation
    assert corpus_word_error_rate([("x", "")]) is None


def test_aggregate_kind_rates_and_wer():
    records = [
        {"id": "a", "task": "open", "mode": "text", "score": 1.0, "answer": "red", "prediction": "red", "source": "c"},
        {"id": "a", "task": "open", "mode": "audio", "score": 0.0, "answer": "red", "prediction": "top left",
         "source": "c"},
        {"id": "b", "task": "open", "mode": "text", "score": 0.0, "answer": "blue", "prediction": "green",
         "source": "c"},
        {"id": "b", "task": "open", "mode": "audio", "score": 0.0, "answer": "blue", "prediction": "yellow",
         "source": "c"},
        {"id": "c", "task": "open", "mode": "text", "score": 0.0, "answer": "a cat", "prediction": "dog"},  # no kind
        {"id": "c", "task": "open", "mode": "audio", "score": 0.0, "answer": "a cat", "prediction": "dog"},
    ]
    report = aggregate(records)
    # Colour references: typed 2 of 2 colour words, spoken 1 of 2 (a position is the wrong kind).
    assert (report["by_task"]["open"]["vl_kind_rate"], report["by_task"]["open"]["va_kind_rate"]) == (100.0, 50.0)
    assert (report["by_source"]["c"]["vl_kind_rate"], report["by_source"]["c"]["va_kind_rate"]) == (100.0, 50.0)
    assert "wer" not in report
    asr = [{"id": "x", "task": "asr", "mode": "audio", "score": 0.5, "answer": "the red", "prediction": "the blue"},
           {"id": "y", "task": "asr", "mode": "audio", "score": 1.0, "answer": "a b c d e f g h",
            "prediction": "a b c d e f g h"},
           {"id": "x", "task": "asr", "mode": "text", "score": 1.0, "answer": "the red", "prediction": "the red"},
           {"id": "y", "task": "asr", "mode": "text", "score": 1.0, "answer": "a b c d e f g h",
            "prediction": "a b c d e f g h"}]
    assert aggregate(asr)["wer"] == {"text": 0.0, "audio": pytest.approx(0.1)}
