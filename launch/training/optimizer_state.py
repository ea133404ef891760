"""The optimizer's state in a mesh-free form: float32 master weights, Adam moments, step counts.

Every optimizer a run can use keeps the same quantities per parameter element: the float32
value it trains (the master weight), Adam's two moments (``exp_avg``, ``exp_avg_sq``) and a step
count per parameter group. Where they live differs:

* torch's fused AdamW under ZeRO stage 0: ``optimizer.state[param]``, whole on every replica; the
  parameter itself is the master weight (float32 weights or autocast), or with DeepSpeed's bf16
  at stage 0 a float32 copy of it that DeepSpeed's wrapper (``fp32_groups``) hands the optimizer;
* DeepSpeed's ZeRO 1/2 and bf16 optimizers: a flat float32 partition per group and replica
  rank, read and written per parameter through DeepSpeed's full-state API
  (``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``: gathers
  over the replica group; the ``safe_set_*`` twins write each rank's fragment);
* :class:`~launch.training.master_weights.MasterWeightAdam`: ``state[param]`` holds ``master``
  and the moments, whole on every replica.

:class:`OptimizerState` reads them as this model rank's whole shard of every parameter and
writes them back, so with each parameter's :class:`~parallel.sharding.ShardSpec` the shards of
all model ranks assemble into full tensors (``launch.training.checkpoint_format``) that load
into any mesh, any ZeRO stage and either optimizer.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from launch.training.master_weights import MasterWeightAdam

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "master"


class OptimizerState:
    """Mesh-free reads and writes of ``optimizer``'s state for ``model``'s parameters.

    ``optimizer`` is the torch optimizer the run built, ``wrapper`` what ``deepspeed.initialize``
    made of it (DeepSpeed's ZeRO, bf16 and fp16 optimizers replace its ``param_groups`` by their
    float32 partitions or copies). Every rank of the replica group must call :meth:`read`
    together (DeepSpeed gathers the partitions)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, wrapper=None):
        self.model, self.optimizer = model, optimizer
        self.params = dict(model.named_parameters())
        self.partitioned = any(hasattr(p, "_hp_mapping") for p in self.params.values())  # DeepSpeed owns them
        # where torch's optimizer keeps each parameter's float32 value: the parameter, or the
        # float32 copy DeepSpeed's unfused bf16/fp16 wrapper keeps of it, in the same order
        self.holders = {id(p): p for p in self.params.values()}
        if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups"):
            for low, copies in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                self.holders.update({id(lp): fp32 for lp, fp32 in zip(low, copies)})

    # ------------------------------------------------------------------ read
    @torch.no_grad()
    def read(self) -> tuple[dict[str, dict[str, torch.Tensor]], list[int]]:
        """``({name: {"master", "exp_avg", "exp_avg_sq"}}, steps per parameter group)``: this
        model rank's shards in float32 on the host (moments of a never-stepped optimizer are 0)."""
        steps = self.steps()
        stepped = any(steps)  # the same on every replica: all of them step together
        if self.partitioned and stepped:
            self._link_partitions()
        values = {name: {key: self._get(param, key, stepped).to("cpu", torch.float32, copy=True)
                             for key in (MASTER, *MOMENTS)}
                  for name, param in self.params.items()}
        return values, steps

    def _get(self, param: torch.Tensor, key: str, stepped: bool) -> torch.Tensor:
        if isinstance(self.optimizer, MasterWeightAdam):
            return self.optimizer.state[param][key]
        if key != MASTER and not stepped:  # torch's Adam creates its moments at the first step
            return torch.zeros_like(param, dtype=torch.float32)
        if self.partitioned:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            return safe_get_full_fp32_param(param) if key == MASTER else safe_get_full_optimizer_state(param, key)
        holder = self.holders[id(param)]
        return holder.detach() if key == MASTER else self.optimizer.state[holder][key]

    def steps(self) -> list[int]:
        """The optimizer's step count of every parameter group (0 before its first step)."""
        counts = []
        for group in self.optimizer.param_groups:
            state = self.optimizer.state.get(group["params"][0], {}) if group["params"] else {}
            counts.append(int(state["step"]) if "step" in state else 0)
        return counts

    # ------------------------------------------------------------------ write
    @torch.no_grad()
    def write(self, values: dict[str, dict[str, torch.Tensor]], steps: list[int]) -> None:
        """Set master weights, moments and step counts from this model rank's shards (``values``
        as :meth:`read` gives them). The parameters themselves are the caller's to set (they
        may be bf16 roundings of the master weights)."""
        groups = self.optimizer.param_groups
        if len(steps) != len(groups):
            raise ValueError(f"optimizer state with {len(steps)} parameter groups, this optimizer has {len(groups)}")
        missing = sorted(set(self.params) - set(values))
        if missing:
            raise ValueError(f"optimizer state lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        self._create_state(steps)
        if self.partitioned:
            self._link_partitions()
        for name, param in self.params.items():
            for key in (MASTER, *MOMENTS):
                self._set(param, key, values[name][key])

    @torch.no_grad()
    def write_masters(self, masters: dict[str, torch.Tensor]) -> None:
        """Set the master weights alone (new weights for a run whose optimizer starts afresh)."""
        for name, param in self.params.items():
            self._set(param, MASTER, masters[name])

    def _create_state(self, steps: list[int]) -> None:
        """The state torch's Adam creates at its first step, with these step counts (a fresh
        optimizer has none yet; MasterWeightAdam creates its own and shares a count per group)."""
        state = self.optimizer.state
        for group, count in zip(self.optimizer.param_groups, steps):
            if isinstance(self.optimizer, MasterWeightAdam):
                if group["params"]:
                    state[group["params"][0]]["step"].fill_(float(count))  # one tensor shared by the group
                continue
            for flat in group["params"]:
                device = flat.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
                entry = state[flat]
                entry["step"] = torch.tensor(float(count), dtype=torch.float32, device=device)
                for key in MOMENTS:
                    if key not in entry:
                        entry[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)

    def _set(self, param: torch.Tensor, key: str, value: torch.Tensor) -> None:
        if isinstance(self.optimizer, MasterWeightAdam):
            self.optimizer.state[param][key].copy_(value)
        elif self.partitioned:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            value = value.to(param.device)
            if key == MASTER:
                safe_set_full_fp32_param(param, value)
            else:
                safe_set_full_optimizer_state(param, value, key)
        else:
            holder = self.holders[id(param)]
            if key != MASTER:
                self.optimizer.state[holder][key].copy_(value)
            elif holder is not param:  # the parameter itself is the caller's to set
                holder.copy_(value)

    def _link_partitions(self) -> None:
        """Point every parameter's DeepSpeed fragment at its group's optimizer state.

        DeepSpeed links them once, after the first group's first step, when the later groups'
        states do not exist yet; their ``safe_*_optimizer_state`` would then fail. Linking
        again is cheap (views)."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        members = defaultdict(list)
        for param in self.params.values():
            if getattr(param, "_hp_mapping", None) is not None:
                members[param._hp_mapping.param_group_index].append(param)
        for index, group in enumerate(self.optimizer.param_groups):
            flat = group["params"][0]
            if flat in self.optimizer.state and members[index]:
                lazy_init_hp_params_optimizer_state(members[index], flat, self.optimizer.state)
