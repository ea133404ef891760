"""Per-rank cost of the Jigsaw layout: parameters, saved activations, communication.

For every layer the model builds, analytic formulas give (per rank, from the same
partitions the layers use) the parameters it holds, the activations autograd saves in the
forward pass, and the bytes each collective sends (ring accounting, as
``parallel.comm.traffic`` counts them). Then, for meshes of 1, 2, 4 and 8 gloo ranks on the
CPU, one training step of a small model is run and the formulas are checked against what
the ranks hold and what the collectives moved. Finally the formulas are evaluated (no run)
for the paper-sized presets.

    python -m benchmarks.parallel_layout                       # measure `demo`, evaluate jigsaw-1b / 2.6b
    python -m benchmarks.parallel_layout --preset tiny --batch 1 --large jigsaw-1b
"""

from __future__ import annotations

import argparse
import platform
from collections import Counter
from dataclasses import dataclass, field


import torch

from parallel.linear import token_mixing_moves_weight
from parallel.tiling import DomainTiling, Partition, balanced_sizes
from weathermixer.config import PRESETS, ModelConfig, preset

MEASURED_MESHES = {1: [((1, 1), 1)],
                   2: [((1, 1), 2), ((2, 1), 1), ((1, 2), 1)],
                   4: [((2, 1), 2), ((2, 2), 1), ((1, 1), 4)],
                   8: [((2, 2), 2), ((2, 1), 4), ((4, 2), 1)]}
LARGE_MESHES = [((1, 1), 1), ((1, 1), 2), ((2, 1), 1), ((2, 1), 2), ((2, 2), 1), ((1, 1), 4), ((2, 2), 2)]


# --- formulas -------------------------------------------------------------------------------
@dataclass
class Cost:
    """One layer on one rank: parameters held, elements saved for backward, bytes sent."""
    name: str
    moves: str
    params: int = 0
    saved: int = 0  # elements (activation dtype)
    saved_weights: int = 0  # of which: gathered weight blocks that autograd keeps for backward
    forward: Counter = field(default_factory=Counter)  # collective -> bytes sent
    backward: Counter = field(default_factory=Counter)
    weight_bytes: int = 0  # of the forward bytes: weights (the rest are activations)
    no_backward: Counter = field(default_factory=Counter)  # forward bytes whose gradient nobody needs
    alternative: int = 0  # forward bytes of the other choice of moving operand (0: none considered)


def gather(bytes_per_part: int, parts: int) -> int:
    return bytes_per_part * (parts - 1)


def all_reduce(nbytes: int, parts: int) -> int:
    return 2 * nbytes * (parts - 1) // parts


