"""On-policy Self-KD (trainer/distill/on_policy.py): which micro-batches, the prompts the student
answers, the batch rebuilt around its answers, the seeded sampler, and the loss against a naive
full-logits reference written here; then 2-rank ZeRO-3 runs in the shared launch."""

import dataclasses
import math
import os

import pytest
import torch

from tests.shared_launch import Check, call, main
from tests.test_model_omni import model, processor  # noqa: F401 - the tiny model and processor fixtures
from trainer.data.batch import IGNORE_INDEX
from trainer.distill.loss import KDSettings
from trainer.distill.objective import SelfKDObjective
from trainer.distill.on_policy import is_on_policy, prompt_batch, sample_answers, with_answers
from trainer.models.synthetic import make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_START = os.path.join(ROOT, "docs", "results", "selfkd_vs_sft_v2", "attempt_colour_position_extra")
ON_POLICY = ("--model", TOY_START, "--kd_on_policy_fraction", "0.5", "--gen_max_new_tokens", "6",
             "--gen_temperature", "1.0", "--grad_accum", "2", "--micro_batch_size", "3", "--max_steps", "4",
             "--save_every", "2", "--teacher", "ema", "--num_workers", "0")

CHECKS = [
    Check("on_policy", [
        main("full", *ON_POLICY, "--save_dir", "{dir}/ckpt_full"),
        call("tests.test_train_zero3:copy_checkpoint", "{dir}/ckpt_full/step_00000002", "{dir}/ckpt_resumed",
             rank0_only=True),
        main("resumed", *ON_POLICY, "--save_dir", "{dir}/ckpt_resumed", "--resume", "auto")]),
]


