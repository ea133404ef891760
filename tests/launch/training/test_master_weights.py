"""MasterWeightAdam: torch's Adam / AdamW on float32 master weights, bf16 parameters, one pass."""

from __future__ import annotations

import copy

import pytest
import torch

from launch.training.master_weights import MasterWeightAdam


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(37, 64), torch.nn.GELU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 5))


def _groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0, "lr": 3e-3}]


def _gradients(model: torch.nn.Module, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=generator).to(torch.bfloat16) * (1 + step) for p in model.parameters()]


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam-l2", "adamw"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_follows_torch_adam_on_float32_weights(decoupled, compile):
    """Same gradients (the bf16 ones, widened) into torch's Adam/AdamW on a float32 copy and into
    MasterWeightAdam: the masters follow torch's weights, the parameters are their bf16 rounding;
    a clip scale divides the gradients and a found_inf step changes nothing, not even the count."""
    reference = _model()
    model = copy.deepcopy(reference)
    torch_class = torch.optim.AdamW if decoupled else torch.optim.Adam
    expected = torch_class(_groups(reference, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    optimizer = MasterWeightAdam(_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                                 decoupled_weight_decay=decoupled, compile=compile)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    scales = [1.0, 2.5, 1.0, 4.0, 1.0]
    skipped = 2
    for step, scale in enumerate(scales):
        grads = _gradients(model, step)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        optimizer.grad_scale = torch.tensor(scale)
        optimizer.found_inf = torch.tensor(float(step == skipped))
        optimizer.step()
        if step != skipped:
            for p, g in zip(reference.parameters(), grads):
                p.grad = g.float() / scale
            expected.step()
        for name, (p, q) in enumerate(zip(model.parameters(), reference.parameters())):
            master = optimizer.master(p)
            torch.testing.assert_close(master, q.detach(), rtol=2e-6, atol=1e-7, msg=f"step {step} parameter {name}")
            assert torch.equal(p.detach(), master.to(torch.bfloat16))
    assert float(optimizer.state[next(iter(model.parameters()))]["step"]) == len(scales) - 1
    moved = max((optimizer.master(p) - q).abs().max().item() for p, q in zip(model.parameters(), _model().parameters()))
    assert moved > 1e-3  # the updates were not vanishingly small


def test_state_dict_round_trip_keeps_float32_and_resumes_bitwise():
    def run(steps, optimizer_state=None, model_state=None):
        model = _model()
        optimizer = MasterWeightAdam(_groups(model, 0.05), lr=2e-3, decoupled_weight_decay=True)
        if model_state is not None:
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
        for step in steps:
            for p, g in zip(model.parameters(), _gradients(model, step)):
                p.grad = g
            optimizer.step()
        return model, optimizer

    straight, straight_optimizer = run(range(6))
    first, first_optimizer = run(range(3))
    saved = copy.deepcopy(first_optimizer.state_dict())
    assert all(saved["state"][0][key].dtype == torch.float32 for key in ("master", "exp_avg", "exp_avg_sq"))
    resumed, resumed_optimizer = run(range(3, 6), saved, first.state_dict())
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert resumed_optimizer.state[p]["master"].dtype == torch.float32
        assert torch.equal(resumed_optimizer.master(p), straight_optimizer.master(q))
        assert torch.equal(p, q)


def test_state_of_another_optimizer_is_refused():
    model = _model()
    plain = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    plain.step()
    optimizer = MasterWeightAdam(_model().parameters())
    with pytest.raises(ValueError, match="no master weights and moments .* another optimizer"):
        optimizer.load_state_dict(plain.state_dict())


def test_a_model_cast_after_building_the_optimizer_is_named():
    model = _model()
    optimizer = MasterWeightAdam(model.parameters())
    model.float()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="must stay torch.bfloat16 .* cast after building"):
        optimizer.step()


def test_set_master_sets_both_copies():
    model = _model()
    optimizer = MasterWeightAdam(model.parameters())
    weight = model[0].weight
    value = torch.full(weight.shape, 1 / 3)
    optimizer.set_master(weight, value)
    assert torch.equal(optimizer.master(weight), value) and torch.equal(weight.detach(), value.to(torch.bfloat16))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="betas"):
        MasterWeightAdam(_model().parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="dtype"):
        MasterWeightAdam(_model().parameters(), dtype=torch.float32)
