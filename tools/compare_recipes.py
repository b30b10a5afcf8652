"""Compare training recipes fairly: a grid of recipes x training budgets x seeds, each a normal
trainer/main.py run through the deepspeed launcher from the same starting model, each exported
and scored typed (VL) and spoken (VA) on the same held-out shards.

    python tools/compare_recipes.py --grid launch_scripts/grids/study_selfkd_vs_sft.yaml --out runs/study \
        --start demo_out/export_vl --heldout_shards 'demo_out/data/shards/heldout/shard-{000000..000001}.tar' \
        --budget full='demo_out/data/shards/train/shard-{000000..000007}.tar'
    python tools/compare_recipes.py --grid GRID --out runs/study --dry_run      # print the runs' commands
    python tools/compare_recipes.py --grid GRID --out runs/study --report_only  # table and plot from finished runs

The grid file (YAML):
    start: DIR                  # the model every run starts from (--model); --start overrides
    heldout_shards: SPEC        # scored typed and spoken after each run; --heldout_shards overrides
    budgets: {NAME: SPEC}       # training shard sets (e.g. the full train split and 10% of it); --budget NAME=SPEC
    seeds: [0, 1, 2]            # --seeds 0,1,2 overrides
    num_gpus: 2                 # ranks per run (CPU ranks over gloo where there is no GPU); --num_gpus
    common: {FLAG: VALUE}       # trainer flags every run shares (steps, lr, trainable parts, batch, ...)
    recipes: {NAME: {FLAG: VALUE}}   # what differs: kd_alpha, teacher, ...
    eval: {FLAG: VALUE}         # tools/evaluate.py flags (optional: batch_size, max_new_tokens, ...)
Everything but the recipe's own flags is the same for every run: a recipe may not set the
flags the grid owns (model, train_shards, seed, save_dir, log_dir, resume). Relative paths are
taken from the directory the tool runs in, as trainer/main.py takes them.

Each run lives in OUT/runs/BUDGET/RECIPE/seedS/: run.yaml (its whole trainer config, passed as
--config), train.log, ckpt/, tb/ (TensorBoard and metrics.jsonl), export/, eval/report.json and,
written last, result.json. Resumable: a run with a result.json for the same config is not redone;
an unfinished one continues from its newest complete checkpoint (--resume auto). A failed run
stops the grid with its log's tail. Outputs (rewritten after every run):
    OUT/results.json   every run (recipe, budget, seed, steps, VL, VA, gap, by task, the training
                       signals at the end: CE, KD, teacher CE, agreement, teacher answer entropy)
                       and per budget and recipe the mean and 95% confidence interval (Student t)
    OUT/results.md     that table
    OUT/results.png    VA by recipe with its interval per budget, and VA against kd_alpha for the
                       recipes that differ from the first only in kd_alpha
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import yaml

from trainer.eval.report import mean_ci95

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID_OWNED = ("model", "train_shards", "seed", "save_dir", "log_dir", "resume", "config")
GRID_KEYS = ("start", "heldout_shards", "budgets", "seeds", "num_gpus", "common", "recipes", "eval")
# Training signals averaged over the logged steps in the last SIGNAL_TAIL share of a run.
SIGNALS = ("train/ce_loss", "train/kd_loss", "train/teacher_ce", "train/agreement", "train/teacher_entropy")
SIGNAL_TAIL = 0.2
class GridError(ValueError):
    pass


# --- the grid -----------------------------------------------------------------------------------

def load_grid(path: str, overrides: dict) -> dict:
    with open(path) as f:
        grid = yaml.safe_load(f) or {}
    if not isinstance(grid, dict):
        raise GridError(f"{path}: expected a mapping, got {type(grid).__name__}")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"{path}: unknown key(s) {unknown}; known: {list(GRID_KEYS)}")
    grid = {"common": {}, "eval": {}, "num_gpus": 1, "seeds": [0], "budgets": {}, **grid}
    for key, value in overrides.items():
        if value is None:
            continue
        grid[key] = {**grid.get(key, {}), **value} if key == "budgets" else value
    for key in ("start", "heldout_shards"):
        if not grid.get(key):
            raise GridError(f"{path}: no {key} (set it in the file or pass --{key})")
    if not grid["budgets"]:
        raise GridError(f"{path}: no budgets (NAME: train shard spec; or pass --budget NAME=SPEC)")
    if not isinstance(grid.get("recipes"), dict) or not grid["recipes"]:
        raise GridError(f"{path}: no recipes (NAME: {{flag: value}})")
    for name, flags in [("common", grid["common"]), ("eval", grid["eval"])] + list(grid["recipes"].items()):
        if not isinstance(flags, dict):
            raise GridError(f"{path}: {name} must map flags to values, got {flags!r}")
    for name, flags in [("common", grid["common"])] + list(grid["recipes"].items()):
        owned = sorted(set(flags) & set(GRID_OWNED))
        if owned:
            raise GridError(f"{path}: {name} sets {owned}, which the grid owns (one start, budget and seed per run)")
    if not grid["seeds"] or not all(isinstance(s, int) for s in grid["seeds"]):
        raise GridError(f"{path}: seeds must be a list of integers, got {grid['seeds']!r}")
    return grid


def planned_runs(grid: dict, out_dir: str) -> list[dict]:
    """One entry per (budget, recipe, seed): its directory and its whole trainer config."""
    runs = []
    for budget, train_shards in grid["budgets"].items():
        for recipe, flags in grid["recipes"].items():
            for seed in grid["seeds"]:
                run_dir = os.path.join(out_dir, "runs", budget, recipe, f"seed{seed}")
                config = {**grid["common"], **flags, "model": grid["start"], "train_shards": train_shards,
                          "seed": seed, "save_dir": os.path.join(run_dir, "ckpt"),
                          "log_dir": os.path.join(run_dir, "tb")}
                runs.append({"budget": budget, "recipe": recipe, "seed": seed, "dir": run_dir, "config": config})
    return runs


# --- one run --------------------------------------------------------------------------------------

def _flag_args(flags: dict) -> list[str]:
    args = []
    for key, value in flags.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = str(value).lower()
        args += [f"--{key}", str(value)]
    return args


def _deepspeed() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return beside if os.path.exists(beside) else "deepspeed"


def run_commands(run: dict, grid: dict, port: int) -> list[tuple[str, list[str]]]:
    """(log name, command) for training, export and evaluation of one run."""
    d = run["dir"]
    train = [sys.executable, "-m", "trainer.supervise", "--", _deepspeed(), "--num_gpus", str(grid["num_gpus"]),
             "--master_port", str(port), os.path.join(ROOT, "trainer", "main.py"),
             "--config", os.path.join(d, "run.yaml"), "--resume", "auto"]
    export = [sys.executable, os.path.join(ROOT, "tools", "export_hf.py"),
              "--checkpoint", os.path.join(d, "ckpt"), "--out", os.path.join(d, "export")]
    evaluate = [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--model", os.path.join(d, "export"),
                "--shards", grid["heldout_shards"], "--out", os.path.join(d, "eval", "report.json"),
                *_flag_args(grid["eval"])]
    return [("train.log", train), ("export.log", export), ("eval.log", evaluate)]


def _run_logged(command: list[str], log_path: str, env: dict) -> None:
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    if code != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(command[:6])} ... exited {code}; log {log_path}:\n{tail}")


def training_signals(metrics_path: str) -> dict:
    """The last step reached and, per signal, its mean over the logged steps in the last
    SIGNAL_TAIL of the run (after step 160 of 200). A resumed run logs again the steps after its
    checkpoint (a restart without one, every step): each step counts once, with the record of
    the attempt the run went on from."""
    records, unreadable = [], []
    with open(metrics_path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write, the next start's appended to it
                unreadable.append(number)
                continue
            if "train/loss" in record:
                while records and records[-1]["step"] >= record["step"]:
                    records.pop()  # logged before a resume from an earlier step: not the run's history
                records.append(record)
    if unreadable:
        print(f"{metrics_path}: skipped {len(unreadable)} unreadable line(s) (not JSON): {unreadable[:10]}",
              file=sys.stderr)
    if not records:
        raise RuntimeError(f"{metrics_path}: no training step logged")
    last = records[-1]["step"]
    tail = [r for r in records if r["step"] > (1 - SIGNAL_TAIL) * last]  # the last record always
    signals = {}
    for name in SIGNALS:
        values = [r[name] for r in tail if r.get(name) is not None]
        signals[name.split("/", 1)[1]] = sum(values) / len(values) if values else None
    return {"steps": records[-1]["step"], "signals": signals}


def execute(run: dict, grid: dict, port: int, env: dict, prune: bool) -> dict:
    d = run["dir"]
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "run.yaml"), "w") as f:
        yaml.safe_dump(run["config"], f, sort_keys=False)
    for log_name, command in run_commands(run, grid, port):
        _run_logged(command, os.path.join(d, log_name), env)
    with open(os.path.join(d, "eval", "report.json")) as f:
        report = json.load(f)
    result = {"budget": run["budget"], "recipe": run["recipe"], "seed": run["seed"],
              **training_signals(os.path.join(d, "tb", "metrics.jsonl")),
              "vl": report["vl_score"], "va": report["va_score"], "gap": report["gap"], "n": report["n"],
              "by_task": report["by_task"], "config": run["config"]}
    if prune:
        shutil.rmtree(os.path.join(d, "ckpt"), ignore_errors=True)
    tmp = os.path.join(d, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(d, "result.json"))  # the run's done marker
    return result


def finished_result(run: dict) -> dict | None:
    path = os.path.join(run["dir"], "result.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    if result.get("config") != run["config"]:
        raise GridError(f"{path}: finished with another config than the grid now gives; move {run['dir']} "
                        "away (or use another --out) to run it again")
    return result


# --- results ---------------------------------------------------------------------------------------

def summarize(results: list[dict], grid: dict) -> dict:
    """{budget: {recipe: {"vl", "va", "gap": mean_ci95, "signals": means}}} in the grid's order.
    Every recipe but the grid's first also gets "va_paired": its VA minus the first recipe's VA of
    the same seed (same data order and new weights), mean_ci95 over the seeds both finished: seeds
    differ a lot on a small model, and pairing takes out what they share."""
    baseline = next(iter(grid["recipes"]))
    summary = {}
    for budget in grid["budgets"]:
        summary[budget] = {}
        base_va = {r["seed"]: r["va"] for r in results if r["budget"] == budget and r["recipe"] == baseline}
        for recipe in grid["recipes"]:
            runs = [r for r in results if r["budget"] == budget and r["recipe"] == recipe]
            if not runs:
                continue
            entry = {key: mean_ci95([r[key] for r in runs]) for key in ("vl", "va", "gap")}
            paired = [r["va"] - base_va[r["seed"]] for r in runs if r["seed"] in base_va]
            if recipe != baseline and paired:
                entry["va_paired"] = {**mean_ci95(paired), "baseline": baseline}
            signals = {}
            for name in runs[0]["signals"]:
                values = [r["signals"][name] for r in runs if r["signals"].get(name) is not None]
                signals[name] = sum(values) / len(values) if values else None
            entry["signals"] = signals
            summary[budget][recipe] = entry
    return summary


def format_table(summary: dict) -> str:
    def cell(stat):
        if stat is None:
            return "-"
        if stat["ci95"] is None:
            return f"{stat['mean']:.1f}"
        return f"{stat['mean']:.1f} ± {stat['ci95']:.1f}"

    def signal(value):
        return "n/a" if value is None else f"{value:.3f}"

    lines = ["| budget | recipe | runs | VL | VA | gap | VA - baseline, paired | teacher CE | agreement | teacher entropy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for budget, recipes in summary.items():
        for recipe, e in recipes.items():
            s = e["signals"]
            lines.append(f"| {budget} | {recipe} | {e['va']['n']} | {cell(e['vl'])} | {cell(e['va'])} | "
                         f"{cell(e['gap'])} | {cell(e.get('va_paired'))} | {signal(s.get('teacher_ce'))} | "
                         f"{signal(s.get('agreement'))} | {signal(s.get('teacher_entropy'))} |")
    notes = "\n\nmean ± half-width of the 95% Student t interval over seeds"
    baseline = next((e["va_paired"]["baseline"] for recipes in summary.values() for e in recipes.values()
                     if "va_paired" in e), None)  # the grid's first recipe, where any other has paired runs
    if baseline:
        notes += (f"; VA - baseline, paired: the run's VA minus the same seed's {baseline} "
                  "run's, over the seeds both have")
    return "\n".join(lines) + notes + "\n"


def alpha_curve_recipes(grid: dict) -> list[str]:
    """The recipes that differ from the first one only in kd_alpha (the teacher left at its default,
    shared, counts as the same): the alpha sweep, SFT (kd_alpha 0) included."""
    def rest(flags: dict) -> dict:
        merged = {**grid["common"], **flags}
        merged.pop("kd_alpha", None)
        if merged.get("teacher") == "shared":
            merged.pop("teacher")
        return merged

    first = rest(next(iter(grid["recipes"].values())))
    return [name for name, flags in grid["recipes"].items() if rest(flags) == first]


def plot(summary: dict, grid: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {budget: entries for budget, entries in summary.items() if entries}  # no empty legend entry
    fig, (bars, curve) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    recipes = list(grid["recipes"])
    width = 0.8 / max(1, len(summary))
    for i, (budget, entries) in enumerate(summary.items()):
        xs = [j + (i - (len(summary) - 1) / 2) * width for j, r in enumerate(recipes) if r in entries]
        means = [entries[r]["va"]["mean"] for r in recipes if r in entries]
        errors = [entries[r]["va"]["ci95"] or 0.0 for r in recipes if r in entries]
        bars.bar(xs, means, width, yerr=errors, capsize=3, label=budget)
    bars.set_xticks(range(len(recipes)), recipes, rotation=25, ha="right")
    bars.set_ylabel("VA (spoken questions)")
    bars.set_title("VA by recipe (mean, 95% interval over seeds)")
    bars.legend(title="budget")
    sweep = alpha_curve_recipes(grid)
    for budget, entries in summary.items():
        points = sorted((float({**grid["common"], **grid["recipes"][r]}.get("kd_alpha", 0.75)), entries[r]["va"])
                        for r in sweep if r in entries)
        if points:
            curve.errorbar([a for a, _ in points], [s["mean"] for _, s in points],
                           yerr=[s["ci95"] or 0.0 for _, s in points], marker="o", capsize=3, label=budget)
    curve.set_xlabel("kd_alpha (0 = SFT)")
    curve.set_ylabel("VA")
    curve.set_title("alpha curve")
    curve.legend(title="budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: list[dict], grid: dict, out_dir: str) -> dict:
    summary = summarize(results, grid)
    document = {"grid": {k: grid[k] for k in GRID_KEYS if k in grid}, "runs": results, "summary": summary}
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(document, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(format_table(summary))
    plot(summary, grid, os.path.join(out_dir, "results.png"))
    return document


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="the grid YAML (see above)")
    parser.add_argument("--out", required=True, help="output directory (runs/, results.*)")
    parser.add_argument("--start", help="the starting model directory (overrides the grid's)")
    parser.add_argument("--heldout_shards", help="held-out shard spec (overrides the grid's)")
    parser.add_argument("--budget", action="append", default=[], metavar="NAME=SPEC",
                        help="a training budget: its name and train shard spec (adds to / overrides the grid's)")
    parser.add_argument("--seeds", help="comma-separated seeds (overrides the grid's)")
    parser.add_argument("--num_gpus", type=int, help="ranks per run (overrides the grid's)")
    parser.add_argument("--master_port", type=int, default=29700, help="first run's port; each run takes the next")
    parser.add_argument("--prune_checkpoints", action="store_true",
                        help="delete each run's ckpt/ once it is exported and scored (the export stays)")
    parser.add_argument("--dry_run", action="store_true", help="print every run's commands and exit")
    parser.add_argument("--report_only", action="store_true", help="write the results from finished runs only")
    args = parser.parse_args(argv)
    budgets = {}
    for item in args.budget:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            parser.error(f"--budget {item!r}: expected NAME=SPEC")
        budgets[name] = spec
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    grid = load_grid(args.grid, {"start": args.start, "heldout_shards": args.heldout_shards,
                                 "budgets": budgets or None, "seeds": seeds, "num_gpus": args.num_gpus})
    os.makedirs(args.out, exist_ok=True)
    out_dir = os.path.abspath(args.out)
    runs = planned_runs(grid, out_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    results = []
    for i, run in enumerate(runs):
        label = f"[{i + 1}/{len(runs)}] {run['budget']} / {run['recipe']} / seed {run['seed']}"
        if args.dry_run:
            print(label)
            for log_name, command in run_commands(run, grid, args.master_port + i):
                print(f"  {log_name}: {' '.join(command)}")
            continue
        result = finished_result(run)
        if result is None and not args.report_only:
            print(f"{label}: running in {run['dir']}", flush=True)
            result = execute(run, grid, args.master_port + i, env, args.prune_checkpoints)
        if result is None:
            continue
        print(f"{label}: VL {result['vl']:.1f} VA {result['va']:.1f} gap {result['gap']:.1f} "
              f"({result['steps']} steps)", flush=True)
        results.append(result)
        write_results(results, grid, out_dir)
    if args.dry_run:
        return {}
    if not results:
        raise GridError(f"{out_dir}: no finished run")
    document = write_results(results, grid, out_dir)
    print(format_table(document["summary"]))
    print(f"-> {os.path.join(out_dir, 'results.json')}, results.md, results.png", flush=True)
    return document


if __name__ == "__main__":
    try:
        main()
    except GridError as exc:
        sys.exit(f"compare_recipes: {exc}")
