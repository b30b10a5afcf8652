"""Two-rank ZeRO-3 check of the frozen and EMA teachers on the tiny omni model (CPU, gloo).

Run (tests/test_teacher_zero3.py does it as a step of the shared launch, `main([SAVE_DIR])`):
    deepspeed --num_gpus 2 tests/dist_teacher_check.py
Each rank builds the tiny model inside deepspeed.zero.Init, trains a few Self-KD steps on
its own synthetic batches with the EMA teacher as the teacher pass, and keeps a reference
EMA computed on fully gathered weights. It then proves, by gathering with the teacher
swapped in, that the EMA partitions equal the gathered reference, that the frozen teacher
still holds the initial weights, and that the student weights come back after the swap.
Then it saves a DeepSpeed checkpoint (+ omni_spec.json, processor/) and the gathered
weights under $DIST_CHECK_DIR for the export check in tests/test_teacher_zero3.py, and
reloads the gathered weights with load_omni under zero.Init (only rank 0 reads the file):
both ranks must hold the saved values.
Prints "DIST_TEACHER_CHECK_OK" on rank 0 when everything holds.
"""

import os

import deepspeed
import torch

from trainer import checkpoint
from trainer.config import ModelConfig
from trainer.distill.loss import KDSettings
from trainer.distill.objective import SelfKDObjective
from trainer.distill.teachers import SharedTeacher, make_teacher
from trainer.models.factory import build_model
from trainer.models.serialize import load_omni, omni_spec, save_omni
from trainer.models.synthetic import make_batch

DECAY = 0.5  # large steps so a wrong average cannot hide under the tolerance
STEPS = 3
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100},
    "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": False},
    "bf16": {"enabled": False},
}


def gathered(params) -> list[torch.Tensor]:
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone().float() for p in params]


def assert_close(label, got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        if not torch.allclose(a, b, rtol=1e-6, atol=1e-6):
            raise AssertionError(f"{label}: parameter {i} differs by {(a - b).abs().max().item():.3e}")


def main(argv=None):
    """argv: [save dir] (default $DIST_CHECK_DIR, else /tmp/dist_teacher_check)."""
    deepspeed.init_distributed(dist_backend="gloo")
    rank = deepspeed.comm.get_rank()
    # The trainer's own build path: HF modules partitioned at construction via the
    # HfDeepSpeedConfig build_model keeps alive, the projector under zero.Init.
    torch.manual_seed(0)
    model, processor = build_model(
        ModelConfig(model="tiny", attn_impl="sdpa"),
        init_ctx=deepspeed.zero.Init(config_dict_or_path=DS_CONFIG),
        ds_config=DS_CONFIG,
    )
    assert all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters() if p.ds_numel > 1000), "not partitioned"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    objective = SelfKDObjective(model, KDSettings(alpha=0.75, temperature=2.0))
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=DS_CONFIG)
    model = engine.module.model

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.ds_persist for p in trainable) and not all(p.ds_persist for p in trainable), "want both kinds"
    frozen = make_teacher("frozen", model, zero_stage=3, release=engine.empty_partition_cache)
    ema = make_teacher("ema", model, DECAY, zero_stage=3, release=engine.empty_partition_cache)
    initial = gathered(trainable)
    reference_ema = [t.clone() for t in initial]

    engine.module.teacher = ema
    for step in range(STEPS):
        # Ranks see different batches (different lengths and answer counts); a fixed chunk
        # count keeps their LM-head calls, hence ZeRO-3 gathers, in lockstep.
        batch = make_batch(processor, 1, seed=100 * rank + step)
        out = engine(batch, 1.0, 3)
        engine.backward(out.loss)
        engine.step()
        ema.update()
        reference_ema = [DECAY * r + (1 - DECAY) * w for r, w in zip(reference_ema, gathered(trainable))]
        assert torch.isfinite(out.loss), out

    student = gathered(trainable)
    assert any(not torch.equal(a, b) for a, b in zip(student, initial)), "training did not change the weights"
    with ema.context():
        ema_weights = gathered(trainable)
    assert_close("EMA teacher vs gathered reference EMA", ema_weights, reference_ema)
    with frozen.context():
        frozen_weights = gathered(trainable)
    assert_close("frozen teacher vs initial weights", frozen_weights, initial)
    assert_close("student after the swaps", gathered(trainable), student)

    # The teacher pass must see teacher weights: a forward with the frozen teacher as the
    # teacher gives the teacher CE of the initial model, which differs from the student's.
    batch = make_batch(processor, 1, seed=7)
    with torch.no_grad():
        engine.module.teacher = frozen
        out_frozen = engine(batch, 1.0, 3)
        engine.module.teacher = SharedTeacher()
        out_shared = engine(batch, 1.0, 3)
    assert torch.allclose(out_frozen.ce_sum, out_shared.ce_sum), "student pass changed by the teacher swap"
    assert not torch.allclose(out_frozen.teacher_ce_sum, out_shared.teacher_ce_sum), "teacher pass used student weights"

    # Checkpoint for tools/export_hf.py, which the pytest wrapper runs afterwards in a fresh
    # process and compares against the gathered weights saved here.
    save_dir = argv[0] if argv else os.environ.get("DIST_CHECK_DIR", "/tmp/dist_teacher_check")
    # The trainer's own save (engine partitions, spec, processor, fsync, COMPLETE manifest).
    checkpoint.save(engine, save_dir, 3, {"step": 3}, {"note": "dist_teacher_check"}, omni_spec(model),
                    processor, keep_last=1)
    named = list(model.named_parameters())
    full = dict(zip([n for n, _ in named], gathered([p for _, p in named])))
    if rank == 0:
        torch.save(full, os.path.join(save_dir, "gathered_weights.pt"))
        save_omni(model, processor, os.path.join(save_dir, "saved"), state_dict=full)
    deepspeed.comm.barrier()

    # load_omni under ZeRO-3: only rank 0 reads the file, every rank must end up with its values.
    loaded, _ = load_omni(os.path.join(save_dir, "saved"), attn_impl="sdpa", init_ctx=deepspeed.zero.Init(config_dict_or_path=DS_CONFIG))
    loaded_named = list(loaded.named_parameters())
    assert all(hasattr(p, "ds_id") for _, p in loaded_named), "load_omni did not partition"
    assert [n for n, _ in loaded_named] == list(full), "loaded parameter names differ"
    assert_close("load_omni under ZeRO-3 vs saved weights", gathered([p for _, p in loaded_named]), list(full.values()))
    if rank == 0:
        print("DIST_TEACHER_CHECK_OK", flush=True)


if __name__ == "__main__":
    main()