class Plan:
    """The model's layers on rank (domain_rank, tensor_rank) of a (tiles, tensor) mesh, as formulas."""

    def __init__(self, config: ModelConfig, domain: tuple[int, int], tensor: int, domain_rank: int,
                 tensor_rank: int, batch: int, element_size: int):
        self.c, self.pd, self.pt, self.d, self.j = config, domain[0] * domain[1], tensor, domain_rank, tensor_rank
        self.b, self.e = batch, element_size
        self.tiling = DomainTiling(*config.token_grid, *domain, patch=config.patch)
        self.tokens = self.tiling.tokens
        self.costs: list[Cost] = []
        self._build()

    def channels(self, n: int) -> Partition:
        return Partition.contiguous(n, self.pt)

    # layers ---------------------------------------------------------------------------------
    def channel_linear(self, name: str, inputs: Partition, outputs: Partition, rows: int,
                       input_gradient: bool = True) -> Cost:
        """``rows`` = local activation rows (batch x tokens or grid points)."""
        pd, pt, d, j, e = self.pd, self.pt, self.d, self.j, self.e
        reduce_outputs = outputs.size < inputs.size
        weight_rows = balanced_sizes(outputs.size if reduce_outputs else outputs.sizes[j], pd)
        columns = inputs.sizes[j] if reduce_outputs else inputs.size
        bias_rows = balanced_sizes(outputs.sizes[j], pd)
        cost = Cost(name, "weight block over domain; " + ("output (partial sums) over tensor" if reduce_outputs
                                                          else "input over tensor"),
                    params=weight_rows[d] * columns + bias_rows[d])
        if pd > 1:
            cost.weight_bytes = gather(max(weight_rows) * columns * e, pd) + gather(max(bias_rows) * e, pd)
            cost.forward["all_gather"] += cost.weight_bytes
            cost.saved_weights = sum(weight_rows) * columns  # the gathered weight is kept for backward
        if pt > 1:
            width = max(outputs.sizes) if reduce_outputs else max(inputs.sizes)
            kind = "reduce_scatter" if reduce_outputs else "all_gather"
            cost.forward[kind] += gather(rows * width * e, pt)
            if not input_gradient and not reduce_outputs:  # the model's input needs no gradient
                cost.no_backward[kind] += gather(rows * width * e, pt)
        if pd > 1:  # weight-stationary instead: this tile's activations would visit every tile
            cost.alternative = sum(cost.forward.values()) - cost.weight_bytes + gather(rows * max(inputs.sizes) * e, pd)
        cost.saved += rows * (inputs.sizes[j] if reduce_outputs else inputs.size)
        return self._add(cost)

    def token_linear(self, name: str, inputs: Partition, outputs: Partition, channels: Partition) -> Cost:
        pd, pt, d, j, e, b = self.pd, self.pt, self.d, self.j, self.e, self.b
        pieces = [balanced_sizes(size, pt)[j] for size in outputs.sizes]  # piece j of every output tile
        tile_pieces = balanced_sizes(outputs.sizes[d], pt)
        row_sizes = [sum(balanced_sizes(size, pt)[k] for size in outputs.sizes) for k in range(pt)]
        columns, width = inputs.sizes[d], max(channels.sizes)
        moving_activations, moving_weight = Counter(), Counter()
        if pt > 1:
            moving_activations["all_gather"] += gather(b * columns * width * e, pt)
            moving_activations["all_to_all"] += gather(b * max(tile_pieces) * width * e, pt)
            moving_weight["all_gather"] += gather(max(row_sizes) * columns * e, pt) + gather(max(tile_pieces) * e, pt)
        if pd > 1:
            moving_activations["reduce_scatter"] += gather(b * max(pieces) * channels.size * e, pd)
            moving_weight["reduce_scatter"] += gather(b * max(outputs.sizes) * channels.sizes[j] * e, pd)
        if token_mixing_moves_weight(b, inputs, outputs, channels.sizes, pd, pt):
            cost = Cost(name, "weight block over tensor; partial sums over domain", forward=moving_weight,
                        weight_bytes=sum(moving_weight.values()) - moving_weight["reduce_scatter"],
                        saved=b * columns * channels.sizes[j], saved_weights=outputs.size * columns,
                        alternative=sum(moving_activations.values()))
        else:
            cost = Cost(name, "input over tensor; partial sums over domain; output pieces over tensor "
                              "(all-to-all); weight stays", forward=moving_activations,
                        saved=b * columns * channels.size, alternative=sum(moving_weight.values()) if pt > 1 else 0)
        cost.params = sum(pieces) * columns + pieces[d]
        return self._add(cost)

    def layer_norm(self, name: str, channels: Partition, rows: int) -> Cost:
        pd, pt, d, j, e = self.pd, self.pt, self.d, self.j, self.e
        affine = balanced_sizes(channels.sizes[j], pd)
        cost = Cost(name, "statistics over tensor; affine over domain", params=2 * affine[d])
        if pt > 1:
            cost.forward["all_reduce"] += 2 * all_reduce(rows * max(e, 4), pt)
        if pd > 1:
            cost.forward["all_gather"] += 2 * gather(max(affine) * e, pd)
            cost.saved_weights = sum(affine)  # the gathered weight
        cost.saved += 2 * rows * channels.sizes[j] + rows  # centred, normalised, 1/std
        return self._add(cost)

    def _add(self, cost: Cost) -> Cost:
        cost.saved += cost.saved_weights
        # each collective's backward sends what its forward sent (gather <-> reduce-scatter, all-reduce)
        cost.backward = Counter({{"all_gather": "reduce_scatter", "reduce_scatter": "all_gather"}.get(k, k): v
                                 for k, v in (cost.forward - cost.no_backward).items()})
        self.costs.append(cost)
        return cost

    def _build(self) -> None:
        c, j, d, b = self.c, self.j, self.d, self.b
        t = len(self.tokens.indices[d])
        hidden = self.channels(c.hidden)
        state, out = self.channels(c.in_channels), self.channels(c.out_channels)
        inputs = Partition.concat(Partition.concat(state, self.channels(c.static_channels)),
                                  self.channels(c.forcing_channels))
        self.channel_linear("embed", Partition.patch_features(inputs, c.patch_size), hidden, b * t,
                            input_gradient=False)
        features = Partition.contiguous(c.token_hidden, self.pd)
        channel_hidden = self.channels(c.channel_hidden)
        for k in range(c.depth):
            block = []
            block.append(self.layer_norm(f"blocks.{k}.token_norm", hidden, b * t))
            block.append(self.token_linear(f"blocks.{k}.token_mlp.fc1", self.tokens, features, hidden))
            block[-1].saved += b * features.sizes[d] * hidden.sizes[j]  # GELU input
            block.append(self.token_linear(f"blocks.{k}.token_mlp.fc2", features, self.tokens, hidden))
            block.append(self.layer_norm(f"blocks.{k}.channel_norm", hidden, b * t))
            block.append(self.channel_linear(f"blocks.{k}.channel_mlp.fc1", hidden, channel_hidden, b * t))
            block[-1].saved += b * t * channel_hidden.sizes[j]  # GELU input
            block.append(self.channel_linear(f"blocks.{k}.channel_mlp.fc2", channel_hidden, hidden, b * t))
            for cost in block:  # latent steps repeat the blocks: activations and traffic, not parameters
                cost.saved *= c.latent_steps
                cost.saved_weights *= c.latent_steps
                for counter in (cost.forward, cost.backward):
                    for key in counter:
                        counter[key] *= c.latent_steps
        self.layer_norm("final_norm", hidden, b * t)
        decoder_inputs = Partition.concat(hidden, hidden) if c.decoder_skip else hidden
        self.channel_linear("recover", decoder_inputs, Partition.patch_features(out, c.patch_size), b * t)
        if c.residual == "linear":
            points, skip = b * t * c.patch_size, Partition.concat(out, state)
            self.layer_norm("out_norm", out, points)
            self.layer_norm("residual_norm", skip, points)
            self.channel_linear("residual_linear", skip, out, points)
        # the loss: a global mean (one scalar all-reduced) and its element count (float64)
        model = self.pd * self.pt
        loss = Cost("loss", "one scalar over the model group")
        if model > 1:
            loss.forward["all_reduce"] = all_reduce(max(self.e, 4), model) + all_reduce(8, model)
        self.costs.append(loss)  # its backward is the identity

    def total(self, what: str) -> int:
        if what in ("params", "saved", "saved_weights"):
            return sum(getattr(cost, what) for cost in self.costs)
        return sum(sum(getattr(cost, what).values()) for cost in self.costs)


