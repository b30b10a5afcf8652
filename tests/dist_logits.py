"""Answer-token logits of a checkpoint, computed by the 2-rank ZeRO-3 engine (helper of
tests/test_train_zero3.py::test_export_reloads_to_the_same_logits and of the native-family
export tests; in the suite, `main(argv)` is a step of the shared launch, tests/shared_launch.py).

    deepspeed --num_gpus 2 tests/dist_logits.py --checkpoint CKPT --shards SPEC --out logits.pt
"""

import argparse
import json
import os

import torch

from trainer.distill.objective import answer_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@torch.no_grad()
def answer_logits(model, batch, role: str = "student") -> torch.Tensor:
    """Logits at the answer positions of one side (student: spoken, teacher: typed): N, V."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    image_tokens, _ = model.encode_images(batch)
    audio_tokens, _ = model.encode_audio(batch)
    hidden, _ = model.run_side(batch, role, image_tokens, audio_tokens if role == "student" else None)
    index, _, _ = answer_index(batch.side(role)[2].cpu())
    answers = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index.to(device))
    return model.adapter.lm_head(answers).float().cpu()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--adapters_off_out", default=None,
                        help="a LoRA run: also save the typed side's logits with every adapter off (the frozen "
                             "teacher's)")
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args(argv)

    from trainer import dist
    from trainer.config import load_config
    from trainer.data import build_train_loader
    from trainer.loop import Trainer

    with open(os.path.join(args.checkpoint, "run_config.json")) as f:
        run = json.load(f)
    # The run's own settings, so the checkpoint (data position included) loads as saved.
    config = load_config(["--model", run["model"], "--train_shards", run["train_shards"], "--ds_config", run["ds_config"],
                          "--max_steps", str(run["max_steps"]), "--micro_batch_size", str(run["micro_batch_size"]),
                          "--num_workers", str(run["num_workers"]), "--seed", str(run["seed"]), "--teacher", run["teacher"],
                          "--ema_decay", str(run["ema_decay"]), "--resume", args.checkpoint,
                          *(["--lora_r", str(run["lora_r"]), "--lora_alpha", str(run["lora_alpha"]),
                             "--lora_targets", ",".join(run["lora_targets"]), "--trainable", ",".join(run["trainable"])]
                            if run.get("lora_r") else [])])
    trainer = Trainer(config)
    # The same batch on both ranks: each computes the full logits through ZeRO-3 gathers.
    batch = next(iter(build_train_loader(args.shards, trainer.processor, stage="selfkd", micro_batch_size=2,
                                         max_seq_len=run["max_seq_len"], rank=0, world_size=1, num_workers=0, seed=0,
                                         shuffle=False)))
    trainer.model.eval()
    logits = answer_logits(trainer.model, batch)
    if dist.is_main():
        torch.save(logits, args.out)
    if args.adapters_off_out:
        from trainer.models.lora import adapters_disabled

        with adapters_disabled(trainer.model):
            off = answer_logits(trainer.model, batch, "teacher")
        if dist.is_main():
            torch.save(off, args.adapters_off_out)
    trainer.close()
    dist.shutdown()


if __name__ == "__main__":
    main()
