"""Answer-token distillation loss: chunked LM head, KD divergence + cross-entropy sums.

The model gathers the hidden states at answer positions (N, H) for the student and, when
distilling, for the teacher; this module turns them into summed losses without ever
materialising more than one chunk of logits (chunk, V): each chunk's logits are computed
inside a non-reentrant activation checkpoint, so the backward pass recomputes them one chunk
at a time as well.

  loss = (alpha * T^2 * kd_sum + (1 - alpha) * ce_sum) / normalizer      (see `combine`)

  gjsd(beta): beta KL(p_T || M) + (1 - beta) KL(p_S || M),  M = beta p_T + (1 - beta) p_S
              for 0 < beta < 1 (GKD's generalized JSD, as TRL's GKD trainer computes it); its ends
              are the two KLs by definition (the mixture form itself tends to 0 there):
  fkl = gjsd(0): KL(p_T || p_S)   (the paper's Self-KD loss, teacher first)
  rkl = gjsd(1): KL(p_S || p_T)
  jsd = gjsd(0.5): 0.5 KL(p_T || M) + 0.5 KL(p_S || M),  M = (p_T + p_S) / 2
with p = softmax(logits / T) for both sides, and CE at T = 1 on the student.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("fkl", "rkl", "jsd", "gjsd")
NAMED_BETA = {"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}  # the named cases of gjsd


@dataclass(frozen=True)
class KDSettings:
    """How the teacher's answer distribution enters the loss."""

    alpha: float = 0.75  # weight of the KD term; 0 = plain SFT (no teacher pass at all)
    temperature: float = 1.0  # applied to teacher and student logits; KD term scaled by T^2
    divergence: str = "fkl"  # fkl | rkl | jsd | gjsd
    beta: float | None = None  # gjsd only: 0 forward KL ... 1 reverse KL

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"kd alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"kd temperature must be > 0, got {self.temperature}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"kd divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.divergence == "gjsd" and (self.beta is None or not 0.0 <= self.beta <= 1.0):
            raise ValueError(f"kd divergence gjsd needs a beta in [0, 1], got {self.beta}")
        if self.divergence != "gjsd" and self.beta is not None:
            raise ValueError(f"kd beta {self.beta} is gjsd's: {self.divergence} is gjsd({NAMED_BETA[self.divergence]})")

    @property
    def gjsd_beta(self) -> float:
        """The generalized JSD's beta this divergence is."""
        return self.beta if self.divergence == "gjsd" else NAMED_BETA[self.divergence]

    @property
    def uses_teacher(self) -> bool:
        return self.alpha > 0


def divergence_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str, temperature: float,
                   beta: float | None = None):
    """Summed per-token divergence between tempered distributions; logits (n, V), fp32.
    `divergence` is a named case or gjsd with its `beta`."""
    beta = KDSettings(divergence=divergence, beta=beta).gjsd_beta
    student_logp = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0.0:
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum()
    if beta == 1.0:
        return (student_logp.exp() * (student_logp - teacher_logp)).sum()
    mixture_logp = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log1p(-beta)]), dim=0)
    return beta * (teacher_logp.exp() * (teacher_logp - mixture_logp)).sum() + (1.0 - beta) * (
        student_logp.exp() * (student_logp - mixture_logp)
    ).sum()


def _chunk_sums(student_hidden, teacher_hidden, teacher_logits, target_ids, lm_head, divergence, temperature, beta):
    """One chunk: (ce_sum, kd_sum, teacher_ce_sum, agree_count, teacher_entropy_sum). Run under
    checkpoint, so its logits are freed after the forward and recomputed in the backward."""
    student_logits = lm_head(student_hidden).float()  # n, H -> n, V
    ce_sum = F.cross_entropy(student_logits, target_ids, reduction="sum")
    zero = student_logits.new_zeros(())
    if teacher_hidden is None and teacher_logits is None:
        return ce_sum, zero, zero, zero, zero
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = lm_head(teacher_hidden)  # n, H -> n, V
    teacher_logits = teacher_logits.float().detach()
    kd_sum = divergence_sum(student_logits, teacher_logits, divergence, temperature, beta)
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_logits, dim=-1)  # the teacher's own distribution (T = 1)
        teacher_ce_sum = F.nll_loss(teacher_logp, target_ids, reduction="sum")
        teacher_entropy_sum = -(teacher_logp.exp() * teacher_logp).sum()
        agree_count = (teacher_logits.argmax(-1) == student_logits.argmax(-1)).sum().float()
    return ce_sum, kd_sum, teacher_ce_sum, agree_count, teacher_entropy_sum


