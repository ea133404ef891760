"""Each Jigsaw layer on its own equals its serial counterpart: outputs, input gradients and
every parameter gradient, on many mesh shapes, with uneven splits (channels 5 over tensor 2
and 4, 9 token rows over 2 and 4 latitude tiles, 5 token columns over 2 longitude tiles).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from parallel.layers import LayerFactory
from parallel.mesh import MeshConfig, ProcessMesh
from parallel.rng import seed_dropout
from parallel.tiling import Partition
from tests.distributed import spawn
from tests.parallel.equivalence import build_mesh, compare_gradients, copy_into, relative_error
from weathermixer.model import WeatherMixer

PATCH = (1, 4)
TOKEN_GRID = (9, 5)  # grid of 9 x 20 points
DROPOUT_PROBABILITIES = (0.25, 0.02)  # a mask, drawn positions (parallel.layers.POSITIONS_UP_TO)
HIDDEN, WIDER, STATE, STATIC, OUT = 5, 7, 3, 2, 3
TOKEN_HIDDEN = 23
BATCH = 2


class PatchEmbedding(nn.Module):
    """The model's encoder front: its patchify, then the embedding over concatenated channels."""

    def __init__(self, layers: LayerFactory):
        super().__init__()
        self.inputs = Partition.concat(layers.channels(STATE), layers.channels(STATIC))
        self.linear = layers.channel_linear(Partition.patch_features(self.inputs, PATCH[0] * PATCH[1]),
                                            layers.channels(HIDDEN))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.linear(WeatherMixer.patchify(SimpleNamespace(config=SimpleNamespace(patch=PATCH)), grid))


class PatchRecovery(nn.Module):
    """The model's decoder back: recovery from the latent concatenated with the embedding, unpatchify."""

    def __init__(self, layers: LayerFactory):
        super().__init__()
        hidden = layers.channels(HIDDEN)
        self.inputs = Partition.concat(hidden, hidden)
        self.outputs = layers.channels(OUT)
        self.linear = layers.channel_linear(self.inputs, Partition.patch_features(self.outputs, PATCH[0] * PATCH[1]))
        (lat0, lat1), (lon0, lon1) = layers.tile_bounds()
        self.tile = SimpleNamespace(config=SimpleNamespace(patch=PATCH), tile_shape=(lat1 - lat0, lon1 - lon0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return WeatherMixer.unpatchify(self.tile, self.linear(x))


def token_block(layers, tokens, channels):
    """How a rank takes its block of a global ``(tokens, batch, channels)`` tensor."""
    d, t = layers.mesh.domain_rank, layers.mesh.tensor_rank
    return lambda x: x[tokens.indices[d]][..., channels.indices[t]]


def grid_block(layers, channels):
    """How a rank takes its tile of a global ``(batch, lat, lon, channels)`` grid."""
    (lat0, lat1), (lon0, lon1) = layers.tile_bounds()
    return lambda x: x[:, lat0:lat1, lon0:lon1][..., channels.indices[layers.mesh.tensor_rank]]


def build_case(name: str, layers: LayerFactory):
    """``(module, take input block, take output block, global input shape, global output shape)``;
    token activations are ``(tokens, batch, channels)``, grids ``(batch, lat, lon, channels)``.

    ``name/schedule`` forces a token linear's schedule ("weight" or "activations" move).
    """
    name, _, schedule = name.partition("/")
    case = _build_case(name, layers)
    if schedule:
        case[0].schedule = schedule
    return case


def _build_case(name: str, layers: LayerFactory):
    tokens, n = layers.tokens, TOKEN_GRID[0] * TOKEN_GRID[1]
    hidden, wider = layers.channels(HIDDEN), layers.channels(WIDER)
    features = layers.token_features(TOKEN_HIDDEN)
    if name == "channel-widen":  # gathers the input over tensor
        module = layers.channel_linear(hidden, wider)
        return module, token_block(layers, tokens, hidden), token_block(layers, tokens, wider), \
            (n, BATCH, HIDDEN), (n, BATCH, WIDER)
    if name == "channel-narrow":  # reduce-scatters the output over tensor
        module = layers.channel_linear(wider, hidden)
        return module, token_block(layers, tokens, wider), token_block(layers, tokens, hidden), \
            (n, BATCH, WIDER), (n, BATCH, HIDDEN)
    if name == "token-to-features":
        module = layers.token_linear(tokens, features, hidden)
        return module, token_block(layers, tokens, hidden), token_block(layers, features, hidden), \
            (n, BATCH, HIDDEN), (TOKEN_HIDDEN, BATCH, HIDDEN)
    if name == "features-to-token":
        module = layers.token_linear(features, tokens, hidden)
        return module, token_block(layers, features, hidden), token_block(layers, tokens, hidden), \
            (TOKEN_HIDDEN, BATCH, HIDDEN), (n, BATCH, HIDDEN)
    if name == "layer-norm":
        module = layers.layer_norm(hidden)
        return module, token_block(layers, tokens, hidden), token_block(layers, tokens, hidden), \
            (n, BATCH, HIDDEN), (n, BATCH, HIDDEN)
    if name == "patch-embedding":
        module = PatchEmbedding(layers)
        lat, lon = TOKEN_GRID[0] * PATCH[0], TOKEN_GRID[1] * PATCH[1]
        return module, grid_block(layers, module.inputs), token_block(layers, tokens, hidden), \
            (BATCH, lat, lon, STATE + STATIC), (n, BATCH, HIDDEN)
    if name == "patch-recovery":
        module = PatchRecovery(layers)
        lat, lon = TOKEN_GRID[0] * PATCH[0], TOKEN_GRID[1] * PATCH[1]
        return module, token_block(layers, tokens, module.inputs), grid_block(layers, module.outputs), \
            (n, BATCH, 2 * HIDDEN), (BATCH, lat, lon, OUT)
    raise KeyError(name)


CASES = ["channel-widen", "channel-narrow", "token-to-features", "features-to-token", "layer-norm",
         "patch-embedding", "patch-recovery", "token-to-features/weight", "token-to-features/activations",
         "features-to-token/weight", "features-to-token/activations"]


def compare_case(name: str, layers: LayerFactory, dtype: torch.dtype, seed: int, prepare=None) -> tuple:
    """One case on ``layers``' mesh against the serial layer: (output error, input-gradient error,
    worst parameter, its gradient error). ``prepare(module, layers)`` adjusts both layers
    after they are built (e.g. FP8 products)."""
    generator = torch.Generator().manual_seed(seed)  # the same on every rank
    serial_layers = LayerFactory(None, TOKEN_GRID, PATCH)
    serial, _, _, in_shape, out_shape = build_case(name, serial_layers)
    serial = serial.to(dtype)
    if prepare is not None:
        prepare(serial, serial_layers)
    with torch.no_grad():  # random values everywhere, LayerNorm affine included
        for param in serial.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=dtype))
    x = torch.randn(in_shape, generator=generator, dtype=dtype, requires_grad=True)
    weights = torch.randn(out_shape, generator=generator, dtype=dtype)
    expected = serial(x)
    (expected * weights).sum().backward()

    module, take_input, take_output, _, _ = build_case(name, layers)
    module = module.to(dtype)
    if prepare is not None:
        prepare(module, layers)
    copy_into(module, serial)
    local_x = take_input(x.detach()).clone().requires_grad_()
    out = module(local_x)
    (out * take_output(weights)).sum().backward()
    gradients = compare_gradients(module, serial)
    worst = max(gradients, key=gradients.get)
    return (relative_error(out, take_output(expected)), relative_error(local_x.grad, take_input(x.grad)), worst,
            gradients[worst])