def total_parameters(config: ModelConfig) -> int:
    return Plan(config, (1, 1), 1, 0, 0, 1, 4).total("params")


# --- measurement ------------------------------------------------------------------------------
def measure(rank, world_size, config: ModelConfig, meshes, batch: int):
    from parallel import comm
    from parallel.mesh import MeshConfig, ProcessMesh
    from parallel.reduce import global_mean
    from weathermixer.model import WeatherMixer

    results = []
    for domain, tensor in meshes:
        mesh = ProcessMesh.build(MeshConfig(domain=domain, tensor=tensor, data=1)) if world_size > 1 \
            else ProcessMesh.serial()
        model = WeatherMixer(config, mesh)
        params = {p.data_ptr() for p in model.parameters()}
        lat, lon = model.tile_shape
        r = mesh.tensor_rank
        local = lambda n: Partition.contiguous(n, tensor).sizes[r]  # noqa: E731
        generator = torch.Generator().manual_seed(rank)
        state = torch.randn(batch, lat, lon, local(config.in_channels), generator=generator)
        static = torch.randn(lat, lon, local(config.static_channels), generator=generator)
        forcings = torch.randn(batch, lat, lon, local(config.forcing_channels), generator=generator)
        saved: dict[tuple, int] = {}

        def keep(x):  # count each activation storage once; parameters are not activations
            if isinstance(x, torch.Tensor) and x.data_ptr() not in params:
                saved[(x.data_ptr(), x.untyped_storage().nbytes())] = x.untyped_storage().nbytes()
            return x

        comm.traffic.clear()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
            prediction = model(state, static, forcings)
            loss = global_mean((prediction - state[..., :prediction.shape[-1]]).square(), mesh)
        forward = sum(comm.traffic.values())
        loss.backward()
        results.append(dict(domain=domain, tensor=tensor, domain_rank=mesh.domain_rank, tensor_rank=r,
                            params=sum(p.numel() for p in model.parameters()), saved_bytes=sum(saved.values()),
                            forward=forward, step=sum(comm.traffic.values())))
    return results


