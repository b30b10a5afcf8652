"""The paper's mechanism, measured on a finished recipe grid (tools/compare_recipes.py): does
Self-KD make the spoken question look at the picture the way the typed one does?

For the start, every run of the grid's first recipe (the baseline, SFT) and every run of the best
other recipe (the highest mean VA paired against the baseline; --recipe names another), per layer:
the attention share from the question's tokens to the image tokens, typed and spoken (measured
as tools/attention_analysis.py does: reference answer teacher-forced, the first --limit held-out
samples). A model's attention gap is the mean over layers of typed minus spoken; a run's
shrink is the start's gap minus the run's. The verdict pairs the two recipes by seed: the best
recipe's shrink minus the baseline's, mean and 95% Student t interval. Also the "yes" share on
yes/no questions typed and spoken (each run's eval/report.json).

    python tools/study_mechanism.py --start docs/results/selfkd_vs_sft_v2/start --grid_out study_v2_out/scarce \
        --budget scarce --shards 'study_v2_out/data/shards/heldout/shard-{000000..000000}.tar' --out study_v2_out/mechanism
Writes OUT/mechanism.json and OUT/mechanism.png (question -> image per layer, typed solid and spoken
dashed, for the start and each recipe's mean over seeds; the attention gap per run; the yes share).
"""

import argparse
import json
import os

import torch

from trainer.eval.attention import model_attention
from trainer.eval.report import mean_ci95

SHARE = "question->image"


def attention_gap(shares: dict) -> float:
    """Mean over layers of the typed minus the spoken question->image share."""
    typed, spoken = shares["typed"][SHARE], shares["spoken"][SHARE]
    return sum(t - s for t, s in zip(typed, spoken)) / len(typed)


def best_recipe(summary: dict, baseline: str) -> str:
    """The recipe with the highest mean VA paired against the baseline."""
    paired = {name: e["va_paired"]["mean"] for name, e in summary.items() if name != baseline and "va_paired" in e}
    if not paired:
        raise ValueError(f"no recipe has runs paired with {baseline!r}: nothing to compare")
    return max(paired, key=paired.get)


def _yes(report: dict) -> dict:
    yesno = report.get("by_task", {}).get("yesno", {})
    return {"typed": yesno.get("vl_yes_rate"), "spoken": yesno.get("va_yes_rate")}