def check_layers(rank, world_size, meshes, dtypes):
    """Every case on every mesh, in every dtype: (case, mesh, dtype, output, input-grad, worst param grad)."""
    results = []
    for domain, tensor in meshes:
        layers = LayerFactory(build_mesh(domain, tensor), TOKEN_GRID, PATCH)
        for dtype in dtypes:
            for name in CASES:
                results.append((name, domain, tensor, str(dtype),
                                *compare_case(name, layers, dtype, CASES.index(name))))
    return results


def check_dropout(rank, world_size):
    """Masks differ between the shards of a replica and between sample ranks, repeat on rebuild,
    keep ``1 - p`` of the entries scaled by ``1 / (1 - p)``, and vanish in eval mode: for drawn
    masks (p = 0.25) and drawn positions (p = 0.02, ``PositionDropout``)."""
    # 2 ranks: two sample ranks; 4 ranks: two data replicas of two tensor shards
    mesh = ProcessMesh.build(MeshConfig(sample=2) if world_size == 2 else MeshConfig(data=2, tensor=2))
    layers = LayerFactory(mesh, TOKEN_GRID, PATCH)
    x = torch.ones(4, 64, 32, dtype=torch.float64)
    ranks = (mesh.data_rank, mesh.sample_rank, mesh.model_rank)
    results = {}
    for p in DROPOUT_PROBABILITIES:
        dropout = layers.dropout(p)
        seed_dropout(5, *ranks)
        first, second = dropout(x), dropout(x)  # one layer twice: the stream moves on
        seed_dropout(5, *ranks)
        rebuilt = layers.dropout(p)(x)  # reseeded with the same seed: the same stream
        seed_dropout(6, *ranks)
        other_seed = dropout(x)
        dropout.eval()
        results[p] = dict(mask=first, rebuilt=rebuilt, second=second, other_seed=other_seed,
                          eval_identity=bool(torch.equal(dropout(x), x)), key=ranks)
    return results


def check_all(rank, world_size, meshes, dtypes):
    return check_layers(rank, world_size, meshes, dtypes), check_dropout(rank, world_size)


