"""One typed config tree for a training run.

Precedence: command line > `--config run.yaml` > the defaults below, resolved once by
`load_config`. Every field is a flag of the same name (`--kd_alpha 0.5`) and a key of the
same name in the YAML file (flat, or grouped under the section names below). Unknown keys
and flags are errors that name them. The resolved config is frozen; `write_resolved`
puts a copy beside the logs.

DeepSpeed settings live in `ds_configs/*.json`; this tree only holds the values the
trainer fills into their "auto" fields (batch sizes, lr, clipping, precision): see
trainer/ds_config.py. Validation here reads no file: the components that open the files
(shards, the DeepSpeed config, the model directory, checkpoints) check them, and the
trainer runs those checks first (trainer/loop.py `preflight`). The choice lists come from
the code that uses them.
"""

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import yaml

from trainer.data.batch import TRAINING_STAGES
from trainer.distill.loss import DIVERGENCES, NAMED_BETA
from trainer.distill.teachers import TEACHERS
from trainer.errors import ConfigError
from trainer.models.build import ATTN_IMPLS, DEFAULT_TRAINABLE, TRAINABLE_PARTS
from trainer.models.lora import DEFAULT_TARGETS as DEFAULT_LORA_TARGETS
from trainer.models.omni import PROJECTORS, WHISPER_INPUTS


@dataclass(frozen=True)
class ModelConfig:
    model: Optional[str] = None
    """`tiny` (random toy model, no download), `toy` (the same classes larger: 128-d, 224 px, M-RoPE theta 10; the toy study), `tiny-qwen3vl` / `tiny-internvl` (a toy Qwen3-VL / InternVL + Whisper), `synthetic-2b` / `synthetic-8b` / `synthetic-qwen3vl-8b` / `synthetic-internvl3-8b` (random weights at Qwen2-VL-2B / -7B, Qwen3-VL-8B or InternVL3-8B
    + Whisper-large-v3 size, for throughput), `overhead-2b` / `overhead-8b` (their module structure at tiny widths: the
    framework's per-module overhead), a directory written by tools/export_hf.py, or a native omni model:
    a Hugging Face checkpoint directory of Qwen2.5-Omni or Qwen3-Omni (the full model or its thinker; the thinker
    is trained), `tiny-qwen2_5_omni` / `tiny-qwen3_omni` (random toy thinkers) or `synthetic-qwen2_5_omni-7b`.
    Leave unset and give --vlm and --audio_encoder to compose a new model."""
    vlm: Optional[str] = None
    """Hugging Face VLM id or path (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL in the -hf layout) for a new composition."""
    audio_encoder: Optional[str] = None
    """Whisper id or path whose encoder becomes the model's ears (new composition)."""
    audio_stack: int = 4
    """Whisper frames stacked into one LLM audio token (50 Hz / 4 = 12.5 tokens per second)."""
    projector: str = "mlp"
    """`mlp` (Linear-GELU-Linear after frame stacking) or `linear` (the paper's single layer)."""
    trainable: tuple = DEFAULT_TRAINABLE
    """Parts that receive gradients; the rest are frozen and run under no_grad. llm = decoder + embeddings + LM head;
    vision = the vision tower; audio = Whisper's encoder (composed) or the native audio tower; projector = ours
    (composed) or the native audio tower's output projection."""
    attn_impl: str = "auto"
    """auto = flash_attention_2 when flash-attn is installed and a GPU is present, else sdpa."""
    gradient_checkpointing: bool = False
    """Non-reentrant activation checkpointing of the LLM (correct with two passes per step)."""
    whisper_input: str = "auto"
    """What a composed model's Whisper encoder reads: `clip` = the batch's longest valid clip (rounded to whole
    projector groups), `window` = the whole 30 s window. `auto`: a new composition reads clips, a saved model what it
    was trained with (models saved before this option: the window). Native families encode valid frames anyway."""
    lora_r: int = 0
    """LoRA rank of the LLM's adapters (peft); 0 = no adapters, the LLM trains in full. With LoRA, `llm` in --trainable
    means the adapters (embeddings and LM head stay frozen) and the other named parts train in full; the frozen teacher
    is then the model with its adapters off (no copy)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the update is (lora_alpha / lora_r) * B @ A."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (training passes only; refused with a shared or EMA Self-KD teacher, whose
    no-grad pass would be noisy)."""
    lora_targets: tuple = DEFAULT_LORA_TARGETS
    """Names (or name suffixes) of the LLM's Linear layers that take adapters; only the LLM is searched (not the vision
    tower, Whisper or a native audio tower). Default: the attention and MLP projections of every supported family
    (Qwen3-Omni's fused MoE experts are not Linear layers and stay frozen)."""