def chunk_bounds(n_tokens: int, chunk_size: int, num_chunks: int | None = None) -> list[tuple[int, int]]:
    """Split [0, n_tokens) into chunks of at most `chunk_size`, or into exactly `num_chunks`
    near-equal (possibly empty) chunks. Under ZeRO-3 every LM-head call is a collective
    gather, so all ranks must make the same number of calls: the trainer passes the same
    `num_chunks` everywhere."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_chunks is None:
        num_chunks = max(1, math.ceil(n_tokens / chunk_size))
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    edges = [round(i * n_tokens / num_chunks) for i in range(num_chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def answer_token_loss(
    student_hidden: torch.Tensor,
    target_ids: torch.Tensor,
    lm_head,
    settings: KDSettings | None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    num_chunks: int | None = None,
    chunk_size: int = 1024,
) -> dict:
    """Summed answer-token losses.

    student_hidden (N, H) with grad; target_ids (N,) the token each position predicts;
    lm_head: module/callable H -> V (called as a module so ZeRO-3 hooks gather it).
    Teacher given as hidden states (N, H) (its logits are recomputed per chunk with the
    same `lm_head`: the teacher shares the head) or as precomputed logits (N, V) (a teacher
    with its own weights, computed inside its context). Neither: SFT.
    The LM head runs on chunks of at most `chunk_size` answer tokens (bounds the live
    logits, SFT and KD alike), or on exactly `num_chunks` chunks when given.
    Returns ce_sum, kd_sum (not yet scaled by T^2), teacher_ce_sum, agree_count,
    teacher_entropy_sum (the teacher's answer-token entropy in nats, at T = 1: how sure the
    distilled targets are), n_tokens; ce_sum and kd_sum carry grad, the rest are detached.
    """
    n_tokens = student_hidden.shape[0]
    if target_ids.shape != (n_tokens,):
        raise ValueError(f"target_ids shape {tuple(target_ids.shape)} != ({n_tokens},)")
    use_teacher = settings is not None and settings.uses_teacher
    if use_teacher:
        if (teacher_hidden is None) == (teacher_logits is None):
            raise ValueError("KD needs exactly one of teacher_hidden or teacher_logits")
        teacher = teacher_hidden if teacher_hidden is not None else teacher_logits
        if teacher.shape[0] != n_tokens:
            raise ValueError(f"teacher has {teacher.shape[0]} answer tokens, student {n_tokens}")
    else:
        teacher_hidden = teacher_logits = None
    divergence = settings.divergence if settings is not None else "fkl"
    temperature = settings.temperature if settings is not None else 1.0
    beta = settings.beta if settings is not None else None

    totals = [student_hidden.new_zeros((), dtype=torch.float32) for _ in range(5)]
    for start, end in chunk_bounds(n_tokens, chunk_size, num_chunks):
        sums = checkpoint(
            _chunk_sums,
            student_hidden[start:end],
            None if teacher_hidden is None else teacher_hidden[start:end],
            None if teacher_logits is None else teacher_logits[start:end],
            target_ids[start:end],
            lm_head,
            divergence,
            temperature,
            beta,
            use_reentrant=False,
        )
        totals = [total + part for total, part in zip(totals, sums)]
    ce_sum, kd_sum, teacher_ce_sum, agree_count, teacher_entropy_sum = totals
    return dict(
        ce_sum=ce_sum,
        kd_sum=kd_sum,
        teacher_ce_sum=teacher_ce_sum.detach(),
        agree_count=agree_count.detach(),
        teacher_entropy_sum=teacher_entropy_sum.detach(),
        n_tokens=torch.tensor(float(n_tokens), device=student_hidden.device),
    )


def combine(sums: dict, settings: KDSettings | None, normalizer: float):
    """(alpha * T^2 * kd_sum + (1 - alpha) * ce_sum) / normalizer: the loss, the one place its
    formula is written. Tensors (the objective) or floats (the loop's logged train/loss)."""
    if settings is None or not settings.uses_teacher:
        return sums["ce_sum"] / normalizer
    kd_weight = settings.alpha * settings.temperature**2
    return (kd_weight * sums["kd_sum"] + (1.0 - settings.alpha) * sums["ce_sum"]) / normalizer
