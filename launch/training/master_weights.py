"""Adam / AdamW for bf16 parameters with float32 master weights: one pass per parameter.

Mixed precision the way one GPU runs it fastest (measurements: ``benchmarks/GPU.md``): the model's
parameters are bf16 (the matmuls read them directly, no per-step weight casts), the optimizer
keeps a float32 master copy and float32 moments of each, and its step reads the bf16 gradient
once, updates master and moments and writes the new bf16 weights in the same pass:

    per parameter element: read bf16 grad (2 B), fp32 master, m, v (12 B);
                           write fp32 master, m, v (12 B), bf16 weight (2 B)  = 28 B

against 40 B for float32 weights under autocast (the cast of every weight to bf16 in forward,
the bf16 -> fp32 cast of every weight gradient, torch's fused fp32 step) and DeepSpeed's bf16
optimizer's extra gradient and weight copies. The update is torch's Adam / AdamW (L2 or
decoupled weight decay, bias correction), written once as a tensor function: compiled
(``compile=True``) it is one fused kernel per parameter (Triton on GPUs, C++ on CPUs); eager, the
same arithmetic op by op.

Like torch's fused optimizers it takes ``grad_scale`` (the gradient is divided by it: gradient
clipping, ``launch.training.engine.ClipInStep``) and ``found_inf`` (non-zero: the step is skipped, also its
count), so nothing waits for the host. ``state_dict`` holds the float32 master weights and moments
(torch's ``load_state_dict`` would cast them to the parameters' bf16; :meth:`load_state_dict`
keeps them float32).
"""

from __future__ import annotations

import itertools
from typing import Iterable

import torch

FLOAT32_STATE = ("master", "exp_avg", "exp_avg_sq")


def adam_update(weights: list[torch.Tensor], grads: list[torch.Tensor], masters: list[torch.Tensor],
                exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], step: torch.Tensor,
                lr: torch.Tensor, grad_scale: torch.Tensor, found_inf: torch.Tensor, beta1: float, beta2: float,
                eps: float, weight_decay: float, decoupled: bool) -> None:
    """One Adam(W) step of every parameter in place; ``step`` is the count after this step.

    ``found_inf`` non-zero keeps every tensor as it was (``step`` is the caller's to keep)."""
    keep = found_inf != 0
    bias1 = 1 - beta1 ** step
    root_bias2 = (1 - beta2 ** step).sqrt()
    for weight, grad, master, m, v in zip(weights, grads, masters, exp_avgs, exp_avg_sqs):
        g = grad.float() / grad_scale
        p = master
        if weight_decay and not decoupled:
            g = g + weight_decay * p
        new_m = m + (1 - beta1) * (g - m)
        new_v = beta2 * v + (1 - beta2) * g * g
        if weight_decay and decoupled:
            p = p * (1 - lr * weight_decay)
        p = p - (lr / bias1) * new_m / (new_v.sqrt() / root_bias2 + eps)
        p = torch.where(keep, master, p)
        master.copy_(p)
        m.copy_(torch.where(keep, m, new_m))
        v.copy_(torch.where(keep, v, new_v))
        weight.copy_(p)


