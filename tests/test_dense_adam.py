"""FusedAdam (mlfast.ops.dense_adam) against torch.optim.Adam(fused=True): the same steps bit for bit,
state dicts loadable either way, a learning rate changed in place, and no torch._dynamo import."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import DEVICES
from mlfast.ops.dense_adam import FusedAdam


def _model(seed: int, device: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3),
                               torch.nn.Linear(3, 1, bias=False)).to(device)


def _run(model, opt, lr, seed: int, steps: int, unused: bool = False):
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        x = torch.randn(32, 7, generator=g).to(next(model.parameters()).device)
        opt.zero_grad(set_to_none=False)
        out = model[:3](x) if unused and k < 2 else model(x)  # the last layer gets no gradient at first
        out.square().mean().backward()
        opt.step()
        if k == 3:
            lr.fill_(lr.item() * 0.1)  # decay in place, as the trainer does


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wd", [0.0, 1e-3])
def test_steps_equal_torch_fused_adam_bit_for_bit(device, wd, seed):
    a, b = _model(seed, device), _model(seed, device)
    lr_a, lr_b = torch.full((1,), 1e-2, device=device), torch.full((1,), 1e-2, device=device)
    ours = FusedAdam(a.parameters(), lr=lr_a, weight_decay=wd)
    ref = torch.optim.Adam(b.parameters(), lr=lr_b, weight_decay=wd, fused=True)
    _run(a, ours, lr_a, seed, 8, unused=True)
    _run(b, ref, lr_b, seed, 8, unused=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.parameters(), b.parameters()):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[p][k], ref.state[q][k]), k


@pytest.mark.parametrize("device", DEVICES)
def test_state_dicts_load_either_way_and_training_continues_identically(device, seed):
    a, b = _model(seed, device), _model(seed, device)
    lr = torch.full((1,), 1e-2, device=device)
    ours, ref = FusedAdam(a.parameters(), lr=lr), torch.optim.Adam(b.parameters(), lr=lr.clone(), fused=True)
    _run(a, ours, lr, seed, 3)
    _run(b, ref, torch.full((1,), 1e-2, device=device), seed, 3)
    # torch's state into ours, ours into torch's: both then take the same next steps
    c, d = _model(seed, device), _model(seed, device)
    c.load_state_dict(b.state_dict())
    d.load_state_dict(a.state_dict())
    lr_c = torch.full((1,), 1e-2, device=device)
    from_torch = FusedAdam(c.parameters(), lr=lr_c)
    from_torch.load_state_dict(ref.state_dict())
    into_torch = torch.optim.Adam(d.parameters(), lr=1e-2, fused=True)
    into_torch.load_state_dict(ours.state_dict())
    assert from_torch.param_groups[0]["lr"] is lr_c  # the caller's tensor stays the one read
    _run(c, from_torch, lr_c, seed + 1, 2)
    _run(d, into_torch, torch.full((1,), 1e-2, device=device), seed + 1, 2)
    for p, q in zip(c.parameters(), d.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="parameters"):
        FusedAdam(list(c.parameters())[:2], lr=lr_c).load_state_dict(ref.state_dict())


def test_it_does_not_import_torch_dynamo():
    code = ("import sys, torch; from mlfast.ops.dense_adam import FusedAdam; w = torch.nn.Parameter(torch.ones(2)); "
            "o = FusedAdam([w], lr=0.1); w.sum().backward(); o.step(); o.zero_grad(); "
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr
