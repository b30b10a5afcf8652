"""The report of a start model for a Self-KD study: can it read (VL), hear (held-out WER), and
does it have a vision-audio gap to close, answered in the right form? Reads the two reports of
tools/evaluate.py (the questions typed and spoken; --transcribe on held-out sentences), writes
one JSON with the figures and each target's verdict, prints a table and exits 1 when a target
is missed (the study must not run from such a start).

    python tools/start_report.py --answers start/eval/report.json --transcribe start/eval/transcribe.json \
        --out start/eval/start_report.json

Targets (the defaults are the ones docs/study.md fixes for study v2): VL >= --min_vl; corpus WER
of the spoken held-out sentences <= --max_wer; a gap: VA <= VL - --min_gap; for every task
(source), at least --min_kind of the spoken answers of the right kind (a colour for a colour
question, a count, a position, yes/no, an option: trainer.eval.scoring.answer_kind).

--exclude_sentences FILE (a JSON list of sentences): the WER target is scored on the held-out
sentences outside the list only, read from the transcription's predictions file beside its
report (report.predictions.jsonl); the WER of all of them is kept as `wer_spoken_all`. Study v2's
start lineage was trained on data that spoke some held-out sentences
(docs/results/selfkd_vs_sft_v2/once_spoken_heldout.json), so its scripts pass that list.
"""

import argparse
import json
import os
import sys


def spoken_wer_without(predictions: list[dict], excluded: set) -> tuple[float, int]:
    """Corpus WER of the spoken transcriptions whose reference is not in `excluded`, and their count."""
    from trainer.eval.scoring import corpus_word_error_rate

    pairs = [(r["prediction"], r["answer"]) for r in predictions if r["mode"] == "audio" and r["answer"] not in excluded]
    if not pairs:
        raise ValueError("every held-out sentence is excluded: no WER to score")
    return corpus_word_error_rate(pairs), len(pairs)


def start_report(answers: dict, transcribe: dict, *, min_vl: float, max_wer: float, min_gap: float,
                 min_kind: float, transcriptions: list[dict] | None = None, excluded: set | None = None) -> dict:
    """The figures of the two evaluate.py reports and the verdict of each target. With `excluded`
    sentences, the WER is that of the other held-out sentences (`transcriptions`: the
    transcription report's predictions)."""
    wer = dict(transcribe.get("wer", {}))
    if wer.get("audio") is None:
        raise ValueError("the transcription report has no spoken WER (report['wer']['audio']): was it written by "
                         "tools/evaluate.py --transcribe with the audio mode?")
    wer_all, wer_n = wer["audio"], transcribe["n"]
    if excluded:
        wer["audio"], wer_n = spoken_wer_without(transcriptions, excluded)
    for key in ("vl_score", "va_score"):
        if answers.get(key) is None:
            raise ValueError(f"the answers report has no {key}: score the questions typed and spoken")
    groups = answers.get("by_source") or answers["by_task"]
    tasks = {name: {"vl": g["vl_score"], "va": g["va_score"], "vl_kind": g.get("vl_kind_rate"),
                    "va_kind": g.get("va_kind_rate"), **({"vl_yes": g["vl_yes_rate"], "va_yes": g["va_yes_rate"]}
                                                         if "vl_yes_rate" in g else {})}
             for name, g in sorted(groups.items())}
    yesno = answers["by_task"].get("yesno", {})
    kinds = {name: t["va_kind"] for name, t in tasks.items() if t["va_kind"] is not None}
    targets = {
        "vl": {"value": answers["vl_score"], "bound": f">= {min_vl}", "met": answers["vl_score"] >= min_vl},
        "wer": {"value": 100 * wer["audio"], "bound": f"<= {100 * max_wer}", "met": wer["audio"] <= max_wer},
        "gap": {"value": answers["gap"], "bound": f">= {min_gap}", "met": answers["gap"] >= min_gap},
        "spoken_kind": {"value": min(kinds.values()) if kinds else None, "bound": f">= {100 * min_kind} in every task",
                        "met": bool(kinds) and min(kinds.values()) >= 100 * min_kind},
    }
    return {
        "vl": answers["vl_score"], "va": answers["va_score"], "gap": answers["gap"], "n": answers["n"],
        "wer_spoken": wer["audio"], "wer_typed": wer.get("text"), "wer_n": wer_n,
        **({"wer_spoken_all": wer_all, "wer_excluded": len(excluded)} if excluded else {}),
        "yes_share": {"typed": yesno.get("vl_yes_rate"), "spoken": yesno.get("va_yes_rate")},
        "tasks": tasks, "targets": targets, "met": all(t["met"] for t in targets.values()),
    }


def format_report(report: dict) -> str:
    def cell(value, fmt="{:.1f}"):
        return "n/a" if value is None else fmt.format(value)

    lines = [f"VL {cell(report['vl'])} | VA {cell(report['va'])} | gap {cell(report['gap'])} (n={report['n']}) | "
             f"held-out WER spoken {cell(100 * report['wer_spoken'])}%, typed twin "
             f"{cell(None if report['wer_typed'] is None else 100 * report['wer_typed'])}% (n={report['wer_n']})",
             "| task | VL | VA | right kind typed | right kind spoken | yes typed | yes spoken |",
             "|---|---|---|---|---|---|---|"]
    for name, t in report["tasks"].items():
        lines.append(f"| {name} | {cell(t['vl'])} | {cell(t['va'])} | {cell(t['vl_kind'])} | {cell(t['va_kind'])} | "
                     f"{cell(t.get('vl_yes'))} | {cell(t.get('va_yes'))} |")
    for name, t in report["targets"].items():
        lines.append(f"target {name}: {cell(t['value'])} (needed {t['bound']}): {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", required=True, help="tools/evaluate.py report of the held-out questions")
    parser.add_argument("--transcribe", required=True, help="tools/evaluate.py --transcribe report")
    parser.add_argument("--out", required=True, help="the combined report (JSON)")
    parser.add_argument("--min_vl", type=float, default=70.0)
    parser.add_argument("--max_wer", type=float, default=0.10, help="a fraction")
    parser.add_argument("--min_gap", type=float, default=15.0)
    parser.add_argument("--min_kind", type=float, default=0.80, help="a fraction")
    parser.add_argument("--exclude_sentences", default=None,
                        help="JSON list of held-out sentences the WER target leaves out (spoken in the training data)")
    args = parser.parse_args(argv)
    reports = []
    for path in (args.answers, args.transcribe):
        with open(path) as f:
            reports.append(json.load(f))
    extra = {}
    if args.exclude_sentences:
        with open(args.exclude_sentences) as f:
            extra["excluded"] = set(json.load(f))
        stem = args.transcribe[: -len(".json")] if args.transcribe.endswith(".json") else args.transcribe
        with open(stem + ".predictions.jsonl") as f:  # tools/evaluate.py writes it beside the report
            extra["transcriptions"] = [json.loads(line) for line in f if line.strip()]
    report = start_report(*reports, min_vl=args.min_vl, max_wer=args.max_wer, min_gap=args.min_gap,
                          min_kind=args.min_kind, **extra)
    report["inputs"] = {"answers": args.answers, "transcribe": args.transcribe,
                        "exclude_sentences": args.exclude_sentences}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(format_report(report), flush=True)
    return 0 if report["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
