"""The evaluation report over many scored samples: VL and VA in points out of 100, the gap,
per task and per source, the spoken-question yes bias, and each benchmark by its own rule
(benchmarks.py). Above scoring.py (one sample's rules) and benchmarks.py, which never import it."""

from collections import defaultdict

from trainer.eval.benchmarks import benchmark_report
from trainer.eval.scoring import MODES


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


def aggregate(records: list[dict]) -> dict:
    """Report from per-sample records ({"id", "task", "mode": text|audio, "score" in [0,1],
    optional "source", optional "parsed"}): scores in points out of 100, gap = vl - va,
    n = distinct samples; broken down by task and (when records carry one) by source.
    For yes/no tasks the share of "yes" answers per mode shows the spoken-question yes bias."""
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
    report["by_task"] = {task: _summary(rs) for task, rs in sorted(by_task.items())}
    if "yesno" in by_task:
        for mode, key in (("text", "vl_yes_rate"), ("audio", "va_yes_rate")):
            answers = [r.get("parsed") for r in by_task["yesno"] if r["mode"] == mode]
            report["by_task"]["yesno"][key] = _mean_points([float(a == "yes") for a in answers])
    if by_source:
        report["by_source"] = {src: _summary(rs) for src, rs in sorted(by_source.items())}
    if any(r.get("bench") for r in records):  # benchmark shards: each scored by its own rule
        report["benchmarks"] = benchmark_report(records)
    return report
