"""PositionDropout: nn.Dropout's distribution from drawn positions, its gradient, its compiled form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from parallel.dropout import PositionDropout
from parallel.layers import POSITIONS_UP_TO, LayerFactory


def within(frequency: float, probability: float, trials: int, sigmas: float = 5.0) -> bool:
    return abs(frequency - probability) <= sigmas * math.sqrt(probability * (1 - probability) / trials)


def test_each_element_is_dropped_with_probability_p_independently_of_the_others():
    # at p = 0.3 on three elements the positions drawn often collide: only the Poisson count
    # makes the marginals p and the pairs and the triple independent
    torch.manual_seed(0)
    dropout, trials = PositionDropout(0.3), 20000
    dropped = torch.stack([dropout(torch.ones(3)) == 0 for _ in range(trials)]).double()
    for element in range(3):
        assert within(float(dropped[:, element].mean()), 0.3, trials), f"element {element}"
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert within(float((dropped[:, a] * dropped[:, b]).mean()), 0.09, trials), f"pair {a, b}"
    assert within(float(dropped.prod(1).mean()), 0.027, trials)
    assert within(float((dropped.sum(1) == 0).double().mean()), 0.343, trials)


def test_small_p_on_a_large_tensor_keeps_the_rest_scaled_exactly():
    torch.manual_seed(1)
    x = torch.rand(2000, 1000) + 0.5  # no zeros of its own
    p = 0.001
    y = PositionDropout(p)(x)
    dropped = y == 0
    assert within(float(dropped.double().mean()), p, x.numel())
    assert torch.equal(y[~dropped], (x * (1 / (1 - p)))[~dropped])


def test_when_no_position_is_drawn_nothing_is_dropped():
    # four elements at p = 0.01: no position is drawn in ~96 % of calls; those must keep all values
    torch.manual_seed(2)
    dropout, x = PositionDropout(0.01), torch.tensor([1.0, 2.0, 3.0, 4.0])
    outputs = torch.stack([dropout(x) for _ in range(1000)])
    whole = (outputs != 0).all(1)
    assert torch.equal(outputs[whole], (x / 0.99).expand_as(outputs[whole]))
    assert within(float(1 - whole.double().mean()), 1 - 0.99**4, 1000)


def test_backward_zeroes_the_same_positions_and_scales_the_rest():
    torch.manual_seed(3)
    x = (torch.rand(64, 50, dtype=torch.float64) + 0.5).requires_grad_()
    upstream = torch.randn(64, 50, dtype=torch.float64)
    y = PositionDropout(0.04)(x)
    y.backward(upstream)
    kept = (y != 0).double()
    assert 0 < float(1 - kept.mean()) < 0.2
    assert torch.equal(x.grad, upstream * (1 / 0.96) * kept)


def test_eval_mode_and_zero_probability_are_the_identity_and_bad_p_is_refused():
    x = torch.randn(5, 7)
    assert PositionDropout(0.01).eval()(x) is x
    assert PositionDropout(0.0)(x) is x
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"dropout probability .*expected a number in \[0, 1\)"):
            PositionDropout(p)


def test_compiled_draws_the_same_positions_as_eager():
    # with aten's random kernels in the graph (launch.runtime.compile's fallback_random) a
    # compiled step drops what eager drops: one graph, the same generator calls
    dropout = PositionDropout(0.01)

    def step(x):
        return dropout(torch.nn.functional.gelu(x) * 2)

    x = torch.rand(300, 40) + 0.5
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        torch.manual_seed(4)
        first = compiled(x)
        torch.manual_seed(4)
        assert torch.equal(compiled(x), first)
    torch.manual_seed(4)
    torch.testing.assert_close(first, step(x), rtol=1e-6, atol=1e-6)
    assert 0 < int((first == 0).sum()) < 300


def test_the_factory_draws_positions_at_small_p_and_masks_above():
    layers = LayerFactory(None, (4, 4), (1, 1))
    assert isinstance(layers.dropout(0.001), PositionDropout)
    assert isinstance(layers.dropout(POSITIONS_UP_TO), PositionDropout)
    above = layers.dropout(0.1)
    assert isinstance(above, nn.Dropout) and above.p == 0.1
