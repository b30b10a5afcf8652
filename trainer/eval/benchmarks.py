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
  textvqa         VQA soft accuracy against the 10 human answers: prediction and answers
                  normalised by the EvalAI answer processor's rules (evalai_normalize), then the
                  leave-one-out average of min(1, matches / 3), as lmms-eval scores it.
  hallusionbench  yes/no correctness without a judge model (lmms-eval's non-GPT rule: "yes"
                  anywhere in the answer is yes); question accuracy (aAcc, the headline),
                  question-pair accuracy (qAcc: every figure's version of a question right) and
                  figure accuracy (fAcc: every question about a figure right; visual-supplement
                  questions without a figure excluded).
  scienceqa       option accuracy by lmms-eval's (LLaVA's) rule: the stripped answer is the option
                  letter (any case), or starts with the upper-case letter and a period ("B. ...");
                  anything else is wrong (an option's text alone does not count).

The table's average takes each headline in percent (MME: its total out of 200 per category
present, e.g. 2800 for all 14).
"""

from collections import defaultdict

import re

from trainer.eval.scoring import MODES, choice_reference_index, vqa_soft_accuracy

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


# The EvalAI / VQA answer processor's tables: number words up to ten, articles, the
# punctuation it strips, and the contractions it restores (the official VQA list).
EVALAI_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
EVALAI_ARTICLES = ("a", "an", "the")
EVALAI_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                      "?", "!")
# Restored forms of apostrophe-less words ("dont" -> "don't"), as the VQA evaluation lists them.
EVALAI_CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't
havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've
I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am
mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at
shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd
someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's
somethingd:something'd somethingd've:something'd've something'dve:something'd've somethingll:something'll
thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's
theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's
whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've
who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't
wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll
y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've""".split())
_EVALAI_DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")
_EVALAI_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, so "2." loses its period too


def evalai_normalize(text: str) -> str:
    """An answer as the EvalAI answer processor (the VQA / TextVQA evaluation, used by
    lmms-eval) normalises it, quirks included: lower case; commas and "?" dropped and "'s"
    split off; each listed punctuation mark deleted if the text has it beside a space or has a
    digit-comma-digit, else replaced by a space; periods not before a digit deleted (at most
    32 of them: the original passes re.UNICODE as the count); number words -> digits,
    articles dropped, contractions restored."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in EVALAI_PUNCTUATION:
        if mark + " " in text or " " + mark in text or _EVALAI_DIGIT_COMMA.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _EVALAI_PERIOD.sub("", out, count=re.UNICODE)
    words = [EVALAI_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(EVALAI_CONTRACTIONS.get(w, w) for w in words if w not in EVALAI_ARTICLES)


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """lmms-eval's TextVQA score of one prediction: EvalAI-normalised, for each human answer
    left out min(1, matches among the others / 3), averaged (1.0 = at least 4 of 10 annotators
    agree). Fewer than 10 answers (a converted subset) use scoring.vqa_soft_accuracy's bar,
    min(3, k - 1): a single answer is an exact match, not a silent 0."""
    return vqa_soft_accuracy(prediction, answers, normalize=evalai_normalize)


def scienceqa_right(prediction: str, letter: str) -> bool:
    """lmms-eval's ScienceQA rule: the stripped prediction is the option letter (any case),
    or begins with the upper-case letter and a period."""
    pred = str(prediction).strip()
    if pred.lower() == letter.lower():
        return True
    return len(pred) >= 2 and pred[0].isupper() and pred[1] == "." and pred[0].lower() == letter.lower()


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
    scores = [textvqa_accuracy(r["prediction"], r.get("answers") or [r["answer"]]) for r in records]
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
    right = [scienceqa_right(r["prediction"], chr(ord("A") + choice_reference_index(r["answer"], r["choices"])))
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
