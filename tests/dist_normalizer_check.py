"""The loss normalisation of a real 2-rank ZeRO-3 step with gradient accumulation 2, against
a single-process reference on the same four micro-batches (helper of
tests/test_train_zero3.py::test_gradient_is_the_global_token_mean; in the suite, `main(argv)` is a
step of the shared launch, tests/shared_launch.py).

    deepspeed --num_gpus 2 tests/dist_normalizer_check.py --shards SPEC --out result.json

Micro-batches hold 1 or 2 samples with answers of different lengths, so a per-micro-batch
or per-rank mean would weigh tokens unequally and give another gradient.
"""

import argparse
import json
import math

import deepspeed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args(argv)

    from trainer import dist
    from trainer.config import load_config
    from trainer.distill.loss import KDSettings
    from trainer.distill.objective import SelfKDObjective
    from trainer.models.build import build_tiny, set_trainable
    from trainer.models.synthetic import make_batch
    from trainer.models.tiny import build_tiny_processor
    from trainer.loop import Trainer

    # The reference is a plain single-process model, so it is built before the Trainer makes
    # Hugging Face build everything partitioned.
    reference = build_tiny(build_tiny_processor())

    config = load_config(["--model", "tiny", "--train_shards", args.shards, "--grad_accum", "2", "--micro_batch_size", "1",
                          "--num_workers", "0", "--kd_alpha", "0.75", "--max_steps", "1", "--max_grad_norm", "1000"])
    trainer = Trainer(config)
    batches = {(r, m): make_batch(trainer.processor, 1 + (r + m) % 2, seed=10 * r + m) for r in range(2) for m in range(2)}
    params = list(trainer.model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    # The step's data: this rank's two micro-batches (the shard loader is only needed to build the Trainer).
    trainer.data_iter = iter([batches[(dist.rank(), 0)], batches[(dist.rank(), 1)]])
    trainer.train_step()
    engine_norm = float(trainer.engine.get_global_grad_norm())

    if dist.is_main():
        reference.load_state_dict(initial)
        set_trainable(reference, {"llm", "projector"})
        tokens = sum(b.answer_tokens() for b in batches.values())
        objective = SelfKDObjective(reference, KDSettings(alpha=0.75))
        for batch in batches.values():
            objective(batch, float(tokens)).loss.backward()
        reference_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in reference.parameters() if p.grad is not None))
        with open(args.out, "w") as f:
            json.dump({"engine": engine_norm, "reference": reference_norm, "tokens": tokens}, f)
    trainer.close()
    dist.shutdown()


if __name__ == "__main__":
    main()