@dataclass(frozen=True)
class DataConfig:
    train_shards: Optional[str] = None
    """WebDataset shard spec: brace pattern, comma-separated list or pipe: URL."""
    eval_shards: Optional[str] = None
    """Held-out shards scored typed vs spoken every --eval_every steps."""
    stage: str = "selfkd"
    """`selfkd`: vision-audio Self-KD on image+question shards; `align`: ASR, CE only; `vl`: typed-question
    SFT on the same shards (CE only; real VLMs come with it, the demo's random model needs it); `mixed`: each
    sample is `align` or `vl` as its JSON "stage" says, CE only (hearing trained while reading is kept; composed
    models)."""
    max_seq_len: int = 2048
    """Samples whose teacher or student sequence is longer are skipped (counted as too_long)."""
    num_workers: int = 2
    """DataLoader workers per rank (decode, features, tokenise, collate)."""
    max_bad_fraction: float = 0.01
    """Stop when more than this fraction of samples is broken."""


@dataclass(frozen=True)
class DistillConfig:
    kd_alpha: float = 0.75
    """Weight of the KD term; 0 skips the teacher pass entirely (the SFT baseline)."""
    kd_temperature: float = 1.0
    """Softmax temperature of both distributions; the KD term is scaled by T^2."""
    kd_divergence: str = "fkl"
    """fkl = KL(teacher ‖ student) (the paper), rkl = KL(student ‖ teacher), jsd (beta 0.5), or gjsd with --kd_beta
    (generalized JSD as in GKD; fkl, rkl and jsd are its beta 0, 1 and 0.5)."""
    kd_beta: Optional[float] = None
    """--kd_divergence gjsd only: beta KL(teacher ‖ M) + (1 - beta) KL(student ‖ M), M = beta teacher + (1 - beta)
    student; 0 = forward KL (fkl) ... 1 = reverse KL (rkl) by definition, but inside (0, 1) the divergence shrinks
    towards the ends (about beta x fkl for a small beta: --kd_beta 0.01 weighs the KD term about 100x less than
    fkl). none = unset."""
    kd_on_policy_fraction: float = 0.0
    """Share of micro-batches where the student answers the spoken question itself (sampled, see --gen_temperature)
    and the teacher grades every token of that answer given the typed question (on-policy Self-KD, as GKD's lmbda);
    those micro-batches train on the KD term alone. Drawn per (seed, step, micro-batch), the same on every rank.
    0 = off-policy only (the paper)."""
    gen_max_new_tokens: int = 32
    """Longest answer the student generates on an on-policy micro-batch (every rank decodes all of them under
    ZeRO-3 with several ranks)."""
    gen_temperature: float = 1.0
    """Sampling temperature of the student's on-policy answers; 0 = greedy."""
    teacher: str = "shared"
    """shared: the live weights; frozen: the starting weights; ema: an EMA of the weights."""
    ema_decay: float = 0.999
    """EMA teacher decay per optimizer step."""
    teacher_share_prefix: bool = True
    """Shared teacher: take the keys and values of the prefix both sides share (system prompt, image) from the
    student pass instead of recomputing them (same logits). Off with frozen/EMA teachers (other weights) and with
    --gradient_checkpointing (the checkpointed student keeps no cache)."""
    kd_chunk_size: int = 1024
    """Answer tokens per LM-head chunk: bounds the student's logits memory to chunk x vocab (a frozen/EMA
    teacher keeps all its answer-token logits until the backward pass)."""


