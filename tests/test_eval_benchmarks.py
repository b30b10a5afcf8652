"""Each benchmark's own scoring rule (trainer/eval/benchmarks.py) on hand-made records, against
values worked out here by hand, and the paper-style table."""

import pytest

from trainer.eval.benchmarks import (benchmark_report, format_table, mme_parse, pope_parse, score_hallusionbench,
                                     score_mme, score_pope, score_scienceqa, score_textvqa, evalai_normalize,
                                     textvqa_accuracy)
from trainer.eval.report import aggregate


def record(benchmark, prediction, answer, mode="text", **bench):
    return {"id": f"{benchmark}-{len(bench)}-{prediction}", "mode": mode, "task": "yesno", "prediction": prediction,
            "answer": answer, "score": 0.0, "bench": {"benchmark": benchmark, **bench}}


@pytest.mark.parametrize("text, label", [("Yes", "yes"), ("No.", "no"), ("y", "yes"), ("N", "no"),
                                         ("Yes, there is a dog.", "yes"), ("nope", "no"), ("There is no dog", "other"),
                                         ("maybe", "other")])
def test_mme_parser_is_lmms_evals(text, label):
    assert mme_parse(text) == label


def test_mme_category_scores_sum_acc_and_acc_plus():
    """existence: image a both right, image b one right -> acc 75, acc+ 50 -> 125.
    code_reasoning: image c both wrong -> 0. Perception 125, cognition 0, total 125 of 400."""
    records = [record("mme", "Yes", "yes", category="existence", image_id="existence/a.png"),
               record("mme", "No", "no", category="existence", image_id="existence/a.png"),
               record("mme", "Yes", "yes", category="existence", image_id="existence/b.png"),
               record("mme", "Yes", "no", category="existence", image_id="existence/b.png"),
               record("mme", "No", "yes", category="code_reasoning", image_id="code_reasoning/c.png"),
               record("mme", "Yes", "no", category="code_reasoning", image_id="code_reasoning/c.png")]
    out = score_mme(records)
    assert out["categories"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "images": 2}
    assert out["categories"]["code_reasoning"]["score"] == 0.0
    assert (out["perception"], out["cognition"], out["total"]) == (125.0, 0.0, 125.0)
    assert out["percent"] == pytest.approx(125 / 400 * 100) and out["incomplete_pairs"] == 0


@pytest.mark.parametrize("text, label", [("Yes.", "yes"), ("No, there is not.", "no"), ("There is not a dog.", "no"),
                                         ("Yes, it is. No doubt.", "yes"), ("I see a cat", "yes")])
def test_pope_parser_is_llavas(text, label):
    assert pope_parse(text) == label


def test_pope_metrics_with_yes_positive():
    """truth yes,yes,no,no; said yes,no,yes,no: TP 1, FN 1, FP 1, TN 1 -> all 50; yes ratio 50."""
    records = [record("pope", p, t, category=c) for p, t, c in
               (("Yes.", "yes", "random"), ("No.", "yes", "random"), ("Yes.", "no", "popular"), ("No.", "no", "popular"))]
    out = score_pope(records)
    assert (out["accuracy"], out["precision"], out["recall"], out["f1"], out["yes_ratio"]) == (50, 50, 50, 50, 50)
    assert out["categories"]["random"]["recall"] == 50 and out["categories"]["popular"]["precision"] == 0
    assert out["categories"]["popular"]["f1"] == 0.0  # no true positive: F1 is 0, not undefined


def test_textvqa_soft_accuracy_over_ten_answers():
    """The prediction matches 2 of 10 answers: the 2 leave-one-out subsets without one of them
    hold 1 match (1/3), the other 8 hold 2 (2/3): (2/3 + 16/3) / 10 = 60%."""
    answers = ["red", "red"] + ["blue"] * 8
    out = score_textvqa([{"prediction": "Red.", "answer": "blue", "answers": answers, "mode": "text"}])
    assert out["accuracy"] == pytest.approx(60.0)


@pytest.mark.parametrize("text, normalised", [
    ("The Coca-Cola", "coca cola"),        # "-" has no space beside it: replaced by a space; article dropped
    ("coca - cola", "coca cola"),          # a mark beside a space is deleted
    ("1,000 (approx)", "1000 approx"),     # commas dropped first; " (" deleted, ")" -> space
    ("Two.", "2"),                         # period not before a digit deleted; number word -> digit
    ("3.5", "3.5"),                        # a decimal point stays
    ("$20", "$20"),                        # "$" and ":" are not in the EvalAI list: kept
    ("10:30", "10:30"),
    ("it's", "it 's"),                     # "'s" split off
    ("Dont", "don't"),                     # contraction restored
    ("eleven", "eleven"),                  # number words only up to ten
    ("Yes!\n", "yes"),
])
def test_evalai_normalisation(text, normalised):
    assert evalai_normalize(text) == normalised


