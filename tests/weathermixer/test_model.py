"""The serial WeatherMixer: shapes, gradients, learning, rollout modes, checkpointing, bf16."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from tests.weathermixer.test_counts import inputs
from weathermixer.config import PRESETS, preset
from weathermixer.model import WeatherMixer


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_the_right_shapes_on_meta(name):
    config = preset(name)
    with torch.device("meta"):
        model = WeatherMixer(config).eval()  # eval: dropout cannot draw on the meta device
        state, static, forcings = (torch.empty(shape) for shape in _meta_shapes(config))
        embedded = model.encode(state, static, forcings)
        out = model(state, static, forcings)
    assert model.tile_shape == (config.model_lat, config.model_lon)
    assert tuple(embedded.shape) == (config.n_tokens, 2, config.hidden)  # tokens lead
    assert tuple(out.shape) == (2, config.model_lat, config.model_lon, config.out_channels)
    assert out.device.type == "meta"


def _meta_shapes(config):
    grid = (config.model_lat, config.model_lon)
    return (torch.Size((2, *grid, config.in_channels)), torch.Size((*grid, config.static_channels)),
            torch.Size((2, *grid, config.forcing_channels)))


def test_gradcheck_float64_on_tiny():
    config = preset("tiny", lon=8, lat=3)  # 6 tokens: a few hundred finite differences
    model = WeatherMixer(config, seed=1).double()
    state, static, forcings = inputs(config, batch=1, dtype=torch.float64)
    names = ["embed.weight", "blocks.0.token_mlp.fc1.weight", "blocks.1.channel_norm.weight",
             "residual_linear.bias"]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def run(state, *chosen):
        return functional_call(model, {**params, **dict(zip(names, chosen))}, (state, static, forcings))

    chosen = [params[n].clone().requires_grad_() for n in names]
    chosen[0] = chosen[0][:, :6].detach().clone().requires_grad_()  # only a few embedding columns

    def run_few(state, embed_columns, *rest):
        weight = torch.cat([embed_columns, params["embed.weight"][:, 6:]], dim=1)
        return run(state, weight, *rest)

    assert torch.autograd.gradcheck(run_few, (state.requires_grad_(), *chosen), eps=1e-6, atol=1e-6)


def fit(model, state, static, forcings, target, steps=300):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (model(state, static, forcings) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_overfits_one_random_sample():
    config = preset("tiny", residual="add", hidden=16)  # 16 latent features per token >= 4 x 3 outputs
    state, static, forcings = inputs(config)
    target = torch.randn(state.shape, generator=torch.Generator().manual_seed(5))
    first, last = fit(WeatherMixer(config, seed=2), state, static, forcings, target)
    assert last < 1e-6 * first, f"loss went from {first:.3f} to {last:.3g}"


def test_linear_residual_overfits_a_reachable_sample():
    # LN over tiny's 3 output channels leaves one degree of freedom per point, so the
    # linear residual cannot reach an arbitrary random field; another WeatherMixer's output it can
    config = preset("tiny")
    state, static, forcings = inputs(config)
    with torch.no_grad():
        target = WeatherMixer(config, seed=9)(state, static, forcings)
    first, last = fit(WeatherMixer(config, seed=2), state, static, forcings, target)
    assert last < 1e-3 * first, f"loss went from {first:.3f} to {last:.3g}"


def test_rollout_modes():
    config = preset("tiny", latent_steps=2)
    model = WeatherMixer(config, seed=3)
    state, static, forcings = inputs(config, batch=2, steps=3)
    with torch.no_grad():
        one = model(state, static, forcings[:, 0])
        latent = model.rollout(state, static, forcings, 1, "latent")
        assert latent.shape == (2, 1, config.model_lat, config.model_lon, config.out_channels)
        torch.testing.assert_close(latent[:, 0], one, rtol=0, atol=0)

        autoregressive = model.rollout(state, static, forcings, 3, "autoregressive")
        latent = model.rollout(state, static, forcings, 3, "latent")
        assert autoregressive.shape == latent.shape == (2, 3, config.model_lat, config.model_lon,
                                                        config.out_channels)
        torch.testing.assert_close(autoregressive[:, 0], one)
        torch.testing.assert_close(autoregressive[:, 1], model(one, static, forcings[:, 1]))
        torch.testing.assert_close(latent[:, 0], one)
        # the latent rollout decodes latents after 2 and 3 passes of the stack, never re-encodes
        embedded = model.encode(state, static, forcings[:, 0])
        twice = model.process(model.process(embedded))
        torch.testing.assert_close(latent[:, 1], model.decode(twice, embedded, state))
        assert not torch.allclose(latent[:, 1], autoregressive[:, 1])

    with pytest.raises(ValueError, match="rollout mode 'beam'"):
        model.rollout(state, static, forcings, 1, "beam")
    with pytest.raises(ValueError, match="forcings shape"):
        model.rollout(state, static, forcings, 4, "autoregressive")


def test_a_rollout_into_a_given_tensor_writes_the_stacked_states():
    """``out`` (inference): each step's state written into it, bitwise the stacked rollout, and
    ``out`` itself returned; a tensor of another shape is named."""
    config = preset("tiny", latent_steps=2)
    model = WeatherMixer(config, seed=3)
    state, static, forcings = inputs(config, batch=2, steps=3)
    with torch.no_grad():
        for mode in ("autoregressive", "latent"):
            stacked = model.rollout(state, static, forcings, 3, mode)
            out = torch.full_like(stacked, float("nan"))
            assert model.rollout(state, static, forcings, 3, mode, out=out) is out
            assert torch.equal(out, stacked), mode
        with pytest.raises(ValueError, match=r"rollout out of shape \(2, 2, "):
            model.rollout(state, static, forcings, 3, out=stacked[:, :2])


def test_wrong_input_shape_names_the_input():
    config = preset("tiny")
    model = WeatherMixer(config)
    state, static, forcings = inputs(config)
    with pytest.raises(ValueError, match="input static has shape"):
        model(state, static[..., :0], forcings)


@pytest.mark.parametrize("decoder", [dict(decoder_merge="add"), dict(decoder_skip=False)], ids=["add", "none"])
def test_decoder_variants_use_the_embedding_as_declared(decoder):
    config = preset("tiny", **decoder)
    model = WeatherMixer(config, seed=4)
    state, static, forcings = inputs(config)
    x = model.process(model.encode(state, static, forcings))
    with torch.no_grad():
        changed = model.decode(x, torch.zeros_like(x), state)
        same = model.decode(x, model.encode(state, static, forcings), state)
    assert model.recover.inputs.size == config.hidden
    torch.testing.assert_close(same, model(state, static, forcings))
    assert torch.equal(changed, same) == (not config.decoder_skip)


def test_decoder_maps_every_grid_point_of_the_recovered_grid():
    # the per-grid-point layers run on (tokens, batch, patch, channels); the reference runs them on
    # the grid, as the architecture states them (2 x 4 patches: rows and columns must not mix)
    config = preset("tiny", lat=8, patch=(2, 4), in_channels=3, out_channels=3)
    model = WeatherMixer(config, seed=6)
    state, static, forcings = inputs(config, batch=3)
    embedded = model.encode(state, static, forcings)
    x = model.process(embedded)
    with torch.no_grad():
        grid = model.unpatchify(model.recover(torch.cat([model.final_norm(x), embedded], dim=-1)))
        expected = model.residual_linear(model.residual_norm(torch.cat([model.out_norm(grid), state], dim=-1)))
        torch.testing.assert_close(model.decode(x, embedded, state), expected, rtol=1e-6, atol=1e-6)
        # and the points are really moved: a wrong order of the patch's points would differ
        assert not torch.allclose(model.residual_linear(model.residual_norm(torch.cat(
            [model.out_norm(grid.flip(2)), state], dim=-1))), expected)


@pytest.mark.parametrize("dropout", [0.3, 0.02], ids=["masks", "positions"])
def test_checkpointing_keeps_outputs_and_gradients_with_dropout(dropout):
    results = []
    for checkpointing in (False, True):
        config = preset("tiny", dropout=dropout, activation_checkpointing=checkpointing, latent_steps=2)
        model = WeatherMixer(config, seed=5).train()
        state, static, forcings = inputs(config, batch=2, steps=2)
        torch.manual_seed(11)  # the same masks in both runs; the recomputation must replay them
        outputs = [model.rollout(state, static, forcings, 2, "latent") for _ in range(2)]  # the stream goes on
        sum(o.square().sum() for o in outputs).backward()
        results.append((outputs, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    assert not torch.equal(plain[0], plain[1])  # dropout is on and draws fresh masks each call
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, msg=f"gradient of {name}")


@pytest.mark.parametrize("dropout", [0.2, 0.02], ids=["masks", "positions"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_whole_model_compiles_into_one_graph(checkpointing, dropout):
    """``fullgraph=True`` fails on any graph break (dropout, collectives' metadata, checks):
    the GPU step relies on one fused graph. Without dropout the compiled step equals eager."""
    config = preset("tiny", dropout=dropout, activation_checkpointing=checkpointing)
    model = WeatherMixer(config, seed=3).train()
    state, static, forcings = inputs(config, batch=2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    compiled(state, static, forcings).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    eager_out = model(state, static, forcings)
    torch.testing.assert_close(compiled(state, static, forcings), eager_out, rtol=1e-6, atol=1e-6)


def test_rollout_compiles_into_one_graph_under_an_engines_hooks():
    """The trainer compiles ``rollout`` of a model that DeepSpeed's engine has hooked (its
    forward hooks call ``time.time``, which dynamo cannot trace): the steps must not go through
    the hooks, or every step breaks the graph (and a break in the loop makes the whole rollout
    eager)."""
    import time

    config = preset("tiny", dropout=0.0)
    model = WeatherMixer(config, seed=3)
    model.register_forward_pre_hook(lambda module, args: time.time())
    state, static, forcings = inputs(config, batch=2)
    forcings = torch.stack([forcings, forcings], dim=1)
    rollout = torch.compile(model.rollout, fullgraph=True, backend="aot_eager", dynamic=False)
    torch.testing.assert_close(rollout(state, static, forcings, 2), model.rollout(state, static, forcings, 2))


def test_bfloat16_autocast_forward_and_backward_are_finite():
    config = preset("demo", activation_checkpointing=True)
    model = WeatherMixer(config, seed=6)
    state, static, forcings = inputs(config, batch=1)
    reference = model(state, static, forcings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(state, static, forcings)
    assert torch.isfinite(out).all()
    error = ((out.float() - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.05, f"relative difference to float32 {error:.2e}: expected bf16 rounding only"
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    model = WeatherMixer(config, seed=6).to(torch.bfloat16)  # bf16 weights and inputs (DeepSpeed bf16)
    out = model(*(t.to(torch.bfloat16) for t in (state, static, forcings)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    error = ((out.float() - reference).norm() / reference.norm()).item()
    assert error < 0.05, f"relative difference to float32 {error:.2e}"


def test_autocast_keeps_activations_in_bfloat16_like_nn_linear():
    """Under autocast the layers' float32 biases must not promote their bf16 products back to
    float32 (``nn.Linear`` casts its bias too): float32 activations double every element-wise
    pass of the step (``benchmarks/GPU.md``, fifth round)."""
    config = preset("demo")
    model = WeatherMixer(config, seed=6)
    dtypes = {}
    for name, module in model.named_modules():
        if name.startswith("blocks.") or name in ("embed", "recover", "final_norm", "residual_linear"):
            module.register_forward_hook(lambda m, args, out, name=name: dtypes.__setitem__(name, out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(*inputs(config, batch=1))
    assert "blocks.0.token_mlp.fc1" in dtypes and "blocks.0.channel_mlp.fc2" in dtypes
    promoted = {name: dtype for name, dtype in dtypes.items() if dtype != torch.bfloat16}
    assert not promoted, f"layers whose output left bf16 under autocast: {promoted}"
