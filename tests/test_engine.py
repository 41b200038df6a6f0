"""The fused engine against the plain one, step by step, on every backend (Triton under the
interpreter on the CPU, compiled on CUDA)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import DEVICES, TRITON_CPU
from mlfast.train.config import TrainConfig
from mlfast.train.engine import FusedEngine, PlainEngine
from mlfast.models import FeatureSchema, build_model, parse_peers

SCHEMA = FeatureSchema((0, 37, 60, 101))  # 3 fields, odd sizes
PEERS = "deepfm:mlp=8-8,dropout=0,dcn:mlp=8,layers=2,dropout=0,lr"


def make_peers(device, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList([build_model(s, SCHEMA, 4) for s in parse_peers(PEERS)]).to(device)


def batches(device, n=3, B=19, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.stack([torch.randint(a, b, (B,), generator=g) for a, b in zip(SCHEMA.field_offsets, SCHEMA.field_offsets[1:])], 1)
        ids[0] = ids[1]  # repeated rows in a batch
        out.append((ids.to(device), (torch.rand(B, generator=g) < 0.3).float().to(device)))
    return out


def state(engine):
    return [engine.peer_state_dict(i) for i in range(engine.num_peers)]


def backends_for(device: str) -> list[str]:
    return ["triton"] if device == "cuda" else ["cpu", "reference"] + (["triton"] if TRITON_CPU else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutual", ["kl", "symkl", "mse"])
def test_fused_backends_agree_with_the_reference_backend(device, mutual):
    cfg = TrainConfig(peers=PEERS.split(","), sparse_optimizer="adam", embedding_l2=1e-3, mutual=mutual,
                      alpha=0.7, cuda_graph=False, progress=False)
    dev = torch.device(device)
    results = {}
    for backend in backends_for(device) + ["reference"]:
        eng = FusedEngine(make_peers(dev), cfg, dev, 1e-2, backend=backend)
        eng.set_alpha(0.7)
        losses = [float(eng.train_step(ids, None, y)) for ids, y in batches(dev)]
        results[backend] = (losses, state(eng))
    ref_losses, ref_state = results["reference"]
    for backend, (losses, st) in results.items():
        assert losses == pytest.approx(ref_losses, rel=1e-5), backend
        for a, b in zip(st, ref_state):
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{backend} {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_first_step_matches_plain_engine(device):
    """Same init, same batch: the fused engine computes the same loss as the plain reference step,
    updates the dense layers identically (both Adam) and changes only the looked-up table rows."""
    cfg = TrainConfig(peers=PEERS.split(","), embedding_l2=0.0, cuda_graph=False, progress=False)
    dev = torch.device(device)
    plain = PlainEngine(make_peers(dev), cfg, dev, 1e-3)
    fused = FusedEngine(make_peers(dev), cfg, dev, 1e-3)
    before = state(fused)
    (ids, y), = batches(dev, n=1)
    for e in (plain, fused):
        e.set_alpha(1.0)
    lp, lf = plain.train_step(ids, None, y), fused.train_step(ids, None, y)
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    touched = torch.zeros(SCHEMA.table_rows, dtype=torch.bool, device=dev)
    touched[ids.reshape(-1)] = True
    for i, (a, b, b0) in enumerate(zip(state(fused), state(plain), before)):
        for k in a:
            if k == "embedding.weight":
                assert torch.equal(a[k][~touched.cpu()], b0[k][~touched.cpu()])  # untouched rows
                # first Adam step: both move each touched entry by ~lr * sign(g)
                torch.testing.assert_close(a[k][touched.cpu()], b[k][touched.cpu()], rtol=0, atol=2e-5)
            else:
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


# ---------------------------------------------------------------------------------------------
# Multi-hot bag fields: the fused engine's one lookup (one-hot + pooled bags, one optimizer step)
# against the plain models' F.embedding + F.embedding_bag

BAG_SCHEMA = FeatureSchema((0, 37, 60, 101, 150, 171), num_bags=2)  # 3 one-hot fields, then 2 bags


def bag_batches(device, n=3, B=19, seed=1):
    g = torch.Generator().manual_seed(seed)
    offs = BAG_SCHEMA.field_offsets
    out = []
    for _ in range(n):
        ids = torch.stack([torch.randint(offs[f], offs[f + 1], (B,), generator=g) for f in range(3)], 1)
        bags = []
        for f in (3, 4):
            lengths = torch.randint(1, 5, (B,), generator=g)
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
            bags.append((offsets.to(device), torch.randint(offs[f], offs[f + 1], (int(offsets[-1]),), generator=g).to(device)))
        out.append((ids.to(device), tuple(bags), (torch.rand(B, generator=g) < 0.3).float().to(device)))
    return out


def make_bag_peers(device, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList([build_model(s, BAG_SCHEMA, 4) for s in parse_peers(PEERS)]).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_bag_fields_fused_backends_agree_and_first_step_matches_plain(device):
    dev = torch.device(device)
    cfg = TrainConfig(peers=PEERS.split(","), sparse_optimizer="adam", embedding_l2=0.0, cuda_graph=False,
                      progress=False)
    results = {}
    for backend in backends_for(device) + ["reference"]:
        eng = FusedEngine(make_bag_peers(dev), cfg, dev, 1e-2, backend=backend)
        eng.set_alpha(0.7)
        losses = [float(eng.train_step(ids, None, y, bags)) for ids, bags, y in bag_batches(dev)]
        assert eng.tables.step_count == 3
        results[backend] = (losses, state(eng), eng)
    ref_losses, ref_state, ref_eng = results["reference"]
    for backend, (losses, st, _) in results.items():
        assert losses == pytest.approx(ref_losses, rel=1e-5), backend
        for a, b in zip(st, ref_state):
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{backend} {k}")
    # predictions read the same rows as training did
    ids, bags, _ = bag_batches(dev, n=1, seed=5)[0]
    plain_peers = make_bag_peers(dev)
    for i, m in enumerate(plain_peers):
        m.load_state_dict(ref_eng.peer_state_dict(i))
        m.eval()
    ref_eng.train(False)
    with torch.no_grad():
        expected = torch.stack([m(ids, None, bags) for m in plain_peers], 1)
    torch.testing.assert_close(ref_eng.predict_logits(ids, None, bags), expected, rtol=1e-5, atol=1e-6)
    # the first step of the plain engine computes the same loss
    plain = PlainEngine(make_bag_peers(dev), cfg, dev, 1e-2)
    fused = FusedEngine(make_bag_peers(dev), cfg, dev, 1e-2)
    ids, bags, y = bag_batches(dev, n=1)[0]
    for e in (plain, fused):
        e.set_alpha(0.7)
    torch.testing.assert_close(fused.train_step(ids, None, y, bags), plain.train_step(ids, None, y, bags),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bag fields"):
        plain.train_step(ids, None, y)
