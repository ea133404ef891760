"""The decoder from the recovery on (``WeatherMixer.recover_state`` with ``model.residual: linear``):
the model's formulation against candidates for a faster one, forward and backward with a weighted
MSE, compiled.

    python -m benchmarks.decoder_layers [--preset jigsaw-1b] [--repeats 30]

The per-point layers after the recovery (a LayerNorm over each grid point's output channels, the
concatenation with the input state, a LayerNorm over both, a linear back to the output
channels) work on rows of 69 or 138 values at 0.25 degrees: never 16-byte aligned. Candidates:

* ``padded``: channels padded with zeros to multiples of 8 from the recovery's output on; the
  statistics masked to the real channels, the linear's weight padded, the result cut back;
* ``channel-major``: the recovery's product written transposed, (patch, channels, points), so
  each per-point reduction runs over contiguous points;
* ``wide affine``: the LayerNorms' affine and the linear's bias broadcast over a token's patch x
  channels values, so their gradients reduce over rows that wide.

Every candidate is first checked against the model's formulation (values and gradients). The
candidates are written for the serial model: the benchmark builds one on one device.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.timing import median_ms
from weathermixer.config import preset
from weathermixer.model import WeatherMixer

EPS = 1e-5  # the model's LayerNorms'


def _normalised(h: torch.Tensor, dim: int = -1) -> torch.Tensor:
    var, mean = torch.var_mean(h, dim=dim, keepdim=True, correction=0)
    return (h - mean) * torch.rsqrt(var + EPS)


def model_layers(m: WeatherMixer, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    return m.recover_state(x, state)


def padded(m: WeatherMixer, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    out = m.recover(x)
    tokens, batch, points = out.shape[0], out.shape[1], m.config.patch_size
    c = out.shape[-1] // points
    q = -(-c // 8) * 8
    real = (torch.arange(q, device=out.device) < c).to(torch.float32)

    def pad(v: torch.Tensor) -> torch.Tensor:
        return F.pad(v, (0, q - v.shape[-1]))

    def masked_norm(z: torch.Tensor, mask: torch.Tensor, n: int, weight: torch.Tensor, bias: torch.Tensor):
        centred = (z - z.sum(-1, keepdim=True) / n) * mask
        return centred * torch.rsqrt((centred * centred).sum(-1, keepdim=True) / n + EPS) * weight + bias

    o = pad(out.reshape(tokens, batch, points, c)).float()
    a = masked_norm(o, real, c, pad(m.out_norm.weight.float()), pad(m.out_norm.bias.float()))
    s = pad(m.patchify(state).reshape(tokens, batch, points, c)).float()
    w, b = m.residual_norm.weight.float(), m.residual_norm.bias.float()
    z = masked_norm(torch.cat([a, s], -1), torch.cat([real, real]), 2 * c, torch.cat([pad(w[:c]), pad(w[c:])]),
                    torch.cat([pad(b[:c]), pad(b[c:])])).to(x.dtype)
    weight = m.residual_linear.weight.to(x.dtype)
    weight = F.pad(torch.cat([pad(weight[:, :c]), pad(weight[:, c:])], dim=1), (0, 0, 0, q - c))
    y = F.linear(z, weight) + pad(m.residual_linear.bias.to(x.dtype))
    return m.unpatchify(y[..., :c].reshape(tokens, batch, -1))


def channel_major(m: WeatherMixer, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    tokens, batch, points = x.shape[0], x.shape[1], m.config.patch_size
    rows = x.reshape(tokens * batch, -1)
    out = torch.mm(m.recover.weight.to(x.dtype), rows.t()) + m.recover.bias.to(x.dtype)[:, None]
    out = out.reshape(points, -1, tokens * batch).float()
    a = _normalised(out, 1) * m.out_norm.weight.float()[:, None] + m.out_norm.bias.float()[:, None]
    s = m.patchify(state).reshape(tokens * batch, points, -1).permute(1, 2, 0).float()
    z = (_normalised(torch.cat([a, s], dim=1), 1) * m.residual_norm.weight.float()[:, None]
         + m.residual_norm.bias.float()[:, None]).to(x.dtype)
    y = torch.matmul(m.residual_linear.weight.to(x.dtype), z) + m.residual_linear.bias.to(x.dtype)[:, None]
    return m.unpatchify(y.permute(2, 0, 1).reshape(tokens, batch, -1))


def wide_affine(m: WeatherMixer, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    out = m.recover(x)
    tokens, batch, points = out.shape[0], out.shape[1], m.config.patch_size
    o = out.reshape(tokens, batch, points, -1).float()
    a = (_normalised(o).reshape(tokens, batch, -1) * m.out_norm.weight.float().repeat(points)
         + m.out_norm.bias.float().repeat(points))
    s = m.patchify(state).float()
    z = torch.cat([a.reshape(tokens, batch, points, -1), s.reshape(tokens, batch, points, -1)], dim=-1)
    z = (_normalised(z).reshape(tokens, batch, -1) * m.residual_norm.weight.float().repeat(points)
         + m.residual_norm.bias.float().repeat(points)).to(x.dtype)
    y = F.linear(z.reshape(tokens, batch, points, -1), m.residual_linear.weight.to(x.dtype))
    return m.unpatchify(y.reshape(tokens, batch, -1) + m.residual_linear.bias.to(x.dtype).repeat(points))


FORMULATIONS = {"model": model_layers, "padded": padded, "channel-major": channel_major,
                "wide affine": wide_affine}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="jigsaw-1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = preset(args.preset, depth=1)  # the blocks are not run
    if config.residual != "linear" or not config.decoder_skip or config.decoder_merge != "concat":
        raise SystemExit(f"decoder_layers: preset {args.preset!r} has no per-point layers after a concatenating "
                         f"decoder (model.residual = {config.residual!r}, decoder_merge = {config.decoder_merge!r})")
    torch.manual_seed(0)
    with torch.device(device):
        model = WeatherMixer(config).to(dtype)
        lat, lon = model.tile_shape
        x = torch.randn(lat * lon // config.patch_size, args.batch, model.recover.inputs.size, dtype=dtype,
                        requires_grad=True)
        state = torch.randn(args.batch, lat, lon, config.in_channels, dtype=dtype)
        target = torch.randn_like(state)
        area = torch.rand(lat, 1, 1) + 0.5
    params = [p for name, p in model.named_parameters() if name.split(".")[0] in
              ("recover", "out_norm", "residual_norm", "residual_linear")]
    print(f"the decoder from the recovery on, {args.preset} (batch {args.batch}), "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; forward + backward, median of "
          f"{args.repeats}; error: largest relative difference of the values and gradients from the model's")
    print(f"{'formulation':<16} {'ms':>8} {'vs model':>9} {'error':>9}")
    expected, baseline = None, None
    for name, layers in FORMULATIONS.items():
        loss = torch.compile(lambda x, s, t, f=layers: ((f(model, x, s).float() - t.float()).square() * area).mean(),
                             fullgraph=True)

        def step():
            value = loss(x, state, target)
            return (value, *torch.autograd.grad(value, [x, *params]))
        got = step()
        expected = got if expected is None else expected
        error = max(((g.float() - e.float()).norm() / e.float().norm()).item() for g, e in zip(got, expected))
        ms = median_ms(device, step, args.repeats)
        baseline = ms if baseline is None else baseline
        print(f"{name:<16} {ms:>8.3f} {ms - baseline:>+9.3f} {error:>9.1e}", flush=True)


if __name__ == "__main__":
    main()
