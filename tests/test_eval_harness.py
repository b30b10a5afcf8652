"""The evaluation loop's bookkeeping: modes, scoring, gathering across ranks and the
lock-step that keeps ZeRO-3 ranks from waiting on each other. The model here is a
scripted stand-in whose answers are known; the real tiny model runs in
test_eval_tools.py."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.data.batch import Batch
from trainer.eval.harness import evaluate


class ScriptedModel(torch.nn.Module):
    """Answers typed questions correctly and spoken ones with "yes"."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.pixel_dtypes = []

    def generate(self, batch, mode, max_new_tokens, *, synced_gpus):
        assert not self.training
        assert synced_gpus == (dist.is_initialized() and dist.get_world_size() > 1)
        self.calls.append((tuple(batch.ids), mode))
        self.pixel_dtypes.append(batch.pixel_values.dtype)
        return [(refs or [""])[0] for refs in batch.answers] if mode == "text" else ["yes"] * len(batch.ids)


def _batch(ids, tasks, answers, choices=None):
    """An eval Batch with the fields collate_eval fills: reference answers as a list per
    sample (the prompts are placeholders: the scripted model reads none)."""
    prompts = torch.zeros(len(ids), 1, dtype=torch.long)
    return Batch(keys=list(ids), student_input_ids=prompts, student_attention_mask=prompts + 1,
                 ids=list(ids), questions=[f"question {i}" for i in ids],
                 answers=[a if isinstance(a, list) else [a] for a in answers], tasks=list(tasks),
                 choices=choices or [None] * len(ids), pixel_values=torch.zeros(2, 3))


def test_evaluate_scores_both_modes():
    loader = [
        _batch(["a", "b"], ["yesno", "yesno"], ["yes", "no"]),
        _batch(["c"], ["choice"], ["B"], choices=[["red", "blue"]]),
        _batch(["d"], ["open"], [["3", "three"]]),
    ]
    model = ScriptedModel().train()
    report, records = evaluate(model, None, loader, max_new_tokens=4, dtype=torch.bfloat16)
    assert model.training
    assert set(model.pixel_dtypes) == {torch.bfloat16}
    assert report["n"] == 4 and len(records) == 8
    assert report["vl_score"] == 100.0
    assert report["va_score"] == 25.0  # only sample "a" (answer yes) is right when spoken
    assert report["gap"] == 75.0
    assert records[-1]["answers"] == ["3", "three"]
    assert report["by_task"]["yesno"]["va_yes_rate"] == 100.0
    by_key = {(r["id"], r["mode"]): r for r in records}
    assert by_key[("c", "text")]["parsed"] == "B" and by_key[("c", "text")]["choices"] == ["red", "blue"]
    assert by_key[("b", "audio")]["score"] == 0.0


def test_evaluate_single_mode_and_cap():
    loader = [_batch(["a"], ["open"], ["red"]), _batch(["b"], ["open"], ["blue"])]
    model = ScriptedModel()
    report, records = evaluate(model, None, loader, modes=("audio",), max_batches=1)
    assert model.calls == [(("a",), "audio")]
    assert report["vl_score"] is None and report["va_score"] == 0.0 and len(records) == 1
    with pytest.raises(ValueError, match="modes"):
        evaluate(model, None, loader, modes=("video",))


def test_evaluate_rejects_bad_batches():
    bare = _batch(["x"], ["open"], ["y"])
    bare.questions = bare.tasks = None
    with pytest.raises(ValueError, match="lacks"):
        evaluate(ScriptedModel(), None, [bare])
    with pytest.raises(ValueError, match="'x'.*no reference"):
        evaluate(ScriptedModel(), None, [_batch(["x"], ["open"], [[]])])


def test_sources_break_the_report_down():
    batch = _batch(["r", "a"], ["choice", "choice"], ["A", "B"], choices=[["p", "q"], ["p", "q"]])
    batch.sources = ["vg_relation", "vg_attribution"]
    report, _ = evaluate(ScriptedModel(), None, [batch])
    assert set(report["by_source"]) == {"vg_relation", "vg_attribution"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, result_queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # Rank 0 holds three batches, rank 1 one: rank 1 must keep stepping.
        shards = {0: [_batch([f"r0-{i}"], ["yesno"], ["no"]) for i in range(3)],
                  1: [_batch(["r1-0", "r1-1"], ["yesno", "yesno"], ["yes", "no"])]}
        model = ScriptedModel()
        report, records = evaluate(model, None, shards[rank])
        # An eval set too small for the ranks: every rank raises, none waits forever.
        try:
            evaluate(ScriptedModel(), None, shards[0][:1] if rank == 0 else [])
            raised = None
        except RuntimeError as e:
            raised = str(e)
        result_queue.put((rank, len(model.calls), report, [(r["id"], r["mode"]) for r in records], raised))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluate_two_ranks_gathers_and_keeps_lockstep():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, 2, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (_, calls0, report0, ids0, raised0), (_, calls1, report1, ids1, raised1) = results
    assert "rank(s) [1] no batch" in raised0 and raised0 == raised1
    assert calls0 == calls1 == 6  # 3 steps x 2 modes on both ranks
    assert report0 == report1
    assert report0["n"] == 5 and ids0 == ids1 and len(ids0) == 10
    assert report0["vl_score"] == 100.0 and report0["va_score"] == 20.0
