"""Fused dense Adam for the MLPs: ``torch.optim.Adam(fused=True)``'s kernel, without torch.optim.

Why: every ``torch.optim.Optimizer`` method is wrapped in ``torch._disable_dynamo``, whose first
call imports ``torch._dynamo``: 1.2 s of a 5.8 s ``mlfast train`` on 10k rows (cProfile), spent
before the first step. This class calls the same fused op (``torch._fused_adam_``, CPU and CUDA)
with the same state layout, so its steps equal ``torch.optim.Adam(..., fused=True)``'s bit for bit
(tested) and its ``state_dict`` is torch's format (checkpoints load either way).

Example::

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = FusedAdam([w], lr=torch.full((1,), 0.1))
    >>> (w * torch.tensor([1.0, -1.0, 0.0])).sum().backward()
    >>> opt.step()
    >>> [round(x, 4) for x in w.tolist()]
    [0.9, 1.1, 1.0]
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

BETAS = (0.9, 0.999)
EPS = 1e-8


class FusedAdam:
    """Adam (L2 ``weight_decay`` added to the gradient, as torch's Adam) over ``params``, fused.

    ``lr``: a float or a one-element tensor (changed in place by the caller for decay, and read by
    a CUDA-graphed step). ``param_groups`` / ``state`` / ``state_dict`` as torch.optim's."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float | torch.Tensor, weight_decay: float = 0.0):
        params = list(params)
        self.param_groups: list[dict[str, Any]] = [{
            "params": params, "lr": lr, "betas": BETAS, "eps": EPS, "weight_decay": float(weight_decay),
            "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
            "fused": True, "decoupled_weight_decay": False}]
        self.state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.requires_grad_(False)
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        g = self.param_groups[0]
        params, grads, m, v, steps = [], [], [], [], []
        for p in g["params"]:
            if p.grad is None:
                continue
            st = self.state.get(p)
            if not st:
                st = self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            params.append(p)
            grads.append(p.grad)
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            steps.append(st["step"])
        if not params:
            return
        # one call per (device, dtype), as torch groups them
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        lr = g["lr"]
        for (device, _), idx in groups.items():
            sel = [steps[i] for i in idx]
            torch._foreach_add_(sel, 1)
            lr_d = lr.to(device) if isinstance(lr, torch.Tensor) and lr.device != device and device.type != "cpu" \
                else lr
            torch._fused_adam_([params[i] for i in idx], [grads[i] for i in idx], [m[i] for i in idx],
                               [v[i] for i in idx], [], sel, amsgrad=False, lr=lr_d, beta1=g["betas"][0],
                               beta2=g["betas"][1], weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
                               grad_scale=None, found_inf=None)

    def state_dict(self) -> dict[str, Any]:
        g = self.param_groups[0]
        index = {id(p): i for i, p in enumerate(g["params"])}
        return {"state": {index[id(p)]: dict(st) for p, st in self.state.items()},
                "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                  "params": list(range(len(g["params"])))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this class's or ``torch.optim.Adam``'s state dict (same parameters, same order)."""
        g = self.param_groups[0]
        saved = state_dict["param_groups"]
        n = sum(len(s["params"]) for s in saved)
        if len(saved) != 1 or n != len(g["params"]):
            raise ValueError(f"optimizer state for {n} parameters in {len(saved)} group(s); this optimizer has "
                             f"{len(g['params'])} parameters in 1 group")
        order = saved[0]["params"]
        self.state = {}
        for pos, key in enumerate(order):
            st = state_dict["state"].get(key)
            if st:
                p = g["params"][pos]
                self.state[p] = {k: (t.to(device=p.device, dtype=torch.float32) if k == "step" else t.to(p.device))
                                 for k, t in st.items()}
        for k, val in saved[0].items():
            if k not in ("params", "lr"):
                g[k] = val
        if not isinstance(g["lr"], torch.Tensor):
            g["lr"] = saved[0]["lr"]
