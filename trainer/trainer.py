"""The training loop: one Trainer object with a few named steps.

    trainer = Trainer(config)     # process group, model under zero.Init, engine, teacher, data
    code = trainer.train()        # train_step() until --max_steps or a stop request; an exit code
    trainer.close()

One optimizer step = `grad_accum` micro-batches. Before the first micro-batch the answer
tokens of all of them are counted and summed over ranks, so the loss of every micro-batch
is normalised by the global answer-token count: every answer token weighs the same, however
answers are spread over samples, micro-batches and ranks.

Stops and divergence: a stop request (SIGUSR1, SIGTERM, launcher death; trainer/preemption.py)
is agreed on in the step's closing reduction, so all ranks stop after the same step, save and
return EXIT_STOPPED. A step whose loss or gradient norm is not finite, or whose optimizer
step DeepSpeed skipped, is counted (train/nonfinite_steps, train/skipped_steps); no
checkpoint is written right after one, and --max_nonfinite_steps of them in a row raise
Diverged before any save could replace good weights.
"""

import contextlib
import json
import math
import os
import random
import time

import deepspeed
import numpy as np
import torch
from tqdm import tqdm

from trainer import checkpoint, dist
from trainer.preemption import EXIT_OK, EXIT_STOPPED, EXIT_STOPPED_UNSAVED, StopRequest
from trainer.perf import peak_bf16_flops
from trainer.config import Config, fill_ds_config, read_ds_config, write_resolved
from trainer.data import build_eval_loader, build_train_loader
from trainer.data.collate import move_batch, typed_question_batch
from trainer.distill.loss import KDSettings
from trainer.distill.teachers import make_teacher
from trainer.models.omni import answer_chunks_for, build_model, omni_spec

