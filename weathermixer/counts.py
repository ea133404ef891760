"""Exact parameter and FLOP counts of a WeatherMixer, as functions of its configuration.

Conventions. FLOPs are 2 x the multiply-adds of the matrix products (what
``torch.utils.flop_counter`` counts); norms, GELU, dropout, biases and residual additions
are left out (well under 1 % at the paper's sizes). A training step is forward + backward
= 3 x forward (backward: one product for the input gradient, one for the weight gradient),
plus one more forward of every mixer block when activation checkpointing recomputes them
(less the block's last product when there is no dropout: see :func:`recomputed_flops`).
The 3x convention counts the input gradient of the patch embedding, which autograd never
computes for data inputs; the difference is one embedding forward (5 % of the forward of
jigsaw-1b) and the convention is kept so TFLOP/s and MFU compare with other reports.

The presets (69 prognostic channels + 3 static fields, no time features; 0.25 deg: 720 x
1440 grid, 1-D patches of 60, 17,280 tokens) against the paper and its authors' logs:

    preset              hidden token  parameters        paper          diff      forward TFLOP/sample
    jigsaw-1b            4320  0.5    1,062,384,225     1,062,380,154  +0.0004 % 13.51 (logs: 13.57)
    jigsaw-1.4b          8192  0.5    1,401,931,521     1,404.9 M      -0.21 %   32.18
    jigsaw-2.6b         10352  1.0    2,565,344,241     2,569.4 M      -0.16 %   63.84
    jigsaw-3.2b         14336  1.0    3,205,768,257     "up to 3.2B"   -         100.25
    jigsaw-1b-0.125deg   4320  0.5    1,225,692,645     -              -         19.21

* jigsaw-1b: the authors' single-GPU run logs 1,062,380,154 parameters; ours has 4,071
  more because our patch recovery has a bias per (position in patch, channel) where their
  ConvTranspose1d has one per channel. Their forward estimate, 13.566 TFLOP, also counts
  element-wise operations and sizes the recovery and output layer for 72 rather than 69
  output channels (their model-parallel code pads 69 to a multiple of 4); the matrix
  products of the model itself are 13.51 TFLOP (-0.41 %). Same for their other logs:
  hidden 4896 15.96 vs our 15.89, hidden 6064 with the full token MLP 32.09 vs 32.01.
* jigsaw-1.4b and jigsaw-2.6b: the paper's figures come from the model-parallel code,
  which logs ``per-rank parameters x ranks``. Its recovery produces 72 padded channels
  instead of 69 (3 x 60 x 2 x hidden more: +2.95 M at hidden 8192, +3.73 M at 10352) and
  its 4-way variant holds some small tensors on every rank. With that padding added our
  counts are 1,404.88 M and 2,569.07 M, i.e. within 0.02 % of the paper. The same code
  logs 2,091.06 M (2-way) and 2,091.29 M (4-way) for hidden 6064 with the full token MLP,
  where the serial model, which these functions count, has 2,088.87 M.
* jigsaw-3.2b: the paper reports training "up to 3.2B" parameters without giving the
  configuration; ours keeps 3 blocks and the full token MLP and picks hidden 14 x 1024.
* jigsaw-1b-0.125deg: our choice, the paper gives no sizes (2 x 120 patches keep the
  17,280 tokens and the mixer of jigsaw-1b).

With the trainer's store-derived configuration the embedding also sees the store's time
features as forcing channels: ``60 x forcing_channels x hidden`` more parameters.
"""

from __future__ import annotations

from weathermixer.config import ModelConfig


def _linear(inputs: int, outputs: int, bias: bool = True) -> int:
    return inputs * outputs + (outputs if bias else 0)


def _norm(channels: int) -> int:
    return 2 * channels


def _decoder_inputs(config: ModelConfig) -> int:
    return 2 * config.hidden if config.decoder_skip and config.decoder_merge == "concat" else config.hidden


