"""Teachers for Self-KD: which weights produce the teacher's answer distribution.

  shared  the live weights (the paper): no copy, `teacher_ctx` is a no-op context.
  frozen  the weights at construction (the starting point of the run).
  ema     an exponential moving average of the weights, updated after every optimizer step:
          ema <- decay * ema + (1 - decay) * weights.

Only trainable parameters are copied (frozen ones are identical in every teacher). Under
ZeRO-3 no rank holds a whole parameter, and neither does a teacher: for every parameter it
keeps a copy of the rank's own flat partition (`param.ds_tensor`), and the EMA update is a
purely local `ema.mul_(d).add_(ds_tensor, alpha=1-d)` with no communication. During the
teacher pass the partitions are swapped in (`ds_tensor.data` points at the teacher copy),
so ZeRO-3's on-demand all-gathers assemble teacher weights; afterwards they are swapped
back. A gathered parameter would keep whatever it was gathered from, so both swaps happen
only when every parameter is released (ZeRO-3 status NOT_AVAILABLE): the teacher calls
`release` (the engine's `empty_partition_cache`) around each swap and asserts the status.
That also covers persistent parameters (`ds_persist`, below the persistence threshold):
once released, their partition is authoritative like any other. Without ZeRO-3 (a plain
module, ZeRO-1/2) the copies are full tensors swapped through `param.data`.

The teacher pass reuses the image features of the student pass (SelfKDObjective runs the
vision tower once, outside the teacher context), so a trainable vision tower's frozen/EMA
copies would never be used: with trainable vision a frozen/EMA teacher sees the live
student's image features (trainer.config refuses that combination).

The EMA is kept in fp32 (a bf16 EMA with decay 0.999 would round most updates away); it
is averaged from the compute-dtype weights (ZeRO-3's bf16 partitions), not the optimizer's
fp32 master copy.

Under LoRA (trainer/models/lora.py) the base weights never change, so the frozen teacher is the
same model with its adapters switched off (`AdaptersOffTeacher`, as TRL's DPO reference model
is): no copy at all, 0 extra bytes per rank. Parts trained in full beside the adapters (the
projector, the audio encoder) lie only on the spoken path, which the teacher never runs; a
trainable vision tower is refused by trainer.config as for every frozen teacher. The EMA
teacher under LoRA averages what trains (the adapters and any part trained in full), and
the shared teacher is the live model with its adapters.

Trainer usage (after `deepspeed.initialize`, and after loading a checkpoint):
    objective.teacher = make_teacher(kind, objective.model, ema_decay, zero_stage=3,
                                     release=engine.empty_partition_cache)
    out = engine(batch, normalizer, answer_chunks)          # the SelfKDObjective's forward
    engine.backward(out.loss); engine.step()
    if <that step was an optimizer step (gradient accumulation boundary)>: objective.teacher.update()
Checkpoints: `teacher.state_dict()` holds this rank's copies (save one file per rank) and
`teacher.load_state_dict(sd)` restores them on the same world size (`reshard_state` cuts them
for another one); both carry the teacher's `kind`, and loading another kind's state is a
ValueError naming both.
"""

import contextlib

import torch
from torch import nn

TEACHERS = ("shared", "frozen", "ema")


def _is_zero3(param) -> bool:
    return hasattr(param, "ds_tensor") and param.ds_tensor is not None


def _local_tensor(param) -> torch.Tensor:
    """What this rank owns of `param`: its ZeRO-3 partition, or the whole tensor."""
    return param.ds_tensor if _is_zero3(param) else param


def _check_kind(state: dict, kind: str) -> None:
    """A checkpoint's teacher state must come from a teacher of the same kind (resuming an
    ema run with --teacher shared, or the reverse, would silently change the teacher)."""
    saved = state.get("kind")
    if saved is None:
        raise ValueError(f"the checkpoint's teacher state has no 'kind' (keys {sorted(state)}); this run's teacher is {kind}")
    if saved != kind:
        raise ValueError(
            f"the checkpoint holds the state of a teacher of kind {saved!r} but this run's teacher is {kind!r}: "
            f"resume with --teacher {saved} or start a new run"
        )


class SharedTeacher:
    """The live weights: the teacher pass is the model itself under no_grad."""

    swaps_weights = False
    kind = "shared"

    def context(self):
        return contextlib.nullcontext()

    def update(self) -> None:
        """Nothing to follow: the shared teacher is the student."""

    def state_dict(self) -> dict:
        return {"kind": self.kind}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind)

    def resident_bytes(self) -> int:
        """Teacher weights this rank holds beyond the model's own: none."""
        return 0


class AdaptersOffTeacher(SharedTeacher):
    """The frozen teacher of a LoRA model: the live model with every adapter switched off,
    which is the start model exactly (the base weights never train). Other weights than the
    student's, so the student's prefix is not shared (`swaps_weights`)."""

    swaps_weights = True
    kind = "frozen"

    def __init__(self, model: nn.Module):
        from trainer.models.lora import adapter_names

        if not adapter_names(model):
            raise ValueError("an adapters-off teacher needs a model with LoRA adapters")
        self.model = model

    def context(self):
        from trainer.models.lora import adapters_disabled

        return adapters_disabled(self.model)


