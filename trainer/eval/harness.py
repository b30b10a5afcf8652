"""The evaluation loop: every eval batch is answered with the question typed ("text",
the VL score) and spoken ("audio", the VA score), greedy, and scored by the same rules.

Used by tools/evaluate.py and by the trainer every --eval_every steps:
    report, records = evaluate(model, processor, loader, modes=("text", "audio"), max_new_tokens=16)
    report["vl_score"], report["va_score"], report["gap"]  -> eval/vl_score, eval/va_score, eval/gap

Multi-rank: each rank answers its own share of the eval set, then the per-sample records
are gathered so every rank returns the full report. Ranks step in lock-step: under ZeRO-3
every forward gathers parameters collectively, so a rank whose shard ran out repeats its
last batch (outputs discarded) until all ranks are done instead of leaving the others
waiting forever.
"""

import torch

from trainer import dist
from trainer.data.batch import Batch
from trainer.eval.report import aggregate
from trainer.eval.scoring import MODES, parsed_answer, score

# Batch fields the eval loader fills for scoring (build_eval_loader; trainer/data/batch.py).
_REQUIRED_FIELDS = ("ids", "questions", "answers", "tasks")


def _lockstep(loader, max_batches: int | None):
    """Yield (batch, is_real) so that all ranks take the same number of steps."""
    iterator = iter(loader)
    last_batch = None
    steps = 0
    while max_batches is None or steps < max_batches:
        batch = next(iterator, None)
        if batch is not None:
            last_batch = batch
        # (has a batch now, has had one) of every rank; all ranks decide alike, so a rank
        # that cannot take part makes every rank raise instead of leaving the others hanging.
        flags = dist.all_gather_object((batch is not None, last_batch is not None))
        if not any(now for now, _ in flags):
            return
        empty_ranks = [rank for rank, (_, had) in enumerate(flags) if not had]
        if empty_ranks:
            raise RuntimeError(f"evaluation: the eval set gives rank(s) {empty_ranks} no batch while other ranks have "
                               "some; use an eval set with at least one batch per rank")
        yield (batch, True) if batch is not None else (last_batch, False)
        steps += 1


def _sample_meta(batch: Batch, i: int) -> dict:
    """Scoring metadata of sample i. The eval loader gives each sample's reference answers
    as a list (`answers`; several for VQA-style soft accuracy); a plain string is one answer."""
    references = batch.answers[i]
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError(f"eval sample {batch.ids[i]!r} has no reference answer (json field 'answer')")
    meta = {
        "id": batch.ids[i],
        "task": batch.tasks[i] or "open",
        "question": batch.questions[i],
        "answer": references[0],
    }
    if len(references) > 1:
        meta["answers"] = list(references)
    if batch.choices is not None and batch.choices[i]:
        meta["choices"] = list(batch.choices[i])
    if batch.sources is not None and batch.sources[i]:
        meta["source"] = batch.sources[i]
    if batch.benches is not None and batch.benches[i]:
        meta["bench"] = batch.benches[i]
    return meta


@torch.no_grad()
def evaluate(model, processor, loader, *, modes=MODES, max_new_tokens: int = 32, device=None, dtype=None,
             max_batches: int | None = None, on_batch=None) -> tuple[dict, list[dict]]:
    """Answer every eval batch of `loader` in each mode with `model.generate(batch, mode,
    max_new_tokens, synced_gpus=...)` (greedy), score and aggregate.

    `processor` is the model's OmniProcessor: generate() already returns decoded text, so
    the harness itself reads nothing from it; it is taken so that callers hand over the
    same (model, processor) pair load_omni / build_model return. Tensors go to `device`
    and floating tensors to `dtype` when given (the trainer passes its own).

    Returns (report, records). report: {"vl_score", "va_score", "gap", "n", "by_task",
    ["by_source"]} (see report.aggregate; points out of 100). records: one dict per sample
    and mode, {"id", "mode", "task", "question", "answer", ["choices", "answers",
    "source"], "prediction", "parsed", "score"}, gathered from all ranks, sorted by id.
    The model is put in eval mode and restored afterwards. `max_batches` caps the steps
    per rank (the trainer's quick periodic eval). `on_batch()` is called after every batch
    (the trainer re-arms its hang watchdog there).
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"evaluate: modes must be a non-empty subset of {MODES}, got {modes}")
    was_training = model.training
    model.eval()
    # Several ranks: every rank decodes all max_new_tokens steps so ZeRO-3's collective
    # parameter gathers line up even when one rank's answers end early.
    synced_gpus = dist.world_size() > 1
    records = []
    try:
        for batch, is_real in _lockstep(loader, max_batches):
            missing = [name for name in _REQUIRED_FIELDS if getattr(batch, name) is None]
            if missing:
                raise ValueError(f"eval batch with samples {batch.keys} lacks {missing}: "
                                 "was it built by trainer.data.build_eval_loader?")
            model_batch = batch.to(device, dtype)
            for mode in modes:
                predictions = model.generate(model_batch, mode, max_new_tokens, synced_gpus=synced_gpus)
                if not is_real:
                    continue
                if len(predictions) != len(batch.ids):
                    raise RuntimeError(f"model.generate returned {len(predictions)} answers for "
                                       f"{len(batch.ids)} samples ({batch.ids})")
                for i, prediction in enumerate(predictions):
                    meta = _sample_meta(batch, i)
                    records.append({**meta, "mode": mode, "prediction": prediction,
                                    "parsed": parsed_answer(prediction, meta), "score": score(prediction, meta)})
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    all_records = [r for rank_records in dist.all_gather_object(records) for r in rank_records]
    all_records.sort(key=lambda r: (str(r["id"]), MODES.index(r["mode"])))
    return aggregate(all_records), all_records
