"""WeatherMixer: an MLP-Mixer that maps the atmospheric state at t to the state at t + 6 h.

Data flow (the Jigsaw paper's model, checked against its public code):

    state ⊕ static ⊕ forcings --patchify--> tokens --embed--> x0
    x = x0; repeat: x += TokenMLP(LN(x)ᵀ)ᵀ; x += ChannelMLP(LN(x))     (MLP: Linear, GELU, Linear)
    out = recover(LN(x) ⊕ x0)  --unpatchify--> grid       (or recover(LN(x + x0)): decoder_merge="add")
    linear residual: next = Linear(LN(LN(out) ⊕ state))     (or plain: next = state + out)

The paper's patch embedding and recovery are a strided Conv1d / ConvTranspose1d over the
flattened grid; with kernel = stride = patch they are these linear maps of whole patches.
The one difference: our recovery bias is per (position in patch, channel), the paper's
per channel ((patch - 1) x out_channels more parameters: 4,071 of 1.06 B).

Every layer comes from ``parallel.LayerFactory``: on the serial mesh the model is plain
PyTorch; on a mesh, each rank holds its domain tile of the tokens and its tensor slice of
the channels, and computes exactly what the serial model computes for them. Inputs and
outputs are the rank's tile: ``(batch, tile_lat, tile_lon, channels of its slice)``; inside,
activations are ``(tokens, batch, channels)``: tokens lead, so the token mixing is one matrix
product for the whole batch (``parallel.linear.mix_tokens``).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from parallel.fp8 import FP8MatMul
from parallel.layers import LayerFactory
from parallel.mesh import ProcessMesh
from parallel.tiling import Partition
from parallel.variational import WeightNoise, draw_sample, global_kl_divergence
from weathermixer.config import ModelConfig


class MLP(nn.Module):
    def __init__(self, fc1: nn.Module, fc2: nn.Module, dropout: nn.Module):
        super().__init__()
        self.fc1, self.fc2, self.dropout = fc1, fc2, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class Linears:
    """The model's linear layers, deterministic or mean-field Gaussian by group (``model.bayesian``)."""

    def __init__(self, layers: LayerFactory, config: ModelConfig, noise: WeightNoise | None):
        self.layers, self.config, self.noise = layers, config, noise

    @staticmethod
    def _chosen(groups: tuple[str, ...], group: str, last_block: bool) -> bool:
        return "all" in groups or group in groups or (last_block and "last_block" in groups)

    def is_bayesian(self, group: str, last_block: bool = False) -> bool:
        return self._chosen(self.config.bayesian, group, last_block)

    def channel(self, group: str, inputs: Partition, outputs: Partition, last_block: bool = False) -> nn.Module:
        if self.is_bayesian(group, last_block):
            layer = self.layers.variational_channel_linear(inputs, outputs, self.noise, self.config.prior_std,
                                                           self.config.init_sigma)
        else:
            layer = self.layers.channel_linear(inputs, outputs)
        return self._product(layer, group, last_block)

    def token(self, inputs: Partition, outputs: Partition, channels: Partition, last_block: bool) -> nn.Module:
        if self.is_bayesian("token_mixing", last_block):
            layer = self.layers.variational_token_linear(inputs, outputs, channels, self.noise,
                                                         self.config.prior_std, self.config.init_sigma)
        else:
            layer = self.layers.token_linear(inputs, outputs, channels)
        return self._product(layer, "token_mixing", last_block)

    def _product(self, layer: nn.Module, group: str, last_block: bool) -> nn.Module:
        """FP8 matrix products (``model.fp8``) in the layers of ``model.fp8_groups``, and the
        gradient products alone in those of ``model.fp8_backward_groups``."""
        config = self.config
        if config.fp8 == "none":
            return layer
        forward_in_fp8 = self._chosen(config.fp8_groups, group, last_block)
        if forward_in_fp8 or self._chosen(config.fp8_backward_groups, group, last_block):
            layer.fp8 = FP8MatMul(self.layers.mesh.model_group, config.fp8, config.fp8_history, forward_in_fp8)
        return layer


