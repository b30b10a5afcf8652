"""Each benchmark scored by its own rule, typed (VL) and spoken (VA), and the paper-style table.

Records come from the evaluation harness (one per sample and mode, with the "bench" dict that
tools/make_eval_shards.py wrote into the shard: {"benchmark": name, ...grouping fields}).

  mme             per category over its images (two questions each): acc = share of right
                  answers, acc+ = share of images with both right; category score = 100 * (acc +
                  acc+) (at most 200). Perception = the sum over its 10 categories, cognition over
                  its 4; the total is the headline. Answers parsed as lmms-eval does (its
                  parse_pred_ans: "yes"/"no", or y/n, or yes/no in the first 4 characters).
  pope            accuracy, precision, recall and F1 with "yes" positive, and the share of "yes"
                  predictions, overall and per category (adversarial, popular, random); headline
                  F1. Answers parsed by LLaVA's rule (eval_pope.py): the first sentence says "no"
                  if it has the word "no" or "not", else "yes".
  textvqa         VQA soft accuracy against the 10 human answers (VQA normalisation,
                  leave-one-out average of min(1, matches / 3)).
  hallusionbench  yes/no correctness without a judge model (lmms-eval's non-GPT rule: "yes"
                  anywhere in the answer is yes); question accuracy (aAcc, the headline),
                  question-pair accuracy (qAcc: every figure's version of a question right) and
                  figure accuracy (fAcc: every question about a figure right; visual-supplement
                  questions without a figure excluded).
  scienceqa       option accuracy: the option named by letter or text (trainer/eval/scoring.py).

The table's average takes each headline in percent (MME: its total out of 200 per category
present, e.g. 2800 for all 14).
"""

from collections import defaultdict

from trainer.eval.scoring import MODES, choice_reference_index, parse_choice, vqa_soft_accuracy

BENCHMARKS = ("mme", "pope", "textvqa", "hallusionbench", "scienceqa")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
HEADLINES = {"mme": "total", "pope": "f1", "textvqa": "accuracy", "hallusionbench": "question_accuracy",
             "scienceqa": "accuracy"}


def mme_parse(prediction: str) -> str:
    """lmms-eval's MME answer parser: "yes", "no" or "other"."""
    text = str(prediction).lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def pope_parse(prediction: str) -> str:
    """LLaVA's POPE rule: the first sentence, commas removed, is "no" if it holds the word
    "no" or "not" (any case), else "yes"."""
    words = str(prediction).split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def _percent(numerator: float, denominator: float) -> float | None:
    return 100.0 * numerator / denominator if denominator else None


def score_mme(records: list[dict]) -> dict:
    by_category = defaultdict(lambda: defaultdict(list))  # category -> image -> [right]
    for r in records:
        bench = r["bench"]
        by_category[bench["category"]][bench["image_id"]].append(mme_parse(r["prediction"]) == r["answer"].lower())
    categories = {}
    incomplete = 0
    for category, images in sorted(by_category.items()):
        incomplete += sum(len(rights) != 2 for rights in images.values())
        acc = sum(sum(rights) / len(rights) for rights in images.values()) / len(images)
        acc_plus = sum(all(rights) for rights in images.values()) / len(images)
        categories[category] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * (acc + acc_plus),
                                "images": len(images)}
    perception = sum(c["score"] for name, c in categories.items() if name in MME_PERCEPTION)
    cognition = sum(c["score"] for name, c in categories.items() if name in MME_COGNITION)
    unknown = sorted(set(categories) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if unknown:
        raise ValueError(f"MME records with unknown categories {unknown}")
    return {"total": perception + cognition, "perception": perception, "cognition": cognition,
            "percent": _percent(perception + cognition, 200 * len(categories)),
            "categories": categories, "incomplete_pairs": incomplete, "n": len(records)}


def _yes_no_metrics(pairs: list[tuple[str, str]]) -> dict:
    """(prediction, truth) yes/no pairs -> accuracy, precision, recall, F1, yes share (percent)."""
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    precision, recall = _percent(tp, tp + fp), _percent(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    return {"accuracy": _percent(sum(p == t for p, t in pairs), len(pairs)), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": _percent(sum(p == "yes" for p, _ in pairs), len(pairs)), "n": len(pairs)}


def score_pope(records: list[dict]) -> dict:
    pairs = [(pope_parse(r["prediction"]), r["answer"].lower()) for r in records]
    report = _yes_no_metrics(pairs)
    by_category = defaultdict(list)
    for r, pair in zip(records, pairs):
        by_category[r["bench"]["category"]].append(pair)
    report["categories"] = {c: _yes_no_metrics(p) for c, p in sorted(by_category.items())}
    return report


def score_textvqa(records: list[dict]) -> dict:
    scores = [vqa_soft_accuracy(r["prediction"], r.get("answers") or [r["answer"]]) for r in records]
    return {"accuracy": _percent(sum(scores), len(scores)), "n": len(records)}


def score_hallusionbench(records: list[dict]) -> dict:
    right = []
    pairs, figures = defaultdict(list), defaultdict(list)
    for r in records:
        b = r["bench"]
        ok = ("yes" if "yes" in str(r["prediction"]).lower() else "no") == r["answer"].lower()
        right.append(ok)
        pairs[(b["category"], b["subcategory"], b["set_id"], b["question_id"])].append(ok)
        if not (b["category"] == "VS" and str(b["figure_id"]) == "0"):
            figures[(b["category"], b["subcategory"], b["set_id"], b["figure_id"])].append(ok)
    return {"question_accuracy": _percent(sum(right), len(right)),
            "pair_accuracy": _percent(sum(all(v) for v in pairs.values()), len(pairs)),
            "figure_accuracy": _percent(sum(all(v) for v in figures.values()), len(figures)), "n": len(records)}


def score_scienceqa(records: list[dict]) -> dict:
    right = [parse_choice(r["prediction"], r["choices"]) == choice_reference_index(r["answer"], r["choices"])
             for r in records]
    return {"accuracy": _percent(sum(right), len(right)), "n": len(records)}


SCORERS = {"mme": score_mme, "pope": score_pope, "textvqa": score_textvqa, "hallusionbench": score_hallusionbench,
           "scienceqa": score_scienceqa}


def headline_percent(name: str, metrics: dict) -> float | None:
    """A benchmark's headline in percent, for the table's average (MME: total of the maximum)."""
    return metrics["percent"] if name == "mme" else metrics[HEADLINES[name]]


def benchmark_report(records: list[dict]) -> dict:
    """{benchmark: {"metric", "vl", "va", "gap", "text": metrics, "audio": metrics}} for the
    records that carry a "bench" dict, plus "average" over the benchmarks present (percent)."""
    grouped = defaultdict(lambda: defaultdict(list))
    for r in records:
        bench = r.get("bench")
        if not bench:
            continue
        name = bench.get("benchmark")
        if name not in SCORERS:
            raise ValueError(f"sample {r.get('id')!r}: unknown benchmark {name!r}; known: {BENCHMARKS}")
        grouped[name][r["mode"]].append(r)
    report = {}
    for name, by_mode in sorted(grouped.items(), key=lambda item: BENCHMARKS.index(item[0])):
        entry = {"metric": HEADLINES[name]}
        for mode in MODES:
            if by_mode[mode]:
                entry[mode] = SCORERS[name](by_mode[mode])
        vl = entry["text"][HEADLINES[name]] if "text" in entry else None
        va = entry["audio"][HEADLINES[name]] if "audio" in entry else None
        entry.update(vl=vl, va=va, gap=None if vl is None or va is None else vl - va)
        report[name] = entry
    if report:
        average = {}
        for mode, key in (("text", "vl"), ("audio", "va")):
            values = [headline_percent(name, e[mode]) for name, e in report.items() if mode in e]
            average[key] = sum(values) / len(values) if values else None
        average["gap"] = None if None in (average["vl"], average["va"]) else average["vl"] - average["va"]
        report["average"] = average
    return report


def format_table(report: dict) -> str:
    """The paper-style table: benchmark x (VL, VA, gap), and the average in percent."""
    lines = [f"{'benchmark':<16}{'metric':<20}{'VL':>9}{'VA':>9}{'gap':>9}"]

    def cell(value):
        return f"{value:9.2f}" if value is not None else f"{'n/a':>9}"

    for name, entry in report.items():
        if name == "average":
            continue
        lines.append(f"{name:<16}{entry['metric']:<20}{cell(entry['vl'])}{cell(entry['va'])}{cell(entry['gap'])}")
    if "average" in report:
        avg = report["average"]
        lines.append(f"{'average':<16}{'percent':<20}{cell(avg['vl'])}{cell(avg['va'])}{cell(avg['gap'])}")
    return "\n".join(lines)
