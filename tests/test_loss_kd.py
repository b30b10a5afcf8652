"""Chunked answer-token loss vs a naive full-logits [B, T, V] reference written here."""

import pytest
import torch
import torch.nn.functional as F

from trainer.distill.loss import KDSettings, answer_token_loss, chunk_bounds, combine
from trainer.loop import answer_chunks_for

B, T, H, V = 3, 11, 16, 37


def naive_reference(student_hidden_btH, teacher_hidden_btH, labels_bt, lm_head, divergence, temperature, beta=None):
    """Full logits for every position, shift by one, mask -100, sum over tokens."""
    student_logits = lm_head(student_hidden_btH)[:, :-1].float()  # B, T-1, V
    teacher_logits = lm_head(teacher_hidden_btH)[:, :-1].float().detach()
    targets = labels_bt[:, 1:]
    mask = targets != -100
    ce = F.cross_entropy(student_logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100, reduction="sum")
    p_s = torch.softmax(student_logits / temperature, -1)
    p_t = torch.softmax(teacher_logits / temperature, -1)
    if divergence == "fkl":
        per_token = (p_t * (p_t.log() - p_s.log())).sum(-1)
    elif divergence == "rkl":
        per_token = (p_s * (p_s.log() - p_t.log())).sum(-1)
    elif divergence == "gjsd":  # GKD's generalized JSD, mixture M = beta p_T + (1 - beta) p_S
        m = beta * p_t + (1 - beta) * p_s
        per_token = beta * (p_t * (p_t.log() - m.log())).sum(-1) + (1 - beta) * (p_s * (p_s.log() - m.log())).sum(-1)
    else:
        m = 0.5 * (p_s + p_t)
        per_token = 0.5 * (p_t * (p_t.log() - m.log())).sum(-1) + 0.5 * (p_s * (p_s.log() - m.log())).sum(-1)
    kd = (per_token * mask).sum()
    teacher_ce = F.cross_entropy(teacher_logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100, reduction="sum")
    agree = ((teacher_logits.argmax(-1) == student_logits.argmax(-1)) & mask).sum()
    p_teacher = torch.softmax(teacher_logits, -1)  # T = 1: the teacher's own answer distribution
    teacher_entropy = (-(p_teacher * p_teacher.log()).sum(-1) * mask).sum()
    return ce, kd, teacher_ce, agree, mask.sum(), teacher_entropy


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    lm_head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(V, H, generator=gen))
    student_hidden = torch.randn(B, T, H, generator=gen, requires_grad=True)
    teacher_hidden = torch.randn(B, T, H, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[:, :4] = -100  # prompt
    labels[1, -2:] = -100  # padding
    return lm_head, student_hidden, teacher_hidden, labels


def gather_answers(hidden_btH, labels_bt):
    """Hidden at position t predicts label t+1 -> (N, H), (N,)."""
    targets = labels_bt[:, 1:]
    mask = targets != -100
    return hidden_btH[:, :-1][mask], targets[mask]


@pytest.mark.parametrize("divergence, beta", [("fkl", None), ("rkl", None), ("jsd", None), ("gjsd", 0.1),
                                              ("gjsd", 0.5), ("gjsd", 0.9)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
@pytest.mark.parametrize("teacher_as_logits", [False, True])
def test_matches_full_logits_reference(divergence, beta, temperature, chunk_size, teacher_as_logits):
    lm_head, student_hidden, teacher_hidden, labels = make_inputs()
    settings = KDSettings(alpha=0.75, temperature=temperature, divergence=divergence, beta=beta)

    ref = naive_reference(student_hidden, teacher_hidden, labels, lm_head, divergence, temperature, beta)
    ref_loss = (0.75 * temperature**2 * ref[1] + (1 - 0.75) * ref[0]) / 5.0  # alpha T^2 KD + (1 - alpha) CE
    (ref_grad,) = torch.autograd.grad(ref_loss, student_hidden)

    student_answers, targets = gather_answers(student_hidden, labels)
    teacher_answers, _ = gather_answers(teacher_hidden, labels)
    teacher_kwargs = (
        dict(teacher_logits=lm_head(teacher_answers).detach())
        if teacher_as_logits
        else dict(teacher_hidden=teacher_answers)
    )
    sums = answer_token_loss(student_answers, targets, lm_head, settings, chunk_size=chunk_size, **teacher_kwargs)
    loss = combine(sums, settings, normalizer=5.0)
    (grad,) = torch.autograd.grad(loss, student_hidden)

    torch.testing.assert_close(sums["ce_sum"], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums["kd_sum"], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums["teacher_ce_sum"], ref[2], rtol=1e-5, atol=1e-5)
    assert sums["agree_count"].item() == ref[3].item()
    assert sums["n_tokens"].item() == ref[4].item()
    torch.testing.assert_close(sums["teacher_entropy_sum"], ref[5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("named, beta", [("fkl", 0.0), ("rkl", 1.0), ("jsd", 0.5)])
def test_named_divergences_are_gjsd_cases(named, beta):
    """The dispatch: gjsd at beta 0, 1 and 0.5 is the forward KL, the reverse KL and the JSD, loss
    and gradient (the formulas themselves are the full-logits reference test's), and next to an
    end the mixture form tends to 0, which is why the ends are the KLs by definition."""
    lm_head, student_hidden, teacher_hidden, labels = make_inputs(2)
    teacher_answers, _ = gather_answers(teacher_hidden, labels)

    def kd_and_grad(settings):
        student_answers, targets = gather_answers(student_hidden, labels)
        sums = answer_token_loss(student_answers, targets, lm_head, settings, teacher_hidden=teacher_answers, chunk_size=4)
        return sums["kd_sum"], torch.autograd.grad(combine(sums, settings, 3.0), student_hidden)[0]

    kd, grad = kd_and_grad(KDSettings(divergence=named, temperature=2.0))
    kd_gjsd, grad_gjsd = kd_and_grad(KDSettings(divergence="gjsd", beta=beta, temperature=2.0))
    torch.testing.assert_close(kd_gjsd, kd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_gjsd, grad, rtol=1e-6, atol=1e-7)
    if named != "jsd":  # next to an end the mixture form itself tends to 0: why the ends are the KLs by definition
        near, _ = kd_and_grad(KDSettings(divergence="gjsd", beta=abs(beta - 1e-4), temperature=2.0))
        assert 0 < near.item() < 0.01 * kd.item()


@pytest.mark.parametrize("kwargs, message", [(dict(divergence="gjsd"), "gjsd needs a beta in"),
                                             (dict(divergence="gjsd", beta=-0.1), "gjsd needs a beta in"),
                                             (dict(divergence="rkl", beta=1.0), "rkl is gjsd")])
def test_beta_belongs_to_gjsd(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KDSettings(**kwargs)


def test_sft_ignores_teacher_and_lm_head_grad_matches():
    lm_head, student_hidden, _, labels = make_inputs(1)
    student_answers, targets = gather_answers(student_hidden.detach(), labels)
    sums = answer_token_loss(student_answers, targets, lm_head, KDSettings(alpha=0.0), chunk_size=3)
    combine(sums, None, 2.0).backward()
    chunked_grad = lm_head.weight.grad.clone()
    lm_head.weight.grad = None
    ref_ce = F.cross_entropy(lm_head(student_answers), targets, reduction="sum")
    (ref_ce / 2.0).backward()
    torch.testing.assert_close(sums["ce_sum"], ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_grad, lm_head.weight.grad, rtol=1e-5, atol=1e-6)
    assert sums["kd_sum"].item() == 0.0


@pytest.mark.parametrize("settings", [KDSettings(), KDSettings(alpha=0.0), None], ids=["kd", "alpha0", "sft"])
def test_only_one_chunk_of_logits_is_saved_for_backward(settings):
    """The saved activations must not grow with the number of answer tokens x vocab, with
    or without a teacher: chunk_size bounds the logits independently of the KD settings."""
    lm_head = torch.nn.Linear(H, 4096, bias=False)
    student_answers = torch.randn(64, H, requires_grad=True)
    targets = torch.randint(0, 4096, (64,))
    saved_numel = []

    def pack(t):
        saved_numel.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        answer_token_loss(student_answers, targets, lm_head, settings, teacher_hidden=torch.randn(64, H), chunk_size=8)
    assert max(saved_numel) <= 8 * 4096


def test_chunk_bounds_fixed_count_allows_empty_chunks():
    assert chunk_bounds(10, 4) == [(0, 3), (3, 7), (7, 10)]  # ceil(10/4) = 3 near-equal chunks
    assert chunk_bounds(2, 4, num_chunks=3) == [(0, 1), (1, 1), (1, 2)]
    assert chunk_bounds(0, 4) == [(0, 0)]
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_bounds(3, 0)


def test_answer_chunks_for_uses_chunk_size():
    assert answer_chunks_for(0, 1024) == 1
    assert answer_chunks_for(10, 4) == 3
    assert answer_chunks_for(2048, 1024) == 2 and answer_chunks_for(2049, 1024) == 3


def test_teacher_token_count_mismatch_is_loud():
    lm_head, student_hidden, teacher_hidden, labels = make_inputs()
    student_answers, targets = gather_answers(student_hidden, labels)
    with pytest.raises(ValueError, match="answer tokens"):
        answer_token_loss(student_answers, targets, lm_head, KDSettings(), teacher_hidden=teacher_hidden[0, :3])