def run_measurements(config: ModelConfig, batch: int):
    from tests.distributed import spawn

    rows = []
    for world_size, meshes in MEASURED_MESHES.items():
        per_rank = [measure(0, 1, config, meshes, batch)] if world_size == 1 else \
            spawn(measure, world_size, config, meshes, batch)
        for index, (domain, tensor) in enumerate(meshes):
            ranks = [r[index] for r in per_rank]
            plans = [Plan(config, domain, tensor, m["domain_rank"], m["tensor_rank"], batch, 4) for m in ranks]
            formulas = [(p.total("forward"), p.total("forward") + p.total("backward")) for p in plans]
            mismatches = [(m["forward"], m["step"], f) for m, f in zip(ranks, formulas) if (m["forward"], m["step"]) != f]
            rows.append(dict(
                mesh=f"{domain[0]}x{domain[1]} x {tensor}", ranks=world_size,
                params=max(m["params"] for m in ranks), params_formula=max(p.total("params") for p in plans),
                params_target=total_parameters(config) / (domain[0] * domain[1] * tensor),
                params_sum=sum(m["params"] for m in ranks),
                saved=max(m["saved_bytes"] for m in ranks), saved_formula=max(4 * p.total("saved") for p in plans),
                forward=max(m["forward"] for m in ranks), step=max(m["step"] for m in ranks),
                step_formula=max(p.total("forward") + p.total("backward") for p in plans), mismatches=mismatches))
    return rows


# --- reports ------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def gb(n: float, digits: int = 2) -> str:
    return f"{n / 1e9:.{digits}f}"


def print_measured(config_name: str, config: ModelConfig, batch: int, rows) -> None:
    print(f"\n## Measured: preset `{config_name}` ({total_parameters(config):,} parameters), batch {batch}, "
          f"float32, one training step, max over ranks")
    print("| ranks | domain x tensor | params/rank | formula | total/P | sum over ranks | saved act. MiB "
          "| formula | comm fwd MiB | comm step MiB | formula | formula == measured on every rank |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['mesh']} | {r['params']:,} | {r['params_formula']:,} | {r['params_target']:,.0f} "
              f"| {r['params_sum']:,} | {mib(r['saved'])} | {mib(r['saved_formula'])} | {mib(r['forward'])} "
              f"| {mib(r['step'])} | {mib(r['step_formula'])} | {'yes' if not r['mismatches'] else r['mismatches']} |")


def print_large(names: list[str], batch: int, element_size: int) -> None:
    print(f"\n## Formulas (no run): batch {batch}, {element_size}-byte activations and weights, max over ranks")
    print("| preset | params | domain x tensor | params/rank (GB) | total/P (GB) | saved act./rank (GB) "
          "| of which gathered weights | comm/rank per forward (GB) | per step (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        config = preset(name)
        total = total_parameters(config)
        for domain, tensor in LARGE_MESHES:
            size = domain[0] * domain[1] * tensor
            plans = [Plan(config, domain, tensor, d, t, batch, element_size)
                     for d in range(domain[0] * domain[1]) for t in range(tensor)]
            worst = lambda f: max(f(p) for p in plans)  # noqa: E731
            print(f"| {name} | {total / 1e9:.2f}B | {domain[0]}x{domain[1]} x {tensor} "
                  f"| {gb(worst(lambda p: p.total('params')) * element_size)} | {gb(total * element_size / size)} "
                  f"| {gb(worst(lambda p: p.total('saved')) * element_size)} "
                  f"| {gb(worst(lambda p: p.total('saved_weights')) * element_size)} "
                  f"| {gb(worst(lambda p: p.total('forward')))} "
                  f"| {gb(worst(lambda p: p.total('forward') + p.total('backward')))} |")


def print_per_layer(name: str, domain, tensor, batch: int, element_size: int) -> None:
    config = preset(name)
    plan = Plan(config, domain, tensor, 0, 0, batch, element_size)
    print(f"\n## Per layer: `{name}`, domain {domain[0]}x{domain[1]} x tensor {tensor}, rank (0, 0), "
          f"batch {batch}, {element_size}-byte elements, one block shown")
    print("| layer | what moves | forward GB sent: weights | activations | the other choice would send, in all |")
    print("|---|---|---|---|---|")
    for cost in plan.costs:
        if cost.name.startswith("blocks.") and not cost.name.startswith("blocks.0."):
            continue
        sent = sum(cost.forward.values())
        other = gb(cost.alternative, 3) if cost.alternative else "-"
        print(f"| {cost.name} | {cost.moves} | {gb(cost.weight_bytes, 3)} | {gb(sent - cost.weight_bytes, 3)} "
              f"| {other} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="model for the measured part")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--large", nargs="*", default=["jigsaw-1b", "jigsaw-2.6b"], choices=sorted(PRESETS))
    parser.add_argument("--no-measure", action="store_true")
    args = parser.parse_args(argv)
    print(f"machine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, gloo on CPU")
    if not args.no_measure:
        config = preset(args.preset)
        rows = run_measurements(config, args.batch)
        print_measured(args.preset, config, args.batch, rows)
    for element_size in (2, 4):
        print_large(args.large, 1, element_size)
    for name in args.large:
        for domain, tensor in [((2, 1), 2), ((1, 1), 2)]:
            print_per_layer(name, domain, tensor, 1, 2)


if __name__ == "__main__":
    main()
