"""The evaluation report over many scored samples: VL and VA in points out of 100, the gap,
per task and per source, the spoken-question yes bias, the answers of the right kind, the
corpus WER and each benchmark by its own rule (benchmarks.py); and over many runs, the mean
with its 95% interval (mean_ci95). Above scoring.py (one sample's rules) and benchmarks.py,
which never import it."""

import math
from collections import defaultdict

from trainer.eval.benchmarks import benchmark_report
from trainer.eval.scoring import MODES, answer_kind, corpus_word_error_rate


def _mean_points(scores: list[float]) -> float | None:
    return 100.0 * sum(scores) / len(scores) if scores else None


def _summary(records: list[dict]) -> dict:
    by_mode = defaultdict(list)
    for r in records:
        by_mode[r["mode"]].append(float(r["score"]))
    vl = _mean_points(by_mode["text"])
    va = _mean_points(by_mode["audio"])
    return {
        "vl_score": vl,
        "va_score": va,
        "gap": None if vl is None or va is None else vl - va,
        "n": len({r["id"] for r in records}),
    }


def _kind_rates(records: list[dict]) -> dict:
    """Share (points) of answers of the reference's kind, per mode ("vl_kind_rate",
    "va_kind_rate"), over the records whose reference has a known kind (scoring.answer_kind);
    empty when none has."""
    right = defaultdict(list)
    for r in records:
        expected = answer_kind(r.get("answer", ""), r.get("choices"))
        if expected != "other" and "prediction" in r:
            right[r["mode"]].append(float(answer_kind(r["prediction"], r.get("choices")) == expected))
    return {key: _mean_points(right[mode]) for mode, key in (("text", "vl_kind_rate"), ("audio", "va_kind_rate"))
            if right[mode]}


def aggregate(records: list[dict]) -> dict:
    """Report from per-sample records ({"id", "task", "mode": text|audio, "score" in [0,1],
    optional "source", optional "parsed"}): scores in points out of 100, gap = vl - va,
    n = distinct samples; broken down by task and (when records carry one) by source.
    For yes/no tasks the share of "yes" answers per mode shows the spoken-question yes bias.
    Records with a "prediction" and an "answer" add, per task and source, the share of answers
    of the right kind per mode (vl_kind_rate, va_kind_rate: a colour for a colour, a number for
    a count...), and ASR records (task "asr") the corpus word error rate per mode
    (report["wer"] = {"text": ..., "audio": ...}, a fraction)."""
    unknown = sorted({r["mode"] for r in records} - set(MODES))
    if unknown:
        raise ValueError(f"records with unknown mode(s) {unknown}; expected {MODES}")
    report = _summary(records)
    by_task = defaultdict(list)
    by_source = defaultdict(list)
    for r in records:
        by_task[r.get("task") or "open"].append(r)
        if r.get("source"):
            by_source[r["source"]].append(r)
    report["by_task"] = {task: {**_summary(rs), **_kind_rates(rs)} for task, rs in sorted(by_task.items())}
    if "asr" in by_task:
        report["wer"] = {mode: corpus_word_error_rate([(r["prediction"], r["answer"]) for r in by_task["asr"]
                                                       if r["mode"] == mode and "prediction" in r])
                         for mode in MODES if any(r["mode"] == mode for r in by_task["asr"])}
    if "yesno" in by_task:
        for mode, key in (("text", "vl_yes_rate"), ("audio", "va_yes_rate")):
            answers = [r.get("parsed") for r in by_task["yesno"] if r["mode"] == mode]
            report["by_task"]["yesno"][key] = _mean_points([float(a == "yes") for a in answers])
    if by_source:
        report["by_source"] = {src: {**_summary(rs), **_kind_rates(rs)} for src, rs in sorted(by_source.items())}
    if any(r.get("bench") for r in records):  # benchmark shards: each scored by its own rule
        report["benchmarks"] = benchmark_report(records)
    return report


# Two-sided 95% Student t critical values by degrees of freedom (1..30); 1.96 beyond.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci95(values: list[float]) -> dict:
    """Mean, sample standard deviation and the half-width of the 95% t interval (None for n < 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T95[n - 2] if n - 1 <= len(T95) else 1.96
    return {"n": n, "mean": mean, "std": std, "ci95": t * std / math.sqrt(n)}