def _peak_mem_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Diverged(RuntimeError):
    """Too many non-finite steps in a row; the message says which and what was kept."""


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        c = config
        self.stop = StopRequest()
        self.stop.install()
        dist.init(c.logging.dist_timeout_s)
        self.watchdog = dist.HangWatchdog(c.logging.dist_timeout_s)
        self.watchdog.kick()
        _seed_everything(c.optim.seed)
        self.device = dist.device()
        on_gpu = self.device.type == "cuda"
        self.ds_config = fill_ds_config(read_ds_config(c.optim.ds_config), c.optim, dist.world_size(), on_gpu)
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        self.dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32

        # Under ZeRO-3 every parameter is partitioned as it is created: no rank ever holds
        # the whole model, which is what lets an 8B model start on 80 GB cards.
        init_ctx = deepspeed.zero.Init(config_dict_or_path=self.ds_config) if self.zero_stage == 3 else contextlib.nullcontext()
        model, self.processor = build_model(c.model, init_ctx=init_ctx, dtype=self.dtype, ds_config=self.ds_config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=self.ds_config)
        self.model = self.engine.module
        self.watchdog.kick()
        self.teacher = make_teacher(
            c.distill.teacher, self.model, c.distill.ema_decay, zero_stage=self.zero_stage, release=self.engine.empty_partition_cache
        )
        self.kd = None
        if c.data.stage == "selfkd" and c.distill.kd_alpha > 0:
            self.kd = KDSettings(
                alpha=c.distill.kd_alpha,
                temperature=c.distill.kd_temperature,
                divergence=c.distill.kd_divergence,
            )
        self.chunk_size = c.distill.kd_chunk_size
        # MFU counts the LLM's FLOPs (6 N per trained token); the encoders' are left out.
        llm_modules = (self.model.adapter.language_model, self.model.adapter.lm_head)
        self.num_llm_params = sum(getattr(p, "ds_numel", p.numel()) for m in llm_modules for p in m.parameters())
        self.peak_flops = peak_bf16_flops()

        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.nonfinite_steps = 0  # in the whole run
        self.nonfinite_streak = 0  # in a row, up to the current step
        self.last_checkpoint = None
        self.stop_agreed = False
        resume_from = checkpoint.resolve_resume(c.checkpoint.resume, c.checkpoint.save_dir)
        state = checkpoint.load(self.engine, resume_from) if resume_from else None
        self.watchdog.kick()
        if state is not None:
            if state["world_size"] != dist.world_size():
                raise RuntimeError(
                    f"{resume_from} was written by {state['world_size']} ranks, this run has {dist.world_size()}: "
                    "exact resume needs the same world size"
                )
            self.step, self.samples_seen, self.tokens_seen = state["step"], state["samples_seen"], state["tokens_seen"]
            self.nonfinite_steps = state.get("nonfinite_steps", 0)
            self.teacher.load_state_dict(state["teacher"])
            self.last_checkpoint = resume_from
        self.resumed_step = self.step
        self.loader = build_train_loader(
            c.data.train_shards,
            self.processor,
            stage="selfkd" if c.data.stage == "vl" else c.data.stage,
            micro_batch_size=c.optim.micro_batch_size,
            max_seq_len=c.data.max_seq_len,
            rank=dist.rank(),
            world_size=dist.world_size(),
            num_workers=c.data.num_workers,
            seed=c.optim.seed,
            max_bad_fraction=c.data.max_bad_fraction,
            state=state["data"] if state else None,
        )
        self.data_iter = iter(self.loader)
        if state is not None:
            checkpoint.set_rng_state(state["rng"])
            dist.print0(f"resumed from {resume_from} at step {self.step}")

        self.writer = None
        self.metrics_file = None
        if dist.is_main() and c.logging.log_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(c.logging.log_dir, exist_ok=True)
            write_resolved(c, os.path.join(c.logging.log_dir, "config.yaml"))
            self.writer = SummaryWriter(c.logging.log_dir)
            self.metrics_file = open(os.path.join(c.logging.log_dir, "metrics.jsonl"), "a")

    # --- one micro-batch / one optimizer step ---------------------------------------
    def forward_backward_step(self, batch: dict, normalizer: float, answer_chunks: int) -> dict:
        out = self.engine(
            move_batch(batch, self.device, self.dtype),
            kd=self.kd,
            normalizer=normalizer,
            teacher_ctx=self.teacher.context,
            answer_chunks=answer_chunks,
            chunk_size=self.chunk_size,
        )
        self.engine.backward(out["loss"])
        self.engine.step()
        return out

    def train_step(self) -> dict:
        gas = self.config.optim.grad_accum
        t_start = time.perf_counter()
        skipped_before = self.engine.skipped_steps
        wait = 0.0
        batches = []
        for _ in range(gas):
            t = time.perf_counter()
            batch = next(self.data_iter)
            batches.append(typed_question_batch(batch) if self.config.data.stage == "vl" else batch)
            wait += time.perf_counter() - t

        per_micro = torch.tensor([float((b["student_labels"] != -100).sum()) for b in batches])  # answer tokens
        local = torch.tensor(
            [
                float(per_micro.sum()),
                sum(len(b["keys"]) for b in batches),
                sum(int(b["student_attention_mask"].sum()) for b in batches),
                sum(int(b["teacher_attention_mask"].sum()) for b in batches) if self.kd else 0,
            ],
            dtype=torch.float64,
        )
        answer_tokens, samples, student_tokens, teacher_tokens = dist.all_reduce_sum(local).tolist()
        tokens = student_tokens + teacher_tokens
        # Every LM-head chunk is a ZeRO-3 gather, so all ranks must run the same number of
        # chunks in each micro-batch: size them by the largest micro-batch over ranks.
        answer_chunks = [answer_chunks_for(int(n), self.chunk_size) for n in dist.all_reduce_max(per_micro).tolist()]
        if answer_tokens == 0:
            raise RuntimeError(f"step {self.step + 1}: no answer tokens in any micro-batch on any rank")
        # DeepSpeed divides the gradient by grad_accum and averages it over ranks; undo both
        # so the step's gradient is that of (sum of token losses) / (global answer tokens).
        normalizer = answer_tokens / (gas * dist.world_size())

        sums = torch.zeros(5, dtype=torch.float64)
        for batch, chunks in zip(batches, answer_chunks):
            out = self.forward_backward_step(batch, normalizer, chunks)
            sums += torch.stack(
                [out["ce_sum"], out["kd_sum"], out["teacher_ce_sum"], out["agree_count"], out["n_tokens"]]
            ).detach().double().cpu()
        self.teacher.update()
        ce_sum, kd_sum, teacher_ce_sum, agree, n = dist.all_reduce_sum(sums).tolist()
        # One reduction carries the step time, the peak memory and the stop request of every rank.
        step_time, peak_gib, stop = dist.all_reduce_max(
            torch.tensor([time.perf_counter() - t_start, _peak_mem_gib(), float(self.stop.requested)])).tolist()
        self.stop_agreed = stop > 0
        self.stop.announce()

        self.step += 1
        self.samples_seen += int(samples)
        self.tokens_seen += int(tokens)
        alpha, temp2 = (self.kd.alpha, self.kd.temperature**2) if self.kd else (0.0, 1.0)
        metrics = {
            "train/loss": (alpha * temp2 * kd_sum + (1 - alpha) * ce_sum) / n,
            "train/ce_loss": ce_sum / n,
            "train/lr": self.engine.get_lr()[0],
            "perf/samples_per_s": samples / step_time,
            "perf/tokens_per_s": tokens / step_time,
            "perf/data_wait_frac": wait / step_time,
            "perf/step_s": step_time,
            "mem/peak_gib": peak_gib,
        }
        if self.kd:
            metrics["train/kd_loss"] = kd_sum / n
            metrics["train/teacher_ce"] = teacher_ce_sum / n
            metrics["train/agreement"] = agree / n
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if self.peak_flops:
            # 6 N per student token (forward + backward) plus 2 N per teacher token (forward).
            flops = self.num_llm_params * (6 * student_tokens + 2 * teacher_tokens)
            metrics["perf/mfu"] = flops / step_time / (self.peak_flops * dist.world_size())
        metrics["progress/samples_seen"] = self.samples_seen
        metrics["progress/tokens_seen"] = self.tokens_seen
        self._check_finite(metrics, skipped_before)
        return metrics

    def _check_finite(self, metrics: dict, skipped_before: int) -> None:
        """Count a step whose loss or gradient norm is not finite, or whose optimizer step
        DeepSpeed skipped; raise Diverged after --max_nonfinite_steps of them in a row. Every
        value here is already reduced over ranks, so every rank reaches the same verdict."""
        skipped = self.engine.skipped_steps - skipped_before
        loss, grad_norm = metrics["train/loss"], metrics.get("train/grad_norm", 0.0)
        finite = math.isfinite(loss) and math.isfinite(grad_norm) and skipped == 0
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        self.nonfinite_steps += 0 if finite else 1
        metrics["train/nonfinite_steps"] = self.nonfinite_steps
        metrics["train/skipped_steps"] = self.engine.skipped_steps
        if finite:
            return
        limit = self.config.optim.max_nonfinite_steps
        dist.print0(f"WARNING: step {self.step}: loss {loss}, gradient norm {grad_norm}, optimizer step "
                    f"{'skipped' if skipped else 'taken'} ({self.nonfinite_streak} non-finite step(s) in a row of "
                    f"at most {limit}); no checkpoint is written after a non-finite step")
        if self.nonfinite_streak >= limit:
            kept = f"the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
            raise Diverged(f"step {self.step}: {self.nonfinite_streak} non-finite steps in a row "
                           f"(--max_nonfinite_steps {limit}); stopping before a save could replace good weights; "
                           f"{kept}. Lower --lr or raise --warmup_steps, and check the data.")

    # --- loop ---------------------------------------------------------------------------
    def train(self) -> int:
        """Run until --max_steps or an agreed stop request; returns the process exit code."""
        c = self.config
        progress = tqdm(total=c.optim.max_steps, initial=self.step, disable=not dist.is_main(), dynamic_ncols=True, desc="train")
        self.stop_agreed = False
        while self.step < c.optim.max_steps and not self.stop_agreed:
            metrics = self.train_step()
            self.watchdog.kick()
            progress.update(1)
            if self.step % c.logging.log_every == 0 or self.step == c.optim.max_steps or self.stop_agreed:
                metrics.update(self._skip_metrics())
                self._log(metrics, progress)
            if c.logging.eval_every and c.data.eval_shards and self.step % c.logging.eval_every == 0 \
                    and not self.stop_agreed:
                self.evaluate()
            if c.checkpoint.save_dir and (self.step % c.checkpoint.save_every == 0 or self.step == c.optim.max_steps):
                self._save_if_finite()
        progress.close()
        if self.stop_agreed and self.step < c.optim.max_steps:
            return self._stop()
        if c.data.eval_shards and not self.stop_agreed \
                and not (c.logging.eval_every and self.step % c.logging.eval_every == 0):
            self.evaluate()  # skipped when a stop was asked for at the last step: the deadline may be near
        return EXIT_OK

    def _save_if_finite(self) -> str | None:
        if self.nonfinite_streak:
            dist.print0(f"WARNING: step {self.step} was non-finite: not saving over {self.last_checkpoint}")
            return None
        if self.last_checkpoint != os.path.join(self.config.checkpoint.save_dir, checkpoint.tag_for(self.step)):
            self.last_checkpoint = self.save()
            dist.print0(f"saved {self.last_checkpoint}")
        return self.last_checkpoint

    def _stop(self) -> int:
        """Every rank agreed to stop after this step: save (collective) and say how to go on."""
        c = self.config
        saved = self._save_if_finite() if c.checkpoint.save_dir else None
        if saved:
            dist.print0(f"stopped at step {self.step} ({self.stop.reason or 'another rank was asked to stop'}); "
                        f"checkpoint {saved} is complete: run again with --resume auto to continue")
            return EXIT_STOPPED
        why = "no --save_dir" if not c.checkpoint.save_dir else "the last step was non-finite"
        dist.print0(f"stopped at step {self.step} ({self.stop.reason or 'another rank was asked to stop'}); "
                    f"nothing saved ({why})")
        return EXIT_STOPPED_UNSAVED

    def _skip_metrics(self) -> dict:
        """Broken samples so far, summed over ranks (a collective: every rank calls it)."""
        totals = {}
        for counts in dist.all_gather_object(self.loader.skip_counts()):
            for reason, count in counts.items():
                totals[reason] = totals.get(reason, 0) + count
        return {f"data/skipped/{reason}": count for reason, count in sorted(totals.items())}

    def _log(self, metrics: dict, progress) -> None:
        if not dist.is_main():
            return
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, self.step)
            self.writer.flush()
        if self.metrics_file:
            self.metrics_file.write(json.dumps({"step": self.step, **metrics}) + "\n")
            self.metrics_file.flush()
        line = f"step {self.step}/{self.config.optim.max_steps} | loss {metrics['train/loss']:.4f} ce {metrics['train/ce_loss']:.4f}"
        if self.kd:
            line += f" kd {metrics['train/kd_loss']:.4f} agree {metrics['train/agreement']:.2f}"
        line += (
            f" | lr {metrics['train/lr']:.2e} gn {metrics.get('train/grad_norm', float('nan')):.2f}"
            f" | {metrics['perf/samples_per_s']:.1f} samples/s data {100 * metrics['perf/data_wait_frac']:.0f}%"
            f" | {metrics['mem/peak_gib']:.1f} GiB"
        )
        progress.write(line)

    def evaluate(self) -> dict:
        from trainer.eval.harness import evaluate

        c = self.config
        loader = build_eval_loader(
            c.data.eval_shards,
            self.processor,
            micro_batch_size=c.optim.micro_batch_size,
            max_seq_len=c.data.max_seq_len,
            rank=dist.rank(),
            world_size=dist.world_size(),
            max_bad_fraction=c.data.max_bad_fraction,
        )
        report, _ = evaluate(
            self.model, self.processor, loader, modes=("text", "audio"), max_new_tokens=c.logging.eval_max_new_tokens,
            device=self.device, dtype=self.dtype, on_batch=self.watchdog.kick,
        )
        self.watchdog.kick()
        if dist.is_main():
            scalars = {"eval/vl_score": report["vl_score"], "eval/va_score": report["va_score"], "eval/gap": report["gap"]}
            if self.writer:
                for key, value in scalars.items():
                    self.writer.add_scalar(key, value, self.step)
                self.writer.flush()
            if self.metrics_file:
                self.metrics_file.write(json.dumps({"step": self.step, **scalars}) + "\n")
                self.metrics_file.flush()
            print(f"eval step {self.step} | VL {report['vl_score']:.2f} VA {report['va_score']:.2f} gap {report['gap']:.2f} (n={report['n']})", flush=True)
        return report

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's loop state; the engine state is saved by DeepSpeed beside it."""
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "world_size": dist.world_size(),
            "nonfinite_steps": self.nonfinite_steps,
            "data": self.loader.state_dict(),
            "teacher": self.teacher.state_dict(),
            "rng": checkpoint.rng_state(),
        }

    def save(self) -> str:
        c = self.config
        self.watchdog.kick()
        path = checkpoint.save(
            self.engine, c.checkpoint.save_dir, self.step, self.state_dict(), c.to_flat_dict(), omni_spec(self.model),
            self.processor, c.checkpoint.keep_last,
        )
        self.watchdog.kick()
        return path

    def close(self) -> None:
        self.watchdog.stop()
        if self.writer:
            self.writer.close()
        if self.metrics_file:
            self.metrics_file.close()
