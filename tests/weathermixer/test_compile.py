"""The inductor settings are applied once per process; later changes (experiments) stay."""

from __future__ import annotations

import torch
import torch._inductor.config as inductor

from weathermixer.compile import compiled, configure_inductor


def test_a_setting_changed_after_configure_inductor_stays_through_later_compiles():
    configure_inductor()
    assert inductor.fallback_random and not inductor.comprehensive_padding
    inductor.fallback_random = False  # e.g. benchmarks/train_step.py --rng inductor
    try:
        step = compiled(lambda x: x * 2)
        assert torch.equal(step(torch.ones(3)), torch.full((3,), 2.0))
        assert inductor.fallback_random is False
    finally:
        inductor.fallback_random = True
