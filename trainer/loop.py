"""The training loop: one Trainer object with a few named steps. The Self-KD objective
(trainer/distill/objective.py) computes each micro-batch's loss; the loop batches, reduces,
steps, logs, evaluates, checkpoints and stops.

    trainer = Trainer(config)     # checks, process group, model under zero.Init, engine, teacher, data
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
from torch.profiler import record_function
from tqdm import tqdm

from trainer import checkpoint, dist, ds_config, resize
from trainer.config import Config, ConfigError, write_resolved
from trainer.data import build_eval_loader, build_train_loader
from trainer.data.batch import Batch, Stage
from trainer.data.shards import check_shard_spec
from trainer.distill.loss import KDSettings
from trainer.distill.objective import OUTPUT_SUMS, SelfKDObjective, combine_sums
from trainer.distill.on_policy import is_on_policy, sample_answers, with_answers
from trainer.distill.teachers import make_teacher
from trainer.metrics import MetricsWriter
from trainer.models.factory import NAMED_MODELS, build_model
from trainer.models.serialize import omni_spec
from trainer.perf import flops_params, peak_bf16_flops, step_flops
from trainer.preemption import EXIT_OK, EXIT_STOPPED, EXIT_STOPPED_UNSAVED, StopRequest


def answer_chunks_for(max_answer_tokens: int, chunk_size: int) -> int:
    """LM-head chunks of one micro-batch, from the largest answer-token count over ranks: every
    chunk is a ZeRO-3 gather, so all ranks must run the same number (SFT and KD alike)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return max(1, math.ceil(max_answer_tokens / chunk_size))


STAT_NAMES = ("samples", "student_tokens", "teacher_tokens", "image_patches", "audio_tokens", "audio_frames",
              "padded_tokens")


def image_patches(batch) -> int:
    """Vision-tower input patches of a batch: Qwen's patch rows, or Phi-4's valid crop patches."""
    if batch.image_attention_mask is not None:
        return int(batch.image_attention_mask.sum())
    return batch.pixel_values.shape[0]


def batch_stats(batches: list, processor, uses_teacher: bool) -> list:
    """Counts of a rank's micro-batches, in STAT_NAMES order, read from CPU tensors (the batch
    reaches the device inside the engine's forward). Teacher tokens: the typed side's (the data).
    Padded tokens: the sequences' tokens as the passes compute them, padding included."""
    audio_tokens = sum(float(b.audio_token_counts.sum()) for b in batches if b.audio_token_counts is not None)
    padded = sum(b.student_attention_mask.numel() for b in batches)
    if uses_teacher:
        padded += sum(b.teacher_attention_mask.numel() for b in batches)
    return [
        float(sum(len(b) for b in batches)),
        float(sum(b.student_attention_mask.sum() for b in batches)),
        float(sum(b.teacher_attention_mask.sum() for b in batches)) if uses_teacher else 0.0,
        float(sum(image_patches(b) for b in batches if b.pixel_values is not None)),
        audio_tokens,
        audio_tokens * processor.encoder_positions_per_token,  # audio encoder positions behind the audio tokens
        float(padded),
    ]