@dataclass(frozen=True)
class OptimConfig:
    ds_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON; its "auto" fields are filled from the flags below."""
    micro_batch_size: int = 1
    """Samples per rank per micro-step (leave it unset with --max_tokens_per_micro_batch)."""
    max_tokens_per_micro_batch: int = 0
    """Micro-batches by token budget instead of a sample count: samples are grouped by length within a buffer of
    --token_budget_buffer samples, so each micro-batch computes at most this many tokens, padding included (student +
    teacher sequences; the teacher's only with a teacher pass). 0 = --micro_batch_size samples. Must hold one sample
    of --max_seq_len on every side the step computes."""
    token_budget_buffer: int = 128
    """Samples each data worker sorts by length at a time for --max_tokens_per_micro_batch (larger: less padding,
    more host memory; each holds its decoded image and log-mel)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 2e-5
    """Peak learning rate (after warmup; cosine decay to lr * min_lr_ratio)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of --lr."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    max_steps: int = 1000
    """Optimizer steps to run; the data stream repeats epochs as needed."""
    max_nonfinite_steps: int = 3
    """Stop the run (exit code 3) after this many steps in a row with a non-finite loss or gradient norm or a
    skipped optimizer step; no checkpoint is written after such a step."""
    seed: int = 42
    """Seeds model init, data order and every RNG."""


@dataclass(frozen=True)
class CheckpointConfig:
    save_dir: Optional[str] = None
    """Where checkpoints go; unset = no checkpoints."""
    save_every: int = 500
    """Save every N optimizer steps (and at the end)."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted."""
    resume: Optional[str] = None
    """`auto` (newest complete checkpoint in --save_dir, if any) or a checkpoint directory."""
    allow_batch_change: bool = False
    """Resuming on another number of ranks keeps the saved global batch (micro-batch x --grad_accum x ranks) by
    setting --grad_accum, and refuses when no whole number does; with this flag the run's own --grad_accum is kept
    and the global batch may change."""


@dataclass(frozen=True)
class LoggingConfig:
    log_dir: Optional[str] = None
    """TensorBoard event files, metrics.jsonl and the resolved config.yaml go here."""
    log_every: int = 1
    """Console line and TensorBoard scalars every N steps."""
    eval_every: int = 0
    """Score --eval_shards typed vs spoken every N steps (0 = only at the end, if given)."""
    eval_max_new_tokens: int = 16
    """Greedy generation length for evaluation."""
    dist_timeout_s: int = 1800
    """Bound on every collective and on each step; a hang dumps all ranks' stacks and exits."""


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "distill": DistillConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_flat_dict(self) -> dict:
        flat = {}
        for name in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, name)).items():
                flat[key] = list(value) if isinstance(value, tuple) else value
        return flat


def _field_index() -> dict:
    """flag name -> (section name, dataclass field)."""
    index = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name not in index, f"duplicate config key {f.name}"
            index[f.name] = (section, f)
    return index