class MasterWeightAdam(torch.optim.Optimizer):
    """Adam (``decoupled_weight_decay=False``, torch's ``Adam``) or AdamW for bf16 parameters.

    The parameters given are float32 (or already bf16): their float32 values become the master
    copies, and the parameters themselves are turned into bf16 in place - build the optimizer
    before the model is compiled or wrapped. ``lr`` may change between steps (schedulers) without
    recompiling: it travels as a device tensor.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                 dtype: torch.dtype = torch.bfloat16, compile: bool = False):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"MasterWeightAdam: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}: "
                             f"expected lr, eps, weight_decay >= 0 and betas in [0, 1)")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"MasterWeightAdam: dtype {dtype}: expected torch.bfloat16 or torch.float16 parameters")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, fused=True)
        super().__init__(params, defaults)
        self._step_supports_amp_scaling = True  # takes grad_scale / found_inf like torch's fused optimizers
        self.grad_scale: torch.Tensor | None = None
        self.found_inf: torch.Tensor | None = None
        self.dtype = dtype
        self._lr: dict[int, torch.Tensor] = {}
        self._update = adam_update
        if compile:
            from launch.runtime.compile import compiled

            self._update = compiled(adam_update)
        for param in self._params():
            if not param.is_floating_point():
                raise ValueError(f"MasterWeightAdam: a parameter of dtype {param.dtype}: expected floating point")
            master = param.detach().float().clone()
            with torch.no_grad():
                param.data = param.data.to(dtype)
            self.state[param] = {"step": torch.zeros((), dtype=torch.float32, device=param.device), "master": master,
                                 "exp_avg": torch.zeros_like(master), "exp_avg_sq": torch.zeros_like(master)}

    def _params(self) -> Iterable[torch.Tensor]:
        return itertools.chain.from_iterable(group["params"] for group in self.param_groups)

    def master(self, param: torch.Tensor) -> torch.Tensor:
        """The float32 master copy of ``param`` (the values it trains)."""
        return self.state[param]["master"]

    @torch.no_grad()
    def set_master(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Set ``param``'s master copy (and the bf16 parameter) to ``value``; the moments stay."""
        self.state[param]["master"].copy_(value)
        param.copy_(value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.dtype != self.dtype for p in params):
                raise TypeError(f"MasterWeightAdam: parameters must stay {self.dtype} (got "
                                f"{sorted({str(p.dtype) for p in params})}); was the model cast after building "
                                f"the optimizer?")
            device = params[0].device
            state = [self.state[p] for p in params]
            steps = state[0]["step"]  # one count per group: every parameter of a group steps together
            found_inf = self.found_inf.to(device) if self.found_inf is not None else torch.zeros((), device=device)
            steps += (found_inf == 0).float()
            for s in state[1:]:
                s["step"] = steps
            grad_scale = self.grad_scale.to(device) if self.grad_scale is not None else torch.ones((), device=device)
            # the learning rate as a device tensor filled in place: a fresh torch.tensor(lr, device=...)
            # is a blocking host-to-device copy that would stall the host until the GPU drained
            lr = self._lr.setdefault(id(group), torch.zeros((), dtype=torch.float32, device=device))
            if torch.is_tensor(group["lr"]):
                lr.copy_(group["lr"])
            else:
                lr.fill_(group["lr"])
            beta1, beta2 = group["betas"]
            self._update(params, [p.grad for p in params], [s["master"] for s in state],
                         [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                         torch.clamp(steps, min=1.0), lr, grad_scale, found_inf, beta1, beta2, group["eps"],
                         group["weight_decay"], group["decoupled_weight_decay"])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, except that master weights and moments stay float32 (torch casts every
        floating-point state to its parameter's dtype, bf16 here)."""
        saved_ids = itertools.chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        full = {param: state_dict["state"].get(saved_id, {}) for saved_id, param in zip(saved_ids, self._params())}
        missing = [i for i, (param, values) in enumerate(full.items()) if not all(k in values for k in FLOAT32_STATE)]
        if missing:
            raise ValueError(f"MasterWeightAdam.load_state_dict: no master weights and moments ({', '.join(FLOAT32_STATE)}) "
                             f"for parameters {missing[:5]}{'...' if len(missing) > 5 else ''}: the state comes from "
                             f"another optimizer")
        super().load_state_dict(state_dict)
        for param, values in full.items():
            for key in FLOAT32_STATE:
                self.state[param][key] = values[key].to(device=param.device, dtype=torch.float32)
        for group in self.param_groups:  # one step count per group, shared as the step builds it
            params = group["params"]
            for param in params[1:]:
                self.state[param]["step"] = self.state[params[0]]["step"]