def eval_batch_size(c: Config) -> int:
    """Prompts per evaluation batch: --micro_batch_size, or under a token budget as many prompts of
    --max_seq_len on both sides as the budget holds (at least 1)."""
    if c.optim.max_tokens_per_micro_batch:
        return max(1, c.optim.max_tokens_per_micro_batch // (2 * c.data.max_seq_len))
    return c.optim.micro_batch_size


def preflight(c: Config) -> dict:
    """The checks that read files, before anything slow starts: each component checks its
    own file, and a failure is a ConfigError naming the flag. Returns the filled DeepSpeed
    config (world size from the launcher's environment)."""
    for flag, spec in (("train_shards", c.data.train_shards), ("eval_shards", c.data.eval_shards)):
        if spec is not None:
            try:
                check_shard_spec(spec)
            except (FileNotFoundError, ValueError) as exc:
                raise ConfigError(f"--{flag}: {exc}") from None
    if c.model.model not in (None, *NAMED_MODELS) and not os.path.isdir(c.model.model):
        raise ConfigError(f"--model: {c.model.model} is neither one of {', '.join(NAMED_MODELS)} nor an existing "
                          "directory")
    if c.checkpoint.resume not in (None, "auto") and not os.path.isdir(c.checkpoint.resume):
        raise ConfigError(f"--resume: {c.checkpoint.resume} is neither 'auto' nor a checkpoint directory")
    return ds_config.resolve(c, dist.world_size(), on_gpu=torch.cuda.is_available())


def _peak_mem_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _check_same_lora(checkpoint_dir: str, spec: dict) -> None:
    """A checkpoint resumes only with the LoRA settings that wrote it: another rank or target set
    would fail inside DeepSpeed with a shape error, and another lora_alpha would silently rescale
    every trained adapter."""
    path = os.path.join(checkpoint_dir, "omni_spec.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f).get("lora")
    if saved != spec.get("lora"):
        def flags(lora):
            if not lora:
                return "--lora_r 0"
            return (f"--lora_r {lora['r']} --lora_alpha {lora['alpha']:g} --lora_dropout {lora['dropout']:g} "
                    f"--lora_targets {','.join(lora['targets'])}")

        raise ConfigError(f"{checkpoint_dir} was written with {flags(saved)}; this run has {flags(spec.get('lora'))}: "
                          "resume with the checkpoint's LoRA settings")


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
        self.ds_config = preflight(c)
        self.stop = StopRequest()
        self.stop.install()
        dist.init(c.logging.dist_timeout_s)
        self.watchdog = dist.HangWatchdog(c.logging.dist_timeout_s)
        self.watchdog.kick()
        _seed_everything(c.optim.seed)
        self.device = dist.device()
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        # Which checkpoint, and whether it was written by another number of ranks (trainer/resize.py):
        # then the global batch decides --grad_accum and DeepSpeed loads a universal conversion.
        resume_from = checkpoint.resolve_resume(c.checkpoint.resume, c.checkpoint.save_dir)
        self.saved_world = resize.saved_world_size(resume_from) if resume_from else None
        self.resized = self.saved_world is not None and self.saved_world != dist.world_size()
        if self.resized:
            if self.zero_stage != 3:
                raise ConfigError(f"{resume_from} was written by {self.saved_world} ranks, this run has "
                                  f"{dist.world_size()}: resuming on another world size needs ZeRO-3 "
                                  f"(--ds_config ds_configs/zero3*.json); {c.optim.ds_config} is stage {self.zero_stage}")
            c = self.config = resize.plan_batch(c, resume_from, self.saved_world, dist.world_size())
            self.ds_config = ds_config.resolve(c, dist.world_size(), on_gpu=torch.cuda.is_available())
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
            offload = {(self.ds_config.get("zero_optimization", {}).get(key) or {}).get("device")
                       for key in ("offload_optimizer", "offload_param")}
            if "nvme" in offload:
                raise ConfigError(f"{resume_from} was written by {self.saved_world} ranks, this run has "
                                  f"{dist.world_size()}: DeepSpeed cannot load a universal checkpoint with NVMe "
                                  f"offload ({c.optim.ds_config}); resume on ds_configs/zero3.json or "
                                  "zero3_offload.json, then go back to NVMe at the next checkpoint")
            self.watchdog.kick()
            resize.prepare(resume_from, kick=self.watchdog.kick)
            self.watchdog.kick()
        self.dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32

        # Under ZeRO-3 every parameter is partitioned as it is created: no rank ever holds
        # the whole model, which is what lets an 8B model start on 80 GB cards.
        init_ctx = deepspeed.zero.Init(config_dict_or_path=self.ds_config) if self.zero_stage == 3 else contextlib.nullcontext()
        model, self.processor = build_model(c.model, init_ctx=init_ctx, dtype=self.dtype, ds_config=self.ds_config,
                                            seed=c.optim.seed)
        kd = None
        if c.data.stage == Stage.SELFKD and c.distill.kd_alpha > 0:
            kd = KDSettings(alpha=c.distill.kd_alpha, temperature=c.distill.kd_temperature,
                            divergence=c.distill.kd_divergence, beta=c.distill.kd_beta)
        # The engine wraps the objective, so ZeRO-3 hooks every module the objective calls.
        objective = SelfKDObjective(model, kd, chunk_size=c.distill.kd_chunk_size,
                                    share_prefix=c.distill.teacher_share_prefix)
        trainable = [p for p in objective.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=objective, model_parameters=trainable, config=self.ds_config)
        self.objective = self.engine.module
        self.model = self.objective.model
        self.watchdog.kick()
        # Frozen / EMA teachers copy each rank's ZeRO-3 partitions: only once the engine exists.
        self.objective.teacher = make_teacher(c.distill.teacher, self.model, c.distill.ema_decay,
                                              zero_stage=self.zero_stage, release=self.engine.empty_partition_cache)
        if dist.rank() == 0:
            numel = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in self.model.parameters()]
            trained, total = sum(n for n, grad in numel if grad), sum(n for n, _ in numel)
            print(f"parameters: {trained / 1e6:.2f}M trained of {total / 1e6:.2f}M ({100 * trained / total:.2f}%); "
                  f"{c.distill.teacher} teacher holds {self.objective.teacher.resident_bytes() / 2**20:.1f} MiB "
                  f"of its own weights on this rank", flush=True)
        self.flops_params = flops_params(self.model, self.model.trainable_parts)  # trainer/perf.py
        self.peak_flops = peak_bf16_flops()

        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.nonfinite_steps = 0  # in the whole run
        self.nonfinite_streak = 0  # in a row, up to the current step
        self.last_checkpoint = None
        self.stop_agreed = False
        if resume_from:
            _check_same_lora(resume_from, omni_spec(self.model))
        if self.resized:
            state = resize.load(self.engine, resume_from, self.saved_world, self.objective.teacher,
                                seed=c.optim.seed, num_workers=c.data.num_workers)
        else:
            state = checkpoint.load(self.engine, resume_from) if resume_from else None
            if state is not None and state["data"].get("num_workers") != c.data.num_workers:
                # Another --num_workers on the same ranks: the data readers are dealt anew.
                dist.print0(f"resize: --num_workers {state['data'].get('num_workers')} -> {c.data.num_workers}: "
                            "the data's rest of the epoch dealt to the new readers")
                state["data"] = resize.data_state(resume_from, self.saved_world, c.data.num_workers)
        self.watchdog.kick()
        if state is not None:
            if state["world_size"] != dist.world_size():
                raise RuntimeError(
                    f"{resume_from} was written by {state['world_size']} ranks, this run has {dist.world_size()}: "
                    "exact resume needs the same world size"
                )
            self.step, self.samples_seen, self.tokens_seen = state["step"], state["samples_seen"], state["tokens_seen"]
            self.nonfinite_steps = state.get("nonfinite_steps", 0)
            self.objective.teacher.load_state_dict(state["teacher"])
            self.last_checkpoint = resume_from
        self.resumed_step = self.step
        self.loader = build_train_loader(
            c.data.train_shards,
            self.processor,
            stage=c.data.stage,
            micro_batch_size=c.optim.micro_batch_size,
            max_seq_len=c.data.max_seq_len,
            rank=dist.rank(),
            world_size=dist.world_size(),
            num_workers=c.data.num_workers,
            seed=c.optim.seed,
            max_bad_fraction=c.data.max_bad_fraction,
            state=state["data"] if state else None,
            max_tokens=c.optim.max_tokens_per_micro_batch,
            buffer_size=c.optim.token_budget_buffer,
            with_teacher=self.objective.uses_teacher,
            # On-policy answers may be --gen_max_new_tokens long: the token budget plans room for them.
            answer_reserve=c.distill.gen_max_new_tokens if c.distill.kd_on_policy_fraction > 0 else 0,
        )
        self.data_iter = iter(self.loader)
        if state is not None:
            checkpoint.set_rng_state(state["rng"])
            dist.print0(f"resumed from {resume_from} at step {self.step}")

        self.metrics = MetricsWriter(c.logging.log_dir, enabled=dist.is_main())
        if dist.is_main() and c.logging.log_dir:
            write_resolved(c, os.path.join(c.logging.log_dir, "config.yaml"))

    @property
    def kd(self) -> KDSettings | None:
        return self.objective.kd

    # --- one micro-batch / one optimizer step ---------------------------------------
    def forward_backward_step(self, batch: Batch, normalizer: float, answer_chunks: int, on_policy: bool = False):
        """One micro-batch through the objective under the engine; its ObjectiveOutput."""
        with record_function("step/forward"):
            out = self.engine(batch.to(dtype=self.dtype), normalizer, answer_chunks, on_policy)
        with record_function("step/backward"):
            self.engine.backward(out.loss)
        with record_function("step/optimizer"):
            self.engine.step()
        return out

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches. Two collectives carry everything
        the step needs from other ranks, and the host reads device values only after them:
        the batch statistics before the first micro-batch, the loss sums, peak memory and stop
        request after the last."""
        gas = self.config.optim.grad_accum
        t_start = time.perf_counter()
        skipped_before = self.engine.skipped_steps
        batches = []
        with record_function("step/data"):
            for _ in range(gas):
                batches.append(next(self.data_iter))
        wait = time.perf_counter() - t_start
        # On-policy micro-batches (trainer/distill/on_policy.py): the student answers first, so the
        # answer tokens below are its own.
        k = self.config.distill
        on_policy = [is_on_policy(self.config.optim.seed, self.step + 1, i, k.kd_on_policy_fraction)
                     for i in range(gas)]
        generated = [0.0, 0.0]  # tokens the student generated, samples it answered
        t_generate = time.perf_counter()
        for i, flag in enumerate(on_policy):
            if flag:
                with record_function("step/generate"):
                    answers = sample_answers(
                        self.model, batches[i].to(dtype=self.dtype), max_new_tokens=k.gen_max_new_tokens,
                        temperature=k.gen_temperature, seed=self.config.optim.seed, step=self.step + 1, micro=i,
                        rank=dist.rank(), synced=self.zero_stage == 3 and dist.world_size() > 1, device=self.device)
                self.watchdog.kick()  # a long generation is progress, not a hang
                batches[i] = with_answers(batches[i], answers, self.processor.pad_id, max_len=self.config.data.max_seq_len)
                generated = [generated[0] + sum(map(len, answers)), generated[1] + len(answers)]
        generate_time = time.perf_counter() - t_generate

        # Per rank: answer tokens of each micro-batch, then the step's sample/token/encoder counts
        # (CPU tensors: no device read).
        with record_function("step/stats"):  # read from the CPU batches
            stats = torch.tensor([[float(b.answer_tokens()) for b in batches]
                                  + batch_stats(batches, self.processor, self.objective.uses_teacher)],
                                 dtype=torch.float64)
        with record_function("step/reduce"):
            rows = dist.all_gather_rows(stats)  # world, gas + len(STAT_NAMES)
        per_micro_max = rows[:, :gas].max(dim=0).values.tolist()
        totals = dict(zip(STAT_NAMES, rows[:, gas:].sum(dim=0).tolist()))
        answer_tokens = sum(rows[:, :gas].sum(dim=0).tolist())
        if answer_tokens == 0:
            raise RuntimeError(f"step {self.step + 1}: no answer tokens in any micro-batch on any rank")
        # Every LM-head chunk is a ZeRO-3 gather, so all ranks must run the same number of
        # chunks in each micro-batch: size them by the largest micro-batch over ranks.
        chunk_size = self.objective.chunk_size
        answer_chunks = [answer_chunks_for(int(n), chunk_size) for n in per_micro_max]
        # DeepSpeed divides the gradient by grad_accum and averages it over ranks; undo both
        # so the step's gradient is that of (sum of token losses) / (global answer tokens).
        normalizer = answer_tokens / (gas * dist.world_size())

        sums = None  # on the device until the closing collective
        teacher_computed = 0.0  # tokens the teacher pass computed (CPU counts, from the objective)
        on_sums = None  # the on-policy micro-batches' sums alone
        for batch, chunks, flag in zip(batches, answer_chunks, on_policy):
            out = self.forward_backward_step(batch, normalizer, chunks, flag)
            sums = out.sums().detach() if sums is None else sums + out.sums().detach()
            if flag:
                on_sums = out.sums().detach() if on_sums is None else on_sums + out.sums().detach()
            teacher_computed += out.teacher_tokens
        self.objective.teacher.update()
        on_sums = torch.zeros_like(sums) if on_sums is None else on_sums
        closing = torch.cat([sums.to(torch.float64), on_sums.to(torch.float64), torch.tensor(
            [teacher_computed, *generated, _peak_mem_gib(), float(self.stop.requested)], dtype=torch.float64,
            device=sums.device)])
        with record_function("step/reduce"):
            rows = dist.all_gather_rows(closing)
        summed_all = rows[:, :2 * OUTPUT_SUMS + 3].sum(dim=0).tolist()
        summed, on_summed = summed_all[:OUTPUT_SUMS], summed_all[OUTPUT_SUMS:2 * OUTPUT_SUMS]
        teacher_tokens_computed, generated_tokens, generated_samples = summed_all[2 * OUTPUT_SUMS:]
        ce_sum, kd_sum, teacher_ce_sum, agree, teacher_entropy, n = summed
        peak_gib, stop = rows[:, 2 * OUTPUT_SUMS + 3:].max(dim=0).values.tolist()
        self.stop_agreed = stop > 0
        self.stop.announce()
        step_time = time.perf_counter() - t_start  # after the closing read: the device work is done

        samples, student_tokens = totals["samples"], totals["student_tokens"]
        tokens = student_tokens + totals["teacher_tokens"]  # the data's tokens, both sides
        self.step += 1
        self.samples_seen += int(samples)
        self.tokens_seen += int(tokens)
        metrics = {
            "train/loss": combine_sums(summed, self.kd, on_policy_sums=on_summed),
            "train/ce_loss": ce_sum / n,
            "train/lr": self.engine.get_lr()[0],
            "perf/samples_per_s": samples / step_time,
            "perf/tokens_per_s": tokens / step_time,
            "perf/data_wait_frac": wait / step_time,
            "perf/step_s": step_time,
            "perf/student_tokens": student_tokens,
            "perf/padding_frac": 1.0 - tokens / max(totals["padded_tokens"], 1.0),
            "perf/teacher_tokens_computed": teacher_tokens_computed,
            "mem/peak_gib": peak_gib,
        }
        if self.kd:
            metrics["train/kd_loss"] = kd_sum / n
            metrics["train/teacher_ce"] = teacher_ce_sum / n
            metrics["train/agreement"] = agree / n
            metrics["train/teacher_entropy"] = teacher_entropy / n
        if self.config.distill.kd_on_policy_fraction > 0:
            metrics["train/on_policy_share"] = sum(on_policy) / gas
            metrics["perf/generate_frac"] = generate_time / step_time
        if any(on_policy):  # the student's own answers: logged only on steps that had some
            on_n = on_summed[-1]
            metrics["train/gen_length"] = generated_tokens / max(generated_samples, 1.0)
            metrics["train/on_policy_teacher_ce"] = on_summed[2] / on_n if on_n else 0.0
            if n > on_n:  # the CE on reference answers alone (on the student's own ones it is low by construction)
                metrics["train/off_policy_ce_loss"] = (ce_sum - on_summed[0]) / (n - on_n)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if self.peak_flops:
            flops = step_flops(self.flops_params, student_tokens=student_tokens,
                               teacher_tokens=teacher_tokens_computed,
                               answer_tokens=answer_tokens, teacher_answer_tokens=answer_tokens if self.kd else 0.0,
                               image_patches=totals["image_patches"], audio_frames=totals["audio_frames"],
                               audio_tokens=totals["audio_tokens"])
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
        self.metrics.write(self.step, metrics)
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
            micro_batch_size=eval_batch_size(c),
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
            self.metrics.write(self.step, {"eval/vl_score": report["vl_score"], "eval/va_score": report["va_score"],
                                           "eval/gap": report["gap"]})
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
            "teacher": self.objective.teacher.state_dict(),
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
        self.metrics.close()
        if getattr(self.model, "hf_deepspeed_config", None) is not None:
            # transformers registers it process-wide: a later build in this process (another
            # run, an evaluation) must not inherit this run's ZeRO-3 settings.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            self.model.hf_deepspeed_config = None
            unset_hf_deepspeed_config()