def test_which_micro_batches_are_on_policy():
    """A draw from (seed, step, micro-batch) alone: repeatable, its share near the fraction, and
    0 / 1 never / always."""
    draws = [is_on_policy(5, step, micro, 0.3) for step in range(1, 501) for micro in range(4)]
    assert draws == [is_on_policy(5, step, micro, 0.3) for step in range(1, 501) for micro in range(4)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.04
    assert draws != [is_on_policy(6, step, micro, 0.3) for step in range(1, 501) for micro in range(4)]
    assert not any(is_on_policy(5, s, 0, 0.0) for s in range(50)) and all(is_on_policy(5, s, 0, 1.0) for s in range(50))


def test_prompt_batch_is_the_eval_collators_prompts(processor):
    """The training batch's prompts, cut before the answer and left-padded, equal what the eval
    collator makes of the same samples (ids, masks and positions, both sides)."""
    train = make_batch(processor, 4, seed=3, stage="selfkd", image_size=[(56, 84), None, (84, 56), (56, 56)])
    reference = make_batch(processor, 4, seed=3, stage="eval", image_size=[(56, 84), None, (84, 56), (56, 56)])
    prompts = prompt_batch(train, processor.pad_id)
    for role in ("student", "teacher"):
        ids, mask, labels = prompts.side(role)
        ref_ids, ref_mask, _ = reference.side(role)
        assert labels is None
        assert torch.equal(mask, ref_mask) and torch.equal(ids[mask.bool()], ref_ids[ref_mask.bool()]), role
        assert torch.equal(prompts.position_ids(role), reference.position_ids(role)), role


def test_with_the_reference_answers_gives_back_the_training_batch(model, processor):
    """Rebuilt around its own reference answers, a training batch is itself again: ids, masks and
    labels; the positions the model computes for it equal the collator's."""
    batch = make_batch(processor, 3, seed=4, stage="selfkd")
    ids, _, labels = batch.side("student")
    answers = [row[row != IGNORE_INDEX].tolist() for row in labels]
    rebuilt = with_answers(batch, answers, processor.pad_id)
    for role in ("student", "teacher"):
        for mine, theirs in zip(rebuilt.side(role), batch.side(role)):
            assert torch.equal(mine, theirs), role
        assert torch.equal(rebuilt.position_ids(role), batch.position_ids(role)), role
        without = dataclasses.replace(rebuilt, **{f"{role}_position_ids": None})
        assert torch.equal(model.positions(without, role), batch.position_ids(role)), "the VLM's own rope index"
    with pytest.raises(ValueError, match="no generated token for samples"):
        with_answers(batch, [answers[0], [], answers[2]], processor.pad_id)
    # --max_seq_len: an answer is cut so that neither side passes it.
    longest = int(max(batch.student_attention_mask.sum(1).max(), batch.teacher_attention_mask.sum(1).max()))
    long_answers = [answer * 20 for answer in answers]
    cut = with_answers(batch, long_answers, processor.pad_id, max_len=longest + 3)
    assert max(int(cut.student_attention_mask.sum(1).max()), int(cut.teacher_attention_mask.sum(1).max())) \
        <= longest + 3
    assert all(int((row != IGNORE_INDEX).sum()) >= 1 for row in cut.student_labels)


def test_sampled_answers_are_seeded_and_never_placeholders(model, processor):
    """The same (seed, step, micro-batch, rank) draws the same answers, another rank others; an
    image or audio placeholder is never emitted, even where the model would prefer it."""
    batch = make_batch(processor, 3, seed=5, stage="selfkd")
    args = dict(max_new_tokens=5, temperature=1.0, seed=1, step=3, micro=0, synced=False)
    first = sample_answers(model, batch, rank=0, **args)
    assert first == sample_answers(model, batch, rank=0, **args)
    assert first != sample_answers(model, batch, rank=1, **args)
    assert model.training, "generation leaves the model in training mode"
    with torch.no_grad():  # the LM head now points every hidden state at the two placeholders
        head = model.adapter.lm_head.weight
        head[model.audio_pad_id] = head.mean(0) * 0 + 50.0
        head[model.image_token_id] = head.mean(0) * 0 + 49.0
    for temperature in (0.0, 1.0):
        answers = sample_answers(model, batch, rank=0, **{**args, "temperature": temperature})
        flat = [t for answer in answers for t in answer]
        assert flat and not {model.audio_pad_id, model.image_token_id} & set(flat)
    model.eval()  # the control: unsuppressed, greedy decoding emits the placeholder
    with torch.no_grad():
        plain = model.generate_ids(prompt_batch(batch, processor.pad_id), "audio", 3)
    assert model.audio_pad_id in {t for answer in plain for t in answer}


def _special_ids(processor) -> set:
    tokenizer = processor.tokenizer
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def test_greedy_answers_are_the_argmax_of_the_rebuilt_batch(model, processor):
    """Decoded with a cache and positions stepped one by one, the greedy answer of each sample is
    the argmax (special tokens aside, as the sampler has them) of the student's teacher-forced
    logits on the rebuilt batch: the rebuilt ids and positions are the ones generation used."""
    batch = make_batch(processor, 3, seed=8, stage="selfkd", image_size=[(56, 84), None, (84, 56)])
    answers = sample_answers(model, batch, max_new_tokens=5, temperature=0.0, seed=0, step=1, micro=0, rank=0,
                             synced=True)
    rebuilt = with_answers(batch, answers, processor.pad_id)
    stop = {processor.tokenizer.convert_tokens_to_ids(processor.turn_end), processor.tokenizer.eos_token_id,
            processor.pad_id}
    banned = sorted(_special_ids(processor) - stop)
    model.eval()
    with torch.no_grad():
        images, _ = model.encode_images(rebuilt)
        audio, _ = model.encode_audio(rebuilt)
        hidden, _ = model.run_side(rebuilt, "student", images, audio, model.positions(rebuilt, "student"))
        logits = model.adapter.lm_head(hidden)
    logits[..., banned] = float("-inf")
    labels = rebuilt.student_labels
    for i, answer in enumerate(answers):
        first = int((labels[i] != IGNORE_INDEX).int().argmax())
        assert logits[i, first - 1:first - 1 + len(answer)].argmax(-1).tolist() == answer, i


def test_logged_loss_adds_the_on_and_off_policy_parts():
    """combine_sums with the on-policy part: alpha KD + (1 - alpha) CE over the off-policy sums
    plus KD alone over the on-policy ones, all per answer token of the step."""
    from trainer.distill.objective import combine_sums

    kd = KDSettings(alpha=0.75, temperature=2.0, divergence="fkl")
    total = [10.0, 4.0, 0.0, 0.0, 0.0, 20.0]  # ce, kd, teacher ce, agree, entropy, tokens
    on = [3.0, 1.0, 0.0, 0.0, 0.0, 5.0]
    expected = (0.75 * 4 * (4.0 - 1.0) + 0.25 * (10.0 - 3.0) + 4 * 1.0) / 20.0
    assert combine_sums(total, kd, on_policy_sums=on) == pytest.approx(expected)
    assert combine_sums(total, kd, on_policy_sums=[0.0] * 6) == pytest.approx((0.75 * 4 * 4.0 + 0.25 * 10.0) / 20)


def test_the_token_budget_plans_room_for_on_policy_answers():
    from trainer.data.budget import sample_lengths

    sample = {"student_prompt_ids": [1] * 10, "teacher_prompt_ids": [1] * 7, "answer_ids": [2, 3]}
    assert sample_lengths(sample, True) == (12, 9)
    assert sample_lengths(sample, True, answer_reserve=32) == (42, 39)
    assert sample_lengths({**sample, "answer_ids": [2] * 40}, True, answer_reserve=32) == (50, 47)


def naive_kd(model, batch, beta: float, temperature: float) -> torch.Tensor:
    """Generalized JSD summed over the answer tokens (beta 0: KL(teacher ‖ student), 1: KL(student
    ‖ teacher)), from full [B, T, V] logits of each side's whole sequence (no prefix sharing, no
    chunks, no answer gathering)."""
    images, _ = model.encode_images(batch)
    audio, _ = model.encode_audio(batch)
    student, _ = model.run_side(batch, "student", images, audio, model.positions(batch, "student"))
    with torch.no_grad():
        teacher, _ = model.run_side(batch, "teacher", images.detach(), None, model.positions(batch, "teacher"))
    rows = []
    for role, hidden in (("student", student), ("teacher", teacher)):
        with torch.set_grad_enabled(role == "student"):  # the teacher's logits carry no gradient
            logits = model.adapter.lm_head(hidden)[:, :-1].float() / temperature
        mask = batch.side(role)[2][:, 1:] != IGNORE_INDEX
        rows.append(torch.log_softmax(logits, -1)[mask])  # N, V in sample order
    log_s, log_t = rows
    p_s, p_t = log_s.exp(), log_t.exp()
    if beta == 0:  # by definition the ends are the KLs (the mixture's JSD vanishes there)
        return (p_t * (log_t - log_s)).sum()
    if beta == 1:
        return (p_s * (log_s - log_t)).sum()
    log_m = torch.log(beta * p_t + (1 - beta) * p_s)
    per_token = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    return per_token.sum()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_on_policy_loss_and_gradients_match_a_naive_reference(model, processor, beta):
    """On the student's own sampled answers the objective's loss is alpha-1 KD (the CE term
    dropped): T^2 * gjsd_beta / normalizer, equal to the naive full-logits value within 1e-5,
    gradients of every trained parameter included."""
    batch = make_batch(processor, 3, seed=6, stage="selfkd")
    answers = sample_answers(model, batch, max_new_tokens=5, temperature=1.0, seed=2, step=1, micro=0, rank=0,
                             synced=False)
    batch = with_answers(batch, answers, processor.pad_id)
    kd = KDSettings(alpha=0.75, temperature=2.0, divergence="gjsd", beta=beta)
    normalizer = 7.0
    out = SelfKDObjective(model, kd, chunk_size=4)(batch, normalizer, None, True)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference = naive_kd(model, batch, beta, 2.0) * 2.0**2 / normalizer
    reference.backward()
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    assert int(out.n_tokens) == sum(map(len, answers))
    assert ours and set(ours) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in ours.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)
    off_policy = SelfKDObjective(model, kd, chunk_size=4)(batch, normalizer, None, False)
    expected = (0.75 * 4.0 * off_policy.kd_sum + 0.25 * off_policy.ce_sum) / normalizer
    assert off_policy.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow
@pytest.mark.launch_checks("on_policy")
def test_two_rank_on_policy_runs_and_resumes(launch):
    """2 ranks under ZeRO-3 from the toy start (it ends its answers, so ranks generate different
    lengths): on-policy micro-batches in some steps, no hang, and a resume from step 2 gives
    the uninterrupted run's steps 3-4 (the sampler is seeded per step, micro-batch and rank)."""
    full = launch.ok("on_policy", "full").metrics
    resumed = launch.ok("on_policy", "resumed")
    assert sorted(resumed.metrics) == [3, 4]
    shares = [full[s]["train/on_policy_share"] for s in sorted(full)]
    assert all(0 <= s <= 1 for s in shares) and full[3]["train/on_policy_share"] > 0, \
        "the resumed steps include on-policy micro-batches"
    lengths = [full[s]["train/gen_length"] for s in sorted(full) if full[s]["train/on_policy_share"]]
    assert all(0 < n <= 6 for n in lengths)
    assert any(n != int(n) for n in lengths), "answers of different lengths (a mean between whole numbers)"
    assert "train/gen_length" not in full[4], "the student's own answers are logged only on steps that had some"
    for step in (3, 4):
        for key in ("train/loss", "train/kd_loss", "train/gen_length", "train/on_policy_share", "train/grad_norm"):
            if key in full[step]:
                assert resumed.metrics[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert all(math.isfinite(full[s]["train/loss"]) for s in full)


@pytest.mark.parametrize("flags, message", [
    (["--kd_on_policy_fraction", "1.5"], "must lie in"),
    (["--kd_on_policy_fraction", "0.5", "--kd_alpha", "0"], "needs a teacher"),
    (["--kd_on_policy_fraction", "0.5", "--stage", "vl"], "needs a teacher"),
    (["--gen_max_new_tokens", "0"], "gen_max_new_tokens must be >= 1"),
    (["--gen_temperature", "-1"], "gen_temperature >= 0"),
])
def test_on_policy_flags_are_validated(flags, message):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(["--model", "tiny", "--train_shards", "x.tar", *flags])