@functools.cache
def run(world_size: int):
    """One spawn per world size serves both tests below (starting processes is the cost)."""
    return spawn(check_all, world_size, MESHES[world_size], [torch.float64, torch.float32])


MESHES = {
    2: [((1, 1), 2), ((2, 1), 1), ((1, 2), 1)],
    4: [((2, 1), 2), ((1, 2), 2), ((2, 2), 1), ((4, 1), 1), ((1, 1), 4)],
}
TOLERANCE = {str(torch.float64): 1e-10, str(torch.float32): 1e-5}


@pytest.mark.parametrize("world_size", [2, 4], ids=["2-ranks", "4-ranks"])
def test_layers_match_serial(world_size):
    results = run(world_size)
    checked = set()
    for rank, (layer_results, _) in enumerate(results):
        for name, domain, tensor, dtype, output_error, input_error, worst, gradient_error in layer_results:
            where = f"{name}, domain {domain[0]}x{domain[1]}, tensor {tensor}, {dtype}, rank {rank}"
            tolerance = TOLERANCE[dtype]
            assert output_error <= tolerance, f"{where}: output relative error {output_error:.2e}"
            assert input_error <= tolerance, f"{where}: input gradient relative error {input_error:.2e}"
            assert gradient_error <= tolerance, f"{where}: gradient of {worst} relative error {gradient_error:.2e}"
            checked.add((name, domain, tensor, dtype))
    assert len(checked) == len(CASES) * len(MESHES[world_size]) * 2


@pytest.mark.parametrize("world_size", [2, 4], ids=["2-ranks", "4-ranks"])
@pytest.mark.parametrize("p", DROPOUT_PROBABILITIES)
def test_dropout_streams(world_size, p):
    results = [dropouts[p] for _, dropouts in run(world_size)]
    for result in results:
        mask = result["mask"]
        assert torch.equal(mask, result["rebuilt"]), "a rebuilt layer with the same seed drew another mask"
        assert not torch.equal(mask, result["second"]), "a layer's second call repeated the first mask"
        assert not torch.equal(mask, result["other_seed"]), "the seed does not change the mask"
        assert set(mask.unique().tolist()) <= {0.0, 1 / (1 - p)}
        kept, n = float((mask > 0).double().mean()), mask.numel()
        assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
        assert result["eval_identity"]
    keys = [r["key"] for r in results]
    assert len(set(keys)) == len(results)
    for a in range(len(results)):
        for b in range(a):
            assert not torch.equal(results[a]["mask"], results[b]["mask"]), \
                f"ranks {keys[a]} and {keys[b]} (data, sample, model rank) drew the same dropout mask"


def test_serial_layers_are_plain_pytorch():
    """On the serial mesh the layers are torch's: nn.Linear on channels and tokens, nn.LayerNorm."""
    layers = LayerFactory(None, TOKEN_GRID, PATCH)
    n = TOKEN_GRID[0] * TOKEN_GRID[1]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, BATCH, HIDDEN, generator=generator, dtype=torch.float64)
    for module, reference, apply in [
        (layers.channel_linear(layers.channels(HIDDEN), layers.channels(WIDER)), nn.Linear(HIDDEN, WIDER),
         lambda f: f(x)),
        (layers.token_linear(layers.tokens, layers.token_features(TOKEN_HIDDEN), layers.channels(HIDDEN)),
         nn.Linear(n, TOKEN_HIDDEN),
         lambda f: f(x.movedim(0, -1)).movedim(-1, 0) if isinstance(f, nn.Linear) else f(x)),
        (layers.layer_norm(layers.channels(HIDDEN)), nn.LayerNorm(HIDDEN), lambda f: f(x)),
    ]:
        reference = reference.double()
        with torch.no_grad():
            for param in reference.parameters():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
        module = module.double()
        module.load_state_dict(reference.state_dict())
        assert relative_error(apply(module), apply(reference)) <= 1e-14


def token_schedule_batches(rank, world_size, batch):
    """The batch size a token linear's schedule choice is given for an input of ``batch`` samples."""
    import parallel.linear as linear

    seen, choose = [], linear.token_mixing_moves_weight
    linear.token_mixing_moves_weight = lambda size, *rest: seen.append(size) or choose(size, *rest)
    try:
        layers = LayerFactory(build_mesh((1, world_size), 1), TOKEN_GRID, PATCH)
        module = layers.token_linear(layers.tokens, layers.token_features(TOKEN_HIDDEN), layers.channels(HIDDEN))
        tokens = len(layers.tokens.indices[layers.mesh.domain_rank])
        with torch.no_grad():
            module(torch.zeros(tokens, batch, HIDDEN))
    finally:
        linear.token_mixing_moves_weight = choose
    return seen


def test_token_schedule_follows_the_batch():
    """The cheaper token-mixing schedule is chosen for the input's batch (dim 1 of (tokens, batch,
    channels)), not for its token count."""
    assert spawn(token_schedule_batches, 2, 3) == [[3], [3]]