class MixerBlock(nn.Module):
    """Pre-norm mixer block: token mixing across patches, then channel mixing across features."""

    def __init__(self, config: ModelConfig, linears: Linears, hidden: Partition, last: bool = False):
        super().__init__()
        layers = linears.layers
        token_hidden = layers.token_features(config.token_hidden)
        channel_hidden = layers.channels(config.channel_hidden)
        self.token_norm = layers.layer_norm(hidden)
        self.token_mlp = MLP(linears.token(layers.tokens, token_hidden, hidden, last),
                             linears.token(token_hidden, layers.tokens, hidden, last), layers.dropout(config.dropout))
        self.channel_norm = layers.layer_norm(hidden)
        self.channel_mlp = MLP(linears.channel("channel_mixing", hidden, channel_hidden, last),
                               linears.channel("channel_mixing", channel_hidden, hidden, last),
                               layers.dropout(config.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.token_norm(x))  # TokenLinear mixes dim 0 (tokens)
        return x + self.channel_mlp(self.channel_norm(x))


class WeatherMixer(nn.Module):
    def __init__(self, config: ModelConfig, mesh: ProcessMesh | None = None, seed: int = 0):
        super().__init__()
        self.config = config
        self.layers = layers = LayerFactory(mesh, config.token_grid, config.patch)
        self.mesh = layers.mesh
        (lat0, lat1), (lon0, lon1) = layers.tile_bounds()
        self.tile_shape = (lat1 - lat0, lon1 - lon0)

        self.state_channels = layers.channels(config.in_channels)
        self.out_channels = layers.channels(config.out_channels)
        inputs = Partition.concat(Partition.concat(self.state_channels, layers.channels(config.static_channels)),
                                  layers.channels(config.forcing_channels))
        hidden = layers.channels(config.hidden)
        self.local_input_channels = inputs.sizes[self.mesh.tensor_rank]

        # the weight noise of the Bayesian layers, shared by all of them (None: deterministic model)
        self.noise = WeightNoise(seed) if config.is_bayesian else None
        linears = Linears(layers, config, self.noise)
        self.embed = linears.channel("embedding", Partition.patch_features(inputs, config.patch_size), hidden)
        self.blocks = nn.ModuleList(MixerBlock(config, linears, hidden, last=k == config.depth - 1)
                                    for k in range(config.depth))
        self.final_norm = layers.layer_norm(hidden)
        concat = config.decoder_skip and config.decoder_merge == "concat"
        decoder_inputs = Partition.concat(hidden, hidden) if concat else hidden
        self.recover = linears.channel("decoder", decoder_inputs,
                                       Partition.patch_features(self.out_channels, config.patch_size))
        if config.residual == "linear":
            skip = Partition.concat(self.out_channels, self.state_channels)
            self.out_norm = layers.layer_norm(self.out_channels)
            self.residual_norm = layers.layer_norm(skip)
            self.residual_linear = linears.channel("decoder", skip, self.out_channels)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        for name, module in self.named_modules():
            if hasattr(module, "reset_parameters") and module is not self:
                module.reset_parameters(seed, name)

    # Bayesian weights ------------------------------------------------------------------
    def draw_weights(self, step: int, sample: int) -> None:
        """The next forwards use Monte Carlo weight sample ``sample`` of step ``step`` (Bayesian layers)."""
        if self.noise is not None:
            self.noise.draw(step, sample)

    def draw_member(self, seed: int, member: int) -> None:
        """The next forwards use ensemble member ``member``'s weight sample of forecast seed ``seed``."""
        if self.noise is not None:
            self.noise.draw_member(seed, member)

    def use_mean_weights(self) -> None:
        """The next forwards use the weights' means (a Bayesian model's deterministic forecast)."""
        if self.noise is not None:
            self.noise.use_mean_weights()

    def kl_divergence(self) -> torch.Tensor:
        """KL(q || prior) of all Bayesian layers, the same on every rank of the model group (0: none)."""
        return global_kl_divergence(self, self.mesh)

    def draw_sample(self) -> torch.Tensor:
        """Draw the chosen sample's weights once for the forwards of a rollout (instead of at each
        forward) and return :meth:`kl_divergence`, computed in the same pass over the weights."""
        return draw_sample(self, self.mesh)

    def release_sample(self) -> None:
        """Drop the weights :meth:`draw_sample` holds (their memory); forwards draw their own again."""
        if self.noise is not None:
            self.noise.release()

    # optimizer -------------------------------------------------------------------------
    def optimizer_groups(self, lr: float, embedding_lr: float, weight_decay: float) -> list[dict]:
        """Parameter groups for the optimizer: the patch embedding and recovery train at
        ``embedding_lr`` (the paper's lower rate), the rest at ``lr``; weight decay applies to
        matrices only (biases and LayerNorm affines are not decayed, nor a Bayesian layer's
        ``*_mu`` and ``*_rho``: the KL term of the loss is their prior)."""
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            edge = name.startswith(("embed.", "recover."))
            decays = param.dim() >= 2 and not name.endswith(("_mu", "_rho"))
            groups.setdefault((edge, decays), []).append(param)
        return [{"params": params, "lr": embedding_lr if edge else lr, "weight_decay": weight_decay if decays else 0.0}
                for (edge, decays), params in sorted(groups.items())]

    # patches ---------------------------------------------------------------------------
    def patchify(self, grid: torch.Tensor) -> torch.Tensor:
        """``(B, lat, lon, C)`` -> ``(tokens, B, rows * cols * C)``, tokens row-major in the tile."""
        b, lat, lon, c = grid.shape
        rows, cols = self.config.patch
        x = grid.reshape(b, lat // rows, rows, lon // cols, cols, c).permute(1, 3, 0, 2, 4, 5)
        return x.reshape((lat // rows) * (lon // cols), b, rows * cols * c)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(tokens, B, rows * cols * C)`` -> ``(B, lat, lon, C)``."""
        b = tokens.shape[1]
        rows, cols = self.config.patch
        lat, lon = self.tile_shape
        x = tokens.reshape(lat // rows, lon // cols, b, rows, cols, -1).permute(2, 0, 3, 1, 4, 5)
        return x.reshape(b, lat, lon, -1)

    # the three stages ------------------------------------------------------------------
    def encode(self, state: torch.Tensor, static: torch.Tensor, forcings: torch.Tensor) -> torch.Tensor:
        """The rank's tile of grids -> its embedded tokens ``(tokens, batch, hidden channels of its slice)``."""
        self._check_input(state, static, forcings)
        static = static.expand(state.shape[0], *static.shape[-3:]).to(state.dtype)
        grid = torch.cat([state, static, forcings.to(state.dtype)], dim=-1)
        return self.embed(self.patchify(grid))

    def process(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.config.latent_steps):
            for block in self.blocks:
                if self.config.activation_checkpointing and torch.is_grad_enabled():
                    # keep only each block's input; recompute its activations (and, from the
                    # restored default generators, its dropout masks) in backward
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return x

    def decode(self, x: torch.Tensor, embedded: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if not self.config.decoder_skip:
            x = self.final_norm(x)
        elif self.config.decoder_merge == "add":
            x = self.final_norm(x + embedded)
        else:
            x = torch.cat([self.final_norm(x), embedded], dim=-1)
        return self.recover_state(x, state)

    def recover_state(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The next state from the decoder's merged tokens ``x``: the recovery to each patch's
        points, then the residual connection to ``state``."""
        out = self.recover(x)  # (tokens, batch, patch x output channels)
        if self.config.residual == "add":
            return state + self.unpatchify(out)
        # the per-grid-point layers run where the recovery leaves the points, (tokens, batch, patch,
        # channels): no layout change inside their reductions; one copy to the grid at the end
        tokens, batch = out.shape[:2]
        out = out.reshape(tokens, batch, self.config.patch_size, -1)
        state = self.patchify(state).reshape(tokens, batch, self.config.patch_size, -1)
        y = self.residual_linear(self.residual_norm(torch.cat([self.out_norm(out), state], dim=-1)))
        return self.unpatchify(y.flatten(2))

    # forecasting -----------------------------------------------------------------------
    def forward(self, state: torch.Tensor, static: torch.Tensor, forcings: torch.Tensor) -> torch.Tensor:
        """One forecast step: the state at t + 6 h from the state at t."""
        embedded = self.encode(state, static, forcings)
        return self.decode(self.process(embedded), embedded, state)

    def rollout(self, state: torch.Tensor, static: torch.Tensor, forcings: torch.Tensor, steps: int,
                mode: str = "autoregressive", out: torch.Tensor | None = None) -> torch.Tensor:
        """States at t + 1..steps steps, ``(B, steps, lat, lon, C)``.

        ``out`` (inference): a tensor of that shape each step's state is written into as it
        comes, and which is returned; a forecast then holds its states once, not also stacked.

        ``forcings``: ``(B, steps, lat, lon, F)``, the forcings at each step's input time.
        ``autoregressive``: decode every step and feed the prediction back in.
        ``latent``: encode once, repeat the block stack in latent space and decode each
        step's latent (the paper's multi-step training); only the first forcings are used.
        """
        if mode not in ("autoregressive", "latent"):
            raise ValueError(f"rollout mode {mode!r}: expected 'autoregressive' or 'latent'")
        if forcings.dim() != 5 or forcings.shape[1] < steps:
            raise ValueError(f"forcings shape {tuple(forcings.shape)}: expected (batch, >= {steps} steps, lat, lon, "
                             f"forcing channels)")
        if out is not None and tuple(out.shape) != (state.shape[0], steps, *state.shape[1:]):
            raise ValueError(f"rollout out of shape {tuple(out.shape)}: expected {(state.shape[0], steps, *state.shape[1:])}")
        outputs = []

        def keep(step: int, y: torch.Tensor) -> None:
            if out is None:
                outputs.append(y)
            else:
                out[:, step] = y

        if mode == "autoregressive":
            for k in range(steps):
                # the step itself, not through module hooks: an engine's hooks (DeepSpeed times every
                # call) would break a compiled rollout's graph at each step
                state = self.forward(state, static, forcings[:, k])
                keep(k, state)
        else:
            embedded = x = self.encode(state, static, forcings[:, 0])
            for k in range(steps):
                x = self.process(x)
                keep(k, self.decode(x, embedded, state))
        return torch.stack(outputs, dim=1) if out is None else out

    def _check_input(self, state: torch.Tensor, static: torch.Tensor, forcings: torch.Tensor) -> None:
        rank = self.mesh.tensor_rank
        expected = {
            "state": (state, self.state_channels.sizes[rank]),
            "static": (static, Partition.contiguous(self.config.static_channels, self.mesh.config.tensor).sizes[rank]),
            "forcings": (forcings, Partition.contiguous(self.config.forcing_channels,
                                                        self.mesh.config.tensor).sizes[rank]),
        }
        for name, (tensor, channels) in expected.items():
            if tuple(tensor.shape[-3:]) != (*self.tile_shape, channels):
                raise ValueError(f"WeatherMixer input {name} has shape {tuple(tensor.shape)}; expected (..., "
                                 f"{self.tile_shape[0]}, {self.tile_shape[1]}, {channels}) = this rank's tile "
                                 f"(lat, lon) and its slice of the {name} channels")