def test_textvqa_counts_only_evalai_equal_answers():
    """"$20" vs "20": EvalAI keeps the "$", so they differ (the generic VQA normaliser would
    strip it); "Two" vs "2" agree."""
    answers = ["$20"] * 4 + ["2"] * 6
    assert textvqa_accuracy("20", answers) == 0.0
    assert textvqa_accuracy("$20", answers) == 1.0
    assert textvqa_accuracy("two", answers) == 1.0


def test_textvqa_with_one_reference_is_an_exact_match_not_zero():
    assert score_textvqa([{"prediction": "Red.", "answer": "red", "answers": ["red"]}])["accuracy"] == 100.0
    assert score_textvqa([{"prediction": "red", "answer": "red", "answers": []}])["accuracy"] == 100.0
    assert score_textvqa([{"prediction": "blue", "answer": "red", "answers": ["red"]}])["accuracy"] == 0.0


def test_hallusionbench_question_pair_and_figure_accuracy():
    """Question q0 asked of figures 0 and 1 (VD), q1 of figure 0; a VS question without a figure.
    Right: q0/f0, q1/f0, VS; wrong: q0/f1. aAcc 3/4; pairs: (q0: no), (q1: yes), (VS q0: yes) -> 2/3;
    figures (VS figure 0 excluded): f0 yes, f1 no -> 1/2."""
    def hb(prediction, answer, category, figure, question):
        return record("hallusionbench", prediction, answer, category=category, subcategory="chart", set_id="0",
                      figure_id=figure, question_id=question, visual_input="1")

    out = score_hallusionbench([hb("Yes, it is.", "yes", "VD", "0", "0"), hb("no", "yes", "VD", "1", "0"),
                                hb("No", "no", "VD", "0", "1"), hb("It says yes", "yes", "VS", "0", "0")])
    assert out["question_accuracy"] == 75.0
    assert out["pair_accuracy"] == pytest.approx(200 / 3)
    assert out["figure_accuracy"] == 50.0


def test_scienceqa_option_accuracy_is_lmms_evals_letter_rule():
    """Right: "B", " b ", "B. a dog"; wrong: "(B) a dog", "a dog" (text alone), "b. a dog"
    (lower-case letter with text), "A", "C." -> 3 of 8."""
    choices = ["a cat", "a dog", "a fish"]
    predictions = ("B", " b ", "B. a dog", "(B) a dog", "a dog", "b. a dog", "A", "C.")
    records = [{"prediction": p, "answer": "B", "choices": choices} for p in predictions]
    assert score_scienceqa(records)["accuracy"] == pytest.approx(100 * 3 / 8)
    # the reference may be the option text: it names the letter
    assert score_scienceqa([{"prediction": "B", "answer": "a dog", "choices": choices}])["accuracy"] == 100.0


def test_report_and_table_have_vl_va_gap_and_the_average():
    """Typed: POPE F1 100, TextVQA 100; spoken: POPE F1 0 (said no to a yes), TextVQA 0."""
    records = []
    for mode, pope_answer, text_answer in (("text", "Yes", "red"), ("audio", "No", "blue")):
        records.append({**record("pope", pope_answer, "yes", mode=mode, category="random"), "id": "p1"})
        records.append({"id": "t1", "mode": mode, "task": "open", "prediction": text_answer, "answer": "red",
                        "answers": ["red"] * 10, "score": 0.0, "bench": {"benchmark": "textvqa"}})
    report = benchmark_report(records)
    assert report["pope"]["vl"] == 100.0 and report["pope"]["va"] == 0.0 and report["pope"]["gap"] == 100.0
    assert report["textvqa"]["metric"] == "accuracy" and report["textvqa"]["gap"] == 100.0
    assert report["average"] == {"vl": 100.0, "va": 0.0, "gap": 100.0}
    table = format_table(report).splitlines()
    assert table[0].split() == ["benchmark", "metric", "VL", "VA", "gap"]
    assert table[1].split() == ["pope", "f1", "100.00", "0.00", "100.00"]
    assert table[-1].split() == ["average", "percent", "100.00", "0.00", "100.00"]
    assert aggregate([{**r, "score": 1.0} for r in records])["benchmarks"] == report


def test_an_unknown_benchmark_is_named():
    with pytest.raises(ValueError, match="unknown benchmark 'mmbench'"):
        benchmark_report([record("mmbench", "A", "A")])
