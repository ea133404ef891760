"""Mean-field Gaussian (Bayes by backprop) versions of the Jigsaw linear layers.

Every weight and bias element ``w`` has its own Gaussian ``q(w) = N(mu, sigma^2)``, with
``sigma = softplus(rho)``: positive without a constraint, close to ``exp(rho)`` for small scales
(steps in ``rho`` change ``sigma`` relative to its size, as a log-sigma parameter would) yet
only linear for large ``rho``, so one large step cannot blow the scale up exponentially (Blundell
et al. 2015). ``mu`` and ``rho`` are sharded exactly like the deterministic weight (the same
:class:`~parallel.sharding.ShardSpec`, one block per rank of the model group, nothing replicated).

A forward samples this rank's block ``w = mu + sigma * eps`` and runs the deterministic layer's
collectives on it (:meth:`~parallel.linear.ShardedLinear.local_weights`). The noise ``eps`` of
Monte Carlo sample ``s`` at step ``t`` is :func:`~parallel.rng.normal_from_key` keyed by ``(seed,
"weight-noise", t, s, parameter name)`` and addressed by global element: each rank draws
exactly its block of the serial model's noise, so a Bayesian model on any mesh equals the
serial one for the same draw. :class:`WeightNoise`, shared by the variational layers of one
model, says which draw (or the means: ``sigma = 0``) the next forwards use.

The KL divergence to the prior ``N(0, prior_std^2)`` is analytic. :func:`draw_sample` draws
every layer's block once for a rollout and sums the KL in the same pass over ``mu`` and ``rho``
(:func:`~parallel.weight_draw.draw_weight`), reduced once over the model group; the forwards
then use the held blocks. :func:`global_kl_divergence` is the KL alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from parallel.comm import reduce_from_group
from parallel.linear import ChannelLinear, ShardedLinear, TokenLinear, init_uniform_shard
from parallel.mesh import ProcessMesh
from parallel.rng import mix_keys, stream_seed
from parallel.sharding import ShardSpec
from parallel.tiling import Partition
from parallel.weight_draw import draw_weight, gaussian_kl_divergence


def _non_negative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class WeightNoise:
    """Which weights the variational layers of one model use: a Monte Carlo draw or the means.

    One object is shared by all variational layers of a model, so one call switches them all.
    The choice holds until the next call, rather than for a ``with`` block: activation
    checkpointing recomputes a block's forward during backward, and must draw the weights that
    its forward drew (run each backward before choosing the next draw).

    The draw is held as an int64 key tensor updated in place: a compiled forward reads it as an
    input, so a new draw neither recompiles nor waits for the host. The layers' blocks of the
    draw, once :func:`draw_sample` has drawn them, are held here until the next choice or
    :meth:`release`; a layer with no held block draws its own at each forward.
    """

    def __init__(self, seed: int, device: str | torch.device | None = None):
        self.seed = int(seed)
        self.key = torch.zeros((), dtype=torch.int64, device=device)
        self._drawn = False
        self._mean_weights = False
        self._held: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def draw(self, step: int, sample: int) -> None:
        """The next forwards sample Monte Carlo sample ``sample`` of training step ``step``."""
        if not (_non_negative_int(step) and _non_negative_int(sample)):
            raise ValueError(f"WeightNoise.draw(step={step!r}, sample={sample!r}): expected two integers >= 0")
        self._use(stream_seed(self.seed, "weight-noise", step, sample))

    def draw_member(self, seed: int, member: int) -> None:
        """The next forwards use ensemble member ``member``'s weights of forecast seed ``seed``
        (a stream apart from training's draws)."""
        if not (_non_negative_int(seed) and _non_negative_int(member)):
            raise ValueError(f"WeightNoise.draw_member(seed={seed!r}, member={member!r}): expected two integers >= 0")
        self._use(stream_seed(self.seed, "forecast-member", seed, member))

    def _use(self, key: int) -> None:
        self.key.fill_(key)
        self._drawn, self._mean_weights, self._held = True, False, {}

    def use_mean_weights(self) -> None:
        """The next forwards use the means (``sigma = 0``): the deterministic forecast."""
        self._drawn, self._mean_weights, self._held = False, True, {}

    def hold(self, name: str, weights: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """Layer ``name``'s blocks of the chosen draw, for its next forwards."""
        self._held[name] = weights

    def held(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        return self._held.get(name)

    def release(self) -> None:
        """Drop the held blocks (their memory); layers then draw their own again."""
        self._held = {}

    @property
    def mean_weights(self) -> bool:
        return self._mean_weights

    @property
    def drawn(self) -> bool:
        return self._drawn


def inverse_softplus(sigma: float) -> float:
    """``rho`` with ``softplus(rho) = sigma``: ``log(expm1(sigma))``, written not to overflow for large sigma."""
    return sigma + math.log(-math.expm1(-sigma))


class MeanFieldGaussian(ShardedLinear):
    """The variational part of a linear layer: ``weight_mu``, ``weight_rho`` (and ``bias_mu``,
    ``bias_rho``) in place of ``weight`` (and ``bias``), each pair on the deterministic block.

    Mixed in before a deterministic layer, whose forward then runs on sampled blocks.
    ``name`` keys the noise (as the parameter names key the initial values): the model's
    ``reset_parameters`` sets it to the module's path, which every mesh shares.
    """

    def _create_weights(self, weight: ShardSpec, bias: ShardSpec | None) -> None:
        self.weight_mu, self.weight_rho = self._parameter(weight), self._parameter(weight)
        has_bias = bias is not None
        self.bias_mu = self._parameter(bias) if has_bias else None
        self.bias_rho = self._parameter(bias) if has_bias else None
        # each block's global positions as a 2-D block (a bias is one row): element (i, j) of a
        # weight stands at row_offsets[i] + columns[j] (small; they follow the module to its device)
        for which, spec in (("weight", weight), ("bias", bias)):
            if spec is not None:
                rows, columns = ((spec.index[0] * spec.global_shape[1], spec.index[1]) if len(spec.index) == 2
                                 else (torch.zeros(1, dtype=torch.long), spec.index[0]))
                self.register_buffer(f"_{which}_row_offsets", rows.long().clone(), persistent=False)
                self.register_buffer(f"_{which}_columns", columns.long().clone(), persistent=False)

    def _set_variational(self, noise: WeightNoise, prior_std: float, init_sigma: float) -> None:
        for key, value in (("prior_std", prior_std), ("init_sigma", init_sigma)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{type(self).__name__}: {key} = {value!r}; expected a positive finite number "
                                 f"(a standard deviation)")
        if not isinstance(noise, WeightNoise):
            raise TypeError(f"{type(self).__name__}: noise is a {type(noise).__name__}; expected the model's "
                            f"WeightNoise")
        self.noise, self.prior_std, self.init_sigma = noise, float(prior_std), float(init_sigma)
        self.name: str | None = None

    def _pairs(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """``(which, mu, rho)`` of the weight and, if any, the bias."""
        pairs = [("weight", self.weight_mu, self.weight_rho)]
        return pairs + ([("bias", self.bias_mu, self.bias_rho)] if self.bias_mu is not None else [])

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.noise.mean_weights:
            return self.weight_mu, self.bias_mu
        held = self.noise.held(self.name)
        return self.draw()[0] if held is None else held

    def draw(self) -> tuple[tuple[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """This rank's weight and bias blocks of the chosen draw and their KL (this shard's part)."""
        if self.name is None:
            raise RuntimeError(f"{type(self).__name__} has no name to key its weight noise: call "
                               f"reset_parameters(seed, prefix) first (WeatherMixer does, with each module's path)")
        if not self.noise.drawn:
            raise RuntimeError(f"no weight draw chosen for {self.name}: call WeightNoise.draw(step, sample) "
                               f"(training, ensemble members) or WeightNoise.use_mean_weights() (deterministic "
                               f"forecast) before the forward")
        key, drawn = self.noise.key.to(self.weight_mu.device), []
        for which, mu, rho in self._pairs():
            rows, columns = getattr(self, f"_{which}_row_offsets"), getattr(self, f"_{which}_columns")
            block = (len(rows), len(columns))
            value, kl = draw_weight(mu.view(block), rho.view(block), mix_keys(key, self._noise_keys[which]), rows,
                                    columns, self.prior_std)
            drawn.append((value.view_as(mu), kl))
        (weight, weight_kl), *bias = drawn
        return (weight, bias[0][0] if bias else None), weight_kl + (bias[0][1] if bias else 0)

    def kl_divergence(self) -> torch.Tensor:
        """``KL(q || N(0, prior_std^2))`` summed over this rank's shard: its part of the layer's KL."""
        return sum(gaussian_kl_divergence(mu, rho, self.prior_std) for _, mu, rho in self._pairs())

    @torch.no_grad()
    def reset_parameters(self, seed: int, prefix: str) -> None:
        """``mu`` as the deterministic layer's weight (same keys: at initialisation the mean
        weights are the deterministic model), ``sigma = init_sigma``; ``prefix`` names the layer."""
        self.name = prefix
        # the noise stream of each parameter, keyed by its name: computed here, not in the forward
        self._noise_keys = {which: stream_seed(0, f"{prefix}.{which}") for which, _, _ in self._pairs()}
        rho = inverse_softplus(self.init_sigma)
        for which, mu, rho_param in self._pairs():
            init_uniform_shard(mu, seed, f"{prefix}.{which}", self.inputs.size)
            rho_param.fill_(rho)


class VariationalChannelLinear(MeanFieldGaussian, ChannelLinear):
    """:class:`~parallel.linear.ChannelLinear` with mean-field Gaussian weights."""

    def __init__(self, mesh: ProcessMesh, inputs: Partition, outputs: Partition, noise: WeightNoise,
                 prior_std: float = 1.0, init_sigma: float = 0.01, bias: bool = True):
        super().__init__(mesh, inputs, outputs, bias)
        self._set_variational(noise, prior_std, init_sigma)


class VariationalTokenLinear(MeanFieldGaussian, TokenLinear):
    """:class:`~parallel.linear.TokenLinear` with mean-field Gaussian weights."""

    def __init__(self, mesh: ProcessMesh, inputs: Partition, outputs: Partition, channels: Partition,
                 noise: WeightNoise, prior_std: float = 1.0, init_sigma: float = 0.01, bias: bool = True):
        super().__init__(mesh, inputs, outputs, channels, bias)
        self._set_variational(noise, prior_std, init_sigma)


def _reduced(local: list[torch.Tensor], model: nn.Module, mesh: ProcessMesh | None) -> torch.Tensor:
    """The sum of this rank's KL parts, reduced once over the model group with
    :func:`~parallel.comm.reduce_from_group`: every rank then backpropagates the same total into
    its own shards, which gets each the serial gradient (not ``model_size`` times it)."""
    if not local:  # a deterministic model, alike on every rank: nothing to reduce
        parameter = next(model.parameters(), None)
        return torch.zeros((), device=None if parameter is None else parameter.device)
    total = sum(local)
    return total if mesh is None else reduce_from_group(total, mesh.model_group)


def global_kl_divergence(model: nn.Module, mesh: ProcessMesh | None) -> torch.Tensor:
    """The KL divergence of all of ``model``'s variational layers, the same on every rank of the model group."""
    local = [layer.kl_divergence() for layer in model.modules() if isinstance(layer, MeanFieldGaussian)]
    return _reduced(local, model, mesh)


def draw_sample(model: nn.Module, mesh: ProcessMesh | None) -> torch.Tensor:
    """Draw every variational layer's blocks of the chosen draw once, for the forwards of one
    rollout (held by the model's :class:`WeightNoise` until the next choice or its ``release``),
    and return the model's KL divergence, summed in the same pass (the same on every rank of the
    model group). With the means chosen, the KL alone."""
    layers = [layer for layer in model.modules() if isinstance(layer, MeanFieldGaussian)]
    if layers and layers[0].noise.mean_weights:
        return global_kl_divergence(model, mesh)
    local = []
    for layer in layers:
        weights, kl = layer.draw()
        layer.noise.hold(layer.name, weights)
        local.append(kl)
    return _reduced(local, model, mesh)