def measure(start: str, grid_out: str, budget: str, shards: str, *, limit: int, recipe: str | None = None,
            start_report: str | None = None) -> dict:
    with open(os.path.join(grid_out, "results.json")) as f:
        document = json.load(f)
    recipes = list(document["grid"]["recipes"])
    baseline = recipes[0]
    summary = document["summary"].get(budget)
    if not summary:
        raise ValueError(f"{grid_out}/results.json has no finished run in budget {budget!r}")
    chosen = recipe or best_recipe(summary, baseline)
    if chosen not in recipes:
        raise ValueError(f"--recipe {chosen!r} is not in the grid's recipes {recipes}")
    dtype, device = torch.float32, torch.device("cpu")
    start_shares = model_attention(start, shards, limit=limit, max_seq_len=4096, dtype=dtype, device=device)
    out = {"budget": budget, "baseline": baseline, "recipe": chosen, "limit": limit,
           "start": {"dir": start, "shares": start_shares["shares"], "gap": attention_gap(start_shares["shares"])},
           "runs": {}}
    if start_report:
        with open(start_report) as f:
            out["start"]["yes"] = _yes(json.load(f))
    for name in (baseline, chosen):
        runs = sorted((r for r in document["runs"] if r["budget"] == budget and r["recipe"] == name),
                      key=lambda r: r["seed"])
        out["runs"][name] = {}
        for run in runs:
            run_dir = os.path.join(grid_out, "runs", budget, name, f"seed{run['seed']}")
            shares = model_attention(os.path.join(run_dir, "export"), shards, limit=limit, max_seq_len=4096, dtype=dtype,
                             device=device)["shares"]
            with open(os.path.join(run_dir, "eval", "report.json")) as f:
                yes = _yes(json.load(f))
            gap = attention_gap(shares)
            out["runs"][name][str(run["seed"])] = {"shares": shares, "gap": gap, "shrink": out["start"]["gap"] - gap,
                                                   "va": run["va"], "yes": yes}
    base, best = out["runs"][baseline], out["runs"][chosen]
    seeds = sorted(set(base) & set(best), key=int)
    out["shrink_paired"] = {**mean_ci95([best[s]["shrink"] - base[s]["shrink"] for s in seeds]), "seeds": seeds} \
        if seeds else None
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (layers, gaps, yes) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [3, 2, 2]})
    models = {"start": [result["start"]["shares"]]}
    for name, runs in result["runs"].items():
        models[name] = [r["shares"] for r in runs.values()]
    for i, (label, shares) in enumerate(models.items()):
        for mode, style in (("typed", "-"), ("spoken", "--")):
            curves = [s[mode][SHARE] for s in shares]
            mean = [sum(v) / len(v) for v in zip(*curves)]
            layers.plot(range(len(mean)), mean, style, color=f"C{i}", marker="o", markersize=3, label=f"{label} {mode}")
    layers.set_xlabel("layer")
    layers.set_ylabel("attention share, question -> image")
    layers.set_title("question -> image (mean over seeds)")
    layers.legend(fontsize=7)
    for i, (name, runs) in enumerate(result["runs"].items()):
        seeds = sorted(runs, key=int)
        gaps.plot([int(s) for s in seeds], [runs[s]["gap"] for s in seeds], "o-", color=f"C{i + 1}", label=name)
    gaps.axhline(result["start"]["gap"], color="C0", linestyle=":", label="start")
    gaps.set_xlabel("seed")
    gaps.set_ylabel("typed - spoken share (mean over layers)")
    gaps.set_title("attention gap per run")
    gaps.legend(fontsize=7)
    labels, typed, spoken = [], [], []
    if result["start"].get("yes"):
        labels.append("start")
        typed.append(result["start"]["yes"]["typed"] or 0.0)
        spoken.append(result["start"]["yes"]["spoken"] or 0.0)
    for name, runs in result["runs"].items():
        labels.append(name)
        typed.append(sum(r["yes"]["typed"] or 0.0 for r in runs.values()) / max(1, len(runs)))
        spoken.append(sum(r["yes"]["spoken"] or 0.0 for r in runs.values()) / max(1, len(runs)))
    xs = range(len(labels))
    yes.bar([x - 0.2 for x in xs], typed, 0.4, label="typed")
    yes.bar([x + 0.2 for x in xs], spoken, 0.4, label="spoken")
    yes.axhline(50, color="grey", linestyle=":", linewidth=1)
    yes.set_xticks(list(xs), labels, rotation=20, ha="right")
    yes.set_ylabel('"yes" share on yes/no questions (%)')
    yes.set_title("yes bias (half the answers are yes)")
    yes.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", required=True, help="the exported start every run began from")
    parser.add_argument("--grid_out", required=True, help="tools/compare_recipes.py --out of the finished grid")
    parser.add_argument("--budget", required=True, help="the grid budget to measure")
    parser.add_argument("--shards", required=True, help="held-out evaluation shards")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--limit", type=int, default=100, help="samples to average over")
    parser.add_argument("--recipe", default=None, help="the recipe to set against the baseline (default: the best)")
    parser.add_argument("--start_report", default=None, help="the start's evaluate.py report (for its yes share)")
    args = parser.parse_args(argv)
    result = measure(args.start, args.grid_out, args.budget, args.shards, limit=args.limit, recipe=args.recipe,
                     start_report=args.start_report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mechanism.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "mechanism.png"))
    paired = result["shrink_paired"]
    verdict = "n/a" if paired is None else (
        f"{paired['mean']:+.4f}" + ("" if paired["ci95"] is None else f" ± {paired['ci95']:.4f}"))
    print(f"attention gap (typed - spoken, question -> image, mean over layers): start {result['start']['gap']:.4f}; "
          f"{result['recipe']} shrinks it more than {result['baseline']} by {verdict} (paired by seed) -> "
          f"{os.path.join(args.out, 'mechanism.json')}, mechanism.png", flush=True)
    return result


if __name__ == "__main__":
    main()
