"""The inductor settings are applied once per process; later changes (experiments) stay."""

from __future__ import annotations

import torch
import torch._inductor.config as inductor

from launch.runtime.compile import compiled, configure_inductor


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


def test_the_persistent_reduction_rule_reaches_every_thread_and_keys_the_compile_cache():
    # the backward graph is compiled on autograd's device thread, not the caller's: inductor's
    # heuristics object is per thread, so a rule set for the calling thread alone missed it
    # (autograd runs its device threads in a copy of the caller's context variables, as here)
    import contextvars
    import threading

    from torch._inductor.virtualized import V

    from launch.runtime.compile import PERSISTENT_INNER, PERSISTENT_OTHER
    from launch.runtime.inductor_choices import PersistentReductions

    configure_inductor()
    seen = []
    thread = threading.Thread(target=contextvars.copy_context().run, args=(lambda: seen.append(V.choices),))
    thread.start()
    thread.join()
    for choices in (V.choices, seen[0]):
        assert isinstance(choices, PersistentReductions)
        assert (choices.inner, choices.other) == (PERSISTENT_INNER, PERSISTENT_OTHER)
    assert choices.uuid() in str(inductor.save_config_portable())