def _coerce(name: str, f, value: Any) -> Any:
    """Convert a YAML or CLI value to the field's type, with an error naming the key."""
    default = f.default
    if value is None:
        return None
    if default is None and _optional_float(f.type):
        if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
            return None  # a YAML's value cleared on the command line
        default = 0.0  # a number when given
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(x).strip() for x in items if str(x).strip())
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            number = float(value)
            if not math.isfinite(number):
                raise OverflowError(value)
            return number
        if isinstance(value, (list, tuple)) and name.endswith("_shards"):
            return ",".join(str(v) for v in value)  # a YAML list of shard specs
        return str(value)
    except OverflowError:
        raise ConfigError(f"{name}: must be a finite number, got {value!r}") from None
    except (TypeError, ValueError):
        kind = "true/false" if isinstance(default, bool) else type(default).__name__
        raise ConfigError(f"{name}: expected {kind}, got {value!r}") from None


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict:
    """The docstring under each dataclass field (shown by --help and in docs/configuration.md)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _optional_float(annotation) -> bool:
    """A field that is unset (None) or a number, like --kd_beta."""
    return annotation in (Optional[float], "Optional[float]")


def _metavar(default, annotation=None) -> str:
    if _optional_float(annotation):
        return "FLOAT"
    if isinstance(default, bool):
        return "BOOL"
    if isinstance(default, tuple):
        return "A,B"
    return {int: "INT", float: "FLOAT"}.get(type(default), "STR")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer/main.py",
        description="Self-KD training of an omni (vision + audio) LLM on DeepSpeed.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML file; every flag below is also a key there")
    # The deepspeed launcher appends --local_rank; the rank itself is read from the environment.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        docs = field_docs(cls)
        for f in fields(cls):
            help_text = f"{docs.get(f.name, '')} (default: {f.default!r})".replace("%", "%%")
            group.add_argument(f"--{f.name}", default=None, metavar=_metavar(f.default, f.type), help=help_text)
    return parser


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    flat = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if sub_key not in {f.name for f in fields(SECTIONS[key])}:
                    raise ConfigError(f"{path}: unknown key '{key}.{sub_key}'")
                flat[sub_key] = sub_value
        else:
            flat[key] = value
    return flat


def load_config(argv: Optional[list] = None) -> Config:
    """Parse the command line (and --config YAML), validate, return the frozen config."""
    parser = build_arg_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown flag(s): {' '.join(unknown)} (see trainer/main.py --help)")
    index = _field_index()
    values = {}
    if args.config:
        for key, value in _read_yaml(args.config).items():
            if key not in index:
                raise ConfigError(f"{args.config}: unknown key '{key}'")
            values[key] = value
    for key in index:
        cli_value = getattr(args, key)
        if cli_value is not None:
            values[key] = cli_value
    per_section = {name: {} for name in SECTIONS}
    for key, value in values.items():
        section, f = index[key]
        per_section[section][key] = _coerce(key, f, value)
    config = Config(**{name: SECTIONS[name](**kw) for name, kw in per_section.items()})
    validate(config)
    return config


def _check_choice(flag: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"--{flag}: {value!r} is not one of {', '.join(allowed)}")


def validate(c: Config) -> None:
    m, d, k, o, ck, lg = c.model, c.data, c.distill, c.optim, c.checkpoint, c.logging
    if m.model is None and not (m.vlm and m.audio_encoder):
        raise ConfigError("give --model tiny|DIR, or both --vlm and --audio_encoder to compose a new model")
    if m.model is not None and (m.vlm or m.audio_encoder):
        raise ConfigError("--model and --vlm/--audio_encoder are exclusive: --model loads a finished composition")
    if m.audio_stack < 1:
        raise ConfigError(f"--audio_stack: must be >= 1, got {m.audio_stack}")
    _check_choice("projector", m.projector, PROJECTORS)
    _check_choice("attn_impl", m.attn_impl, ATTN_IMPLS)
    for part in m.trainable:
        _check_choice("trainable", part, TRAINABLE_PARTS)
    if not m.trainable:
        raise ConfigError("--trainable: at least one part must be trained")

    _check_choice("stage", d.stage, TRAINING_STAGES)
    if d.train_shards is None:
        raise ConfigError("--train_shards is required")
    if d.max_seq_len < 16:
        raise ConfigError(f"--max_seq_len: must be >= 16, got {d.max_seq_len}")
    if d.num_workers < 0:
        raise ConfigError(f"--num_workers: must be >= 0, got {d.num_workers}")
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise ConfigError(f"--max_bad_fraction: must lie in [0, 1], got {d.max_bad_fraction}")

    if not 0.0 <= k.kd_alpha <= 1.0:
        raise ConfigError(f"--kd_alpha: must lie in [0, 1], got {k.kd_alpha}")
    if k.kd_temperature <= 0:
        raise ConfigError(f"--kd_temperature: must be > 0, got {k.kd_temperature}")
    _check_choice("kd_divergence", k.kd_divergence, DIVERGENCES)
    if k.kd_divergence == "gjsd" and (k.kd_beta is None or not 0.0 <= k.kd_beta <= 1.0):
        raise ConfigError(f"--kd_divergence gjsd: give --kd_beta in [0, 1] (0 forward KL ... 1 reverse KL), "
                          f"got {k.kd_beta}")
    if k.kd_divergence != "gjsd" and k.kd_beta is not None:
        raise ConfigError(f"--kd_beta {k.kd_beta}: only with --kd_divergence gjsd ({k.kd_divergence} is gjsd with "
                          f"beta {NAMED_BETA[k.kd_divergence]})")
    if not 0.0 <= k.kd_on_policy_fraction <= 1.0:
        raise ConfigError(f"--kd_on_policy_fraction: must lie in [0, 1], got {k.kd_on_policy_fraction}")
    if k.kd_on_policy_fraction > 0 and (d.stage != "selfkd" or k.kd_alpha <= 0):
        raise ConfigError(f"--kd_on_policy_fraction {k.kd_on_policy_fraction}: on-policy distillation needs a teacher: "
                          f"--stage selfkd with --kd_alpha > 0 (this run: --stage {d.stage}, --kd_alpha "
                          f"{k.kd_alpha})")
    if k.gen_max_new_tokens < 1 or k.gen_temperature < 0:
        raise ConfigError(f"--gen_max_new_tokens must be >= 1 and --gen_temperature >= 0, got {k.gen_max_new_tokens} "
                          f"and {k.gen_temperature}")
    _check_choice("teacher", k.teacher, TEACHERS)
    if not 0.0 < k.ema_decay < 1.0:
        raise ConfigError(f"--ema_decay: must lie in (0, 1), got {k.ema_decay}")
    if k.kd_chunk_size < 1:
        raise ConfigError(f"--kd_chunk_size: must be >= 1, got {k.kd_chunk_size}")
    _check_choice("whisper_input", m.whisper_input, ("auto", *WHISPER_INPUTS))
    if m.lora_r < 0 or m.lora_alpha <= 0 or not 0 <= m.lora_dropout < 1:
        raise ConfigError(f"--lora_r must be >= 0, --lora_alpha > 0 and --lora_dropout in [0, 1); got {m.lora_r}, "
                          f"{m.lora_alpha}, {m.lora_dropout}")
    if m.lora_r and not m.lora_targets:
        raise ConfigError("--lora_targets: name at least one Linear layer of the LLM")
    if m.lora_r and "llm" not in m.trainable:
        raise ConfigError(f"--lora_r {m.lora_r} adds adapters to the LLM but --trainable {','.join(m.trainable)} does not "
                          "train them: add llm (with LoRA it means the adapters) or set --lora_r 0")
    if m.lora_r and m.lora_dropout and k.kd_alpha > 0 and k.teacher != "frozen":
        raise ConfigError(f"--lora_dropout {m.lora_dropout} with the {k.teacher} teacher: its no-grad pass runs the "
                          "adapters with dropout on, a noisy teacher; set --lora_dropout 0 or use --teacher frozen")
    if k.teacher != "shared" and "vision" in m.trainable:
        raise ConfigError(
            f"--teacher {k.teacher} with a trainable vision tower: the teacher pass reuses the student's (live) "
            "vision features, so it would not be the snapshot it claims; freeze vision or use --teacher shared"
        )
    if d.stage == "align" and k.kd_alpha > 0:
        raise ConfigError("--stage align trains on ASR shards (no typed question, no teacher): set --kd_alpha 0")
    if d.stage == "mixed" and k.kd_alpha > 0:
        raise ConfigError("--stage mixed trains ASR and typed samples with CE only (no teacher): set --kd_alpha 0")
    if d.stage == "vl" and k.kd_alpha > 0:
        raise ConfigError("--stage vl trains the typed-question path itself (no teacher): set --kd_alpha 0")

    for flag in ("micro_batch_size", "grad_accum", "max_steps", "max_nonfinite_steps", "token_budget_buffer"):
        if getattr(o, flag) < 1:
            raise ConfigError(f"--{flag}: must be >= 1, got {getattr(o, flag)}")
    if o.max_tokens_per_micro_batch < 0:
        raise ConfigError(f"--max_tokens_per_micro_batch: must be >= 0, got {o.max_tokens_per_micro_batch}")
    if o.max_tokens_per_micro_batch:
        if o.micro_batch_size != 1:
            raise ConfigError(f"--micro_batch_size {o.micro_batch_size} and --max_tokens_per_micro_batch "
                              f"{o.max_tokens_per_micro_batch} both size the micro-batch: give one of them")
        sides = 2 if counts_teacher_tokens(c) else 1
        if o.max_tokens_per_micro_batch < sides * d.max_seq_len:
            raise ConfigError(f"--max_tokens_per_micro_batch {o.max_tokens_per_micro_batch} cannot hold one sample of "
                              f"--max_seq_len {d.max_seq_len} on each of the step's {sides} side(s): give at least "
                              f"{sides * d.max_seq_len}, or lower --max_seq_len")
    if o.lr <= 0:
        raise ConfigError(f"--lr: must be > 0, got {o.lr}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"--min_lr_ratio: must lie in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps < 0 or o.max_grad_norm <= 0 or o.weight_decay < 0:
        raise ConfigError("--warmup_steps and --weight_decay must be >= 0, --max_grad_norm > 0")

    if ck.save_every < 1 or ck.keep_last < 1:
        raise ConfigError("--save_every and --keep_last must be >= 1")
    if ck.resume == "auto" and ck.save_dir is None:
        raise ConfigError("--resume auto needs --save_dir to look in")
    if lg.log_every < 1 or lg.eval_every < 0 or lg.dist_timeout_s < 10:
        raise ConfigError("--log_every must be >= 1, --eval_every >= 0, --dist_timeout_s >= 10")


def counts_teacher_tokens(config: Config) -> bool:
    """Whether the step runs a teacher pass over the typed side (Self-KD with kd_alpha > 0)."""
    return config.data.stage == "selfkd" and config.distill.kd_alpha > 0


def reference_table() -> str:
    """docs/configuration.md's reference table, generated from the field docstrings."""
    lines = ["| flag / YAML key | section | default | meaning |", "|---|---|---|---|"]
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in fields(cls):
            default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            lines.append(f"| `--{f.name}` | {name} | `{default}` | {docs[f.name]} |")
    return "\n".join(lines)


def write_resolved(config: Config, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config.to_flat_dict(), f, sort_keys=False)
