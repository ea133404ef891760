"""Activation memory per sample from the compiled training graph: what backward keeps.

Traces a preset's model with ``torch.compile`` on meta tensors (no memory, no device, a few
seconds) through AOTAutograd with inductor's decompositions and its min-cut partitioner,
and sums the tensors the forward graph hands to the backward graph, parameters excluded:
the activations a compiled training step holds per sample at the start of backward. The
model is traced on a grid of ``--rows`` latitude rows and scaled to the full grid (every
saved tensor is linear in the token count: token-MLP hidden sizes are fractions of it).

    python -m benchmarks.saved_activations --presets jigsaw-1b jigsaw-1.4b jigsaw-2.6b jigsaw-3.2b

Parameters in bf16 as under DeepSpeed bf16 or ``optimizer.master_weights`` (autocast keeps the same
bf16 activations since the layers cast their biases to the products' dtype).
"""

from __future__ import annotations

import argparse


import torch

from launch.runtime.compile import configure_inductor, saved_for_backward
from weathermixer.config import PRESETS
from weathermixer.model import WeatherMixer


def saved_bytes(config, rows: int) -> tuple[int, int]:
    """(bytes the forward graph saves for backward, tokens) of ``config`` traced on ``rows`` rows."""
    config = config.replace(lat=rows, lat_multiple=1)
    with torch.device("meta"):
        model = WeatherMixer(config).to(torch.bfloat16)
        state = torch.empty(1, config.model_lat, config.model_lon, config.in_channels, dtype=torch.bfloat16)
        static = torch.empty(config.model_lat, config.model_lon, config.static_channels, dtype=torch.bfloat16)
        forcings = torch.empty(1, config.model_lat, config.model_lon, config.forcing_channels, dtype=torch.bfloat16)
    prediction, *saved = saved_for_backward(model, state, static, forcings)
    return sum(t.numel() * t.element_size() for t in saved), config.n_tokens


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["jigsaw-1b", "jigsaw-1.4b", "jigsaw-2.6b", "jigsaw-3.2b"],
                        choices=sorted(PRESETS))
    parser.add_argument("--rows", type=int, default=48, help="latitude rows of the traced grid")
    args = parser.parse_args(argv)
    configure_inductor()
    print("| preset | hidden | token hidden (full grid) | bytes per token x hidden element | the same / depth "
          "| GiB per sample (full grid) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.presets:
        config = PRESETS[name]
        nbytes, tokens = saved_bytes(config, args.rows)
        per_element = nbytes / (tokens * config.hidden)
        full = per_element * config.n_tokens * config.hidden
        print(f"| {name} | {config.hidden} | {config.token_hidden} | {per_element:.1f} | "
              f"{per_element / config.depth:.1f} | {full / 2**30:.2f} |", flush=True)


if __name__ == "__main__":
    main()