class SnapshotTeacher:
    """Own copies of the trainable weights, swapped in for the teacher pass."""

    swaps_weights = True

    def __init__(self, model: nn.Module, *, storage_dtype: torch.dtype | None = None, release=None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters: a frozen/EMA teacher would equal the student")
        self.zero3 = _is_zero3(self.params[0])
        if self.zero3 and release is None:
            raise ValueError("a ZeRO-3 teacher needs release=engine.empty_partition_cache to swap partitions safely")
        self.release = release
        with torch.no_grad():
            self.copies = [
                _local_tensor(p).detach().to(dtype=storage_dtype or p.dtype, copy=True) for p in self.params
            ]
        self._swapped = False

    def _release_all(self) -> None:
        if not self.zero3:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.release()
        busy = [p.ds_summary() for p in self.params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
        if busy:
            raise RuntimeError(f"cannot swap teacher weights while parameters are gathered: {busy[:3]}")

    @contextlib.contextmanager
    def _swapped_in(self):
        if self._swapped:
            raise RuntimeError("teacher context entered twice")
        self._release_all()
        originals = []
        with torch.no_grad():
            for param, copy in zip(self.params, self.copies):
                local = _local_tensor(param)
                originals.append(local.data)
                local.data = copy if copy.dtype == local.dtype else copy.to(local.dtype)
        self._swapped = True
        try:
            yield
        finally:
            # Drop everything gathered from teacher partitions before the student runs.
            self._release_all()
            for param, original in zip(self.params, originals):
                _local_tensor(param).data = original
            self._swapped = False

    def context(self):
        """The teacher pass runs inside this: teacher weights swapped in, then back."""
        return self._swapped_in()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "copies": [c.clone() for c in self.copies]}

    def resident_bytes(self) -> int:
        """Teacher weights this rank holds beyond the model's own: its copies."""
        return sum(c.numel() * c.element_size() for c in self.copies)

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind)
        copies = state["copies"]
        if len(copies) != len(self.copies) or any(a.shape != b.shape for a, b in zip(copies, self.copies)):
            raise ValueError("teacher state does not match this model / world size (partition shapes differ)")
        with torch.no_grad():
            for mine, saved in zip(self.copies, copies):
                mine.copy_(saved)


class FrozenTeacher(SnapshotTeacher):
    """The weights at construction time, never updated."""

    kind = "frozen"

    def update(self) -> None:
        """A frozen teacher keeps its starting weights."""


class EMATeacher(SnapshotTeacher):
    """fp32 exponential moving average of the trainable weights."""

    kind = "ema"

    def __init__(self, model: nn.Module, *, decay: float, release=None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        super().__init__(model, storage_dtype=torch.float32, release=release)
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ema <- d * ema + (1 - d) * weights, on local data only."""
        if self._swapped:
            raise RuntimeError("EMA update inside the teacher context would average the teacher into itself")
        for param, ema in zip(self.params, self.copies):
            ema.mul_(self.decay).add_(_local_tensor(param).detach().float(), alpha=1.0 - self.decay)


def reshard_flat(parts: list, numel: int, like: torch.Tensor, rank: int) -> torch.Tensor:
    """The saved ranks' ZeRO-3 partitions of one parameter (in rank order) -> this rank's: the
    partitions concatenated are the flat parameter (then padding); this rank's is elements
    [rank * n, rank * n + n) of it (n = `like`'s size, DeepSpeed's partition), zero past the end."""
    whole = torch.cat([p.reshape(-1) for p in parts])[:numel]
    if whole.numel() != numel:
        raise ValueError(f"the saved partitions hold {whole.numel()} elements, the parameter {numel}")
    n = like.numel()
    part = torch.zeros(n, dtype=like.dtype)
    piece = whole[rank * n:rank * n + n]
    part[:piece.numel()] = piece.to(like.dtype)
    return part


def reshard_state(saved: list, teacher, rank: int) -> dict:
    """The teacher state for this rank of a run resumed on another world size, from every saved
    rank's `state_dict()` (saved[r] is rank r's). Under ZeRO-3 each copy is a rank's flat
    partition: the saved ranks' partitions of a parameter, concatenated, are the whole flat
    parameter (then padding), and this rank's new partition is cut from it -- bit for bit.
    Full copies (no ZeRO-3) are the same on every rank: rank 0's is kept."""
    for state in saved:
        _check_kind(state, teacher.kind)
    if "copies" not in saved[0]:
        return dict(saved[0])
    if len({len(s["copies"]) for s in saved} | {len(teacher.copies)}) != 1:
        raise ValueError("the saved teacher states hold another number of parameters than this model trains")
    if not teacher.zero3:
        return {"kind": teacher.kind, "copies": [c.clone() for c in saved[0]["copies"]]}
    copies = [reshard_flat([s["copies"][i] for s in saved], param.ds_numel, mine, rank)
              for i, (param, mine) in enumerate(zip(teacher.params, teacher.copies))]
    return {"kind": teacher.kind, "copies": copies}


def make_teacher(kind: str, model: nn.Module, ema_decay: float = 0.999, *, zero_stage: int = 0, release=None):
    """`kind` in shared|frozen|ema; `model` is the OmniModel (after deepspeed.initialize);
    under ZeRO-3 `release` must be `engine.empty_partition_cache`. A frozen teacher of a model
    with LoRA adapters is the model with its adapters off (no copy)."""
    if kind != "shared" and zero_stage == 3 and release is None:
        raise ValueError(f"a {kind} teacher under ZeRO-3 needs release=engine.empty_partition_cache")
    if kind == "shared":
        return SharedTeacher()
    if kind == "frozen":
        if getattr(model, "lora", None):
            return AdaptersOffTeacher(model)
        return FrozenTeacher(model, release=release)
    if kind == "ema":
        return EMATeacher(model, decay=ema_decay, release=release)
    raise ValueError(f"teacher must be one of {TEACHERS}, got {kind!r}")