def parameter_breakdown(config: ModelConfig) -> dict[str, int]:
    """Parameters per part of the model: ``embedding``, ``blocks`` (all of them), ``decoder``, ``residual``."""
    c = config
    token_mixing = _linear(c.n_tokens, c.token_hidden) + _linear(c.token_hidden, c.n_tokens)
    channel_mixing = _linear(c.hidden, c.channel_hidden) + _linear(c.channel_hidden, c.hidden)
    block = 2 * _norm(c.hidden) + token_mixing + channel_mixing
    residual = 0
    if c.residual == "linear":
        skip = c.out_channels + c.in_channels
        residual = _norm(c.out_channels) + _norm(skip) + _linear(skip, c.out_channels)
    return {
        "embedding": _linear(c.patch_size * c.input_channels, c.hidden),
        "blocks": c.depth * block,
        "decoder": _norm(c.hidden) + _linear(_decoder_inputs(c), c.patch_size * c.out_channels),
        "residual": residual,
    }


def parameter_count(config: ModelConfig) -> int:
    """Every parameter of the full (unsharded) model: ``sum(p.numel())`` of the serial model."""
    return sum(parameter_breakdown(config).values())


def flop_breakdown(config: ModelConfig) -> dict[str, int]:
    """Matrix-product FLOPs of one sample through each stage once: ``embedding``, ``block``
    (one mixer block), ``decoder`` (patch recovery), ``residual`` (per-point output layer)."""
    c = config
    tokens = c.n_tokens
    token_mixing = 2 * 2 * c.hidden * tokens * c.token_hidden  # two products over the token axis
    channel_mixing = 2 * 2 * tokens * c.hidden * c.channel_hidden  # two products over the channel axis
    points = c.model_lat * c.model_lon
    return {
        "embedding": 2 * tokens * c.patch_size * c.input_channels * c.hidden,
        "block": token_mixing + channel_mixing,
        "decoder": 2 * tokens * _decoder_inputs(c) * c.patch_size * c.out_channels,
        "residual": 2 * points * (c.out_channels + c.in_channels) * c.out_channels if c.residual == "linear" else 0,
    }


def _check_rollout(steps: int, mode: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"rollout steps = {steps!r}: expected a positive integer")
    if mode not in ("autoregressive", "latent"):
        raise ValueError(f"rollout mode {mode!r}: expected 'autoregressive' or 'latent'")


def forward_flops(config: ModelConfig, steps: int = 1, mode: str = "autoregressive") -> int:
    """FLOPs of ``model.rollout(..., steps, mode)`` for one sample (``steps=1``: ``model(...)``).

    ``autoregressive`` encodes and decodes every step; ``latent`` encodes once and decodes
    every step's latent. Each step runs the block stack ``latent_steps`` times.
    """
    _check_rollout(steps, mode)
    f = flop_breakdown(config)
    process = config.latent_steps * config.depth * f["block"]
    decode = f["decoder"] + f["residual"]
    if mode == "autoregressive":
        return steps * (f["embedding"] + process + decode)
    return f["embedding"] + steps * (process + decode)


def recomputed_flops(config: ModelConfig, steps: int = 1) -> int:
    """Extra forward FLOPs that activation checkpointing spends in backward: every block once more.

    ``torch.utils.checkpoint`` stops recomputing once backward has every tensor it saved:
    without dropout the block's last product (channel-mixing fc2) is not redone; with
    dropout it is, since the dropout mask drawn after it is needed.
    """
    _check_rollout(steps, "autoregressive")
    c = config
    block = flop_breakdown(c)["block"]
    if c.dropout == 0:
        block -= 2 * c.n_tokens * c.channel_hidden * c.hidden
    return steps * c.latent_steps * c.depth * block


def training_flops(config: ModelConfig, steps: int = 1, activation_checkpointing: bool | None = None,
                   mode: str = "autoregressive") -> int:
    """FLOPs of one training sample: forward + backward (3 x forward) of a ``steps``-step rollout,
    plus the block recomputation when checkpointing (default: ``config.activation_checkpointing``).

    Multiply by samples per second for FLOP/s; divide by the peak of the hardware for MFU.
    """
    if activation_checkpointing is None:
        activation_checkpointing = config.activation_checkpointing
    total = 3 * forward_flops(config, steps, mode)
    if activation_checkpointing:
        total += recomputed_flops(config, steps)
    return total
