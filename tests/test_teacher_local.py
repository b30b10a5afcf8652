"""Frozen / EMA / shared teachers on a plain (non-ZeRO) module: full-tensor copies."""

import pytest
import torch
from torch import nn

from trainer.distill.teachers import EMATeacher, FrozenTeacher, SharedTeacher, make_teacher


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)  # frozen params are not copied
    return model


def sgd_step(model, optimizer):
    loss = model(torch.randn(5, 4)).pow(2).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_ema_follows_reference_and_swaps_back():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher = EMATeacher(model, decay=0.9)
    trainable = [p for p in model.parameters() if p.requires_grad]
    reference = [p.detach().clone() for p in trainable]
    for _ in range(4):
        sgd_step(model, optimizer)
        teacher.update()
        reference = [0.9 * r + 0.1 * p.detach() for r, p in zip(reference, trainable)]
    student = [p.detach().clone() for p in trainable]
    x = torch.randn(3, 4)
    with teacher.context():
        for p, r in zip(trainable, reference):
            torch.testing.assert_close(p.detach(), r)
        teacher_out = model(x)
        with pytest.raises(RuntimeError, match="inside the teacher context"):
            teacher.update()
    for p, s in zip(trainable, student):
        assert torch.equal(p.detach(), s)
    assert not torch.allclose(teacher_out, model(x))


def test_frozen_keeps_initial_weights_and_state_roundtrip():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    initial = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    teacher = FrozenTeacher(model)
    for _ in range(3):
        sgd_step(model, optimizer)
        teacher.update()
    with teacher.context():
        for p, i in zip([p for p in model.parameters() if p.requires_grad], initial):
            assert torch.equal(p.detach(), i)
    restored = FrozenTeacher(make_model())
    restored.load_state_dict(teacher.state_dict())
    for a, b in zip(restored.copies, teacher.copies):
        assert torch.equal(a, b)


def test_loading_another_kinds_state_names_both_kinds():
    ema, frozen, shared = EMATeacher(make_model(), decay=0.5), FrozenTeacher(make_model()), SharedTeacher()
    assert ema.state_dict()["kind"] == "ema" and shared.state_dict() == {"kind": "shared"}
    shared.load_state_dict(SharedTeacher().state_dict())
    with pytest.raises(ValueError, match="kind 'ema' but this run's teacher is 'shared'"):
        shared.load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="kind 'shared' but this run's teacher is 'ema'"):
        ema.load_state_dict(shared.state_dict())
    with pytest.raises(ValueError, match="kind 'frozen' but this run's teacher is 'ema'"):
        ema.load_state_dict(frozen.state_dict())
    with pytest.raises(ValueError, match="no 'kind'"):
        frozen.load_state_dict({"copies": frozen.copies})


def test_shared_and_factory():
    assert isinstance(make_teacher("shared", make_model()), SharedTeacher)
    assert make_teacher("ema", make_model(), ema_decay=0.5).decay == 0.5
    with pytest.raises(ValueError, match="teacher must be one of"):
        make_teacher("mean", make_model())
    with pytest.raises(ValueError, match="ema_decay"):
        EMATeacher(make_model(), decay=1.0)
