"""Model zoo: each model against a direct, loop-by-loop formula, plus contracts every model keeps.

The references below work on plain Python floats, one sample at a time, with explicit loops over
fields, pairs, units and layers; they read the module's parameters by name but share no code with
``mlfast.models.blocks``. Parameters are re-drawn at random (biases and BatchNorm statistics
included) so that no term can hide behind a zero initialisation. Seeds come from the shared
``gen``/``seed`` fixtures (fresh each session, replayable with MLFAST_TEST_SEED).
"""
from __future__ import annotations

import functools
import inspect
import math

import pytest
import torch
from conftest import assert_close

from mlfast.models import MODELS, FeatureSchema
from mlfast.train.tables import DenseTables


# ---------------------------------------------------------------------------------------------
# Helpers: plain-Python linear algebra on lists


def L(t: torch.Tensor) -> list:
    return t.detach().double().tolist()


def matvec(W: list, x: list, b: list | None = None) -> list:
    out = []
    for j in range(len(W)):
        s = 0.0 if b is None else b[j]
        for k in range(len(x)):
            s += W[j][k] * x[k]
        out.append(s)
    return out


def relu(x: list) -> list:
    return [max(0.0, a) for a in x]


def dot(a: list, b: list) -> float:
    return sum(x * y for x, y in zip(a, b))


def ref_mlp(mlp, x: list) -> list:
    """MLP on one sample: Linear -> (BatchNorm with running stats) -> ReLU per layer, then output."""
    for i, lin in enumerate(mlp.linears):
        x = matvec(L(lin.weight), x, None if lin.bias is None else L(lin.bias))
        if len(mlp.norms):
            bn = mlp.norms[i]
            rm, rv, g, be = L(bn.running_mean), L(bn.running_var), L(bn.weight), L(bn.bias)
            x = [(x[j] - rm[j]) / math.sqrt(rv[j] + bn.eps) * g[j] + be[j] for j in range(len(x))]
        x = relu(x)
    if mlp.out is not None:
        x = matvec(L(mlp.out.weight), x, L(mlp.out.bias))
    return x


def split(model, e: list) -> tuple[list, list]:
    """(vectors [F][D], first-order weights [F]) of one sample's looked-up rows."""
    if model.uses_linear:
        return [row[:-1] for row in e], [row[-1] for row in e]
    return e, []


def linear_term(lt, w: list, d: list) -> float:
    s = sum(w)
    if lt.bias is not None:
        s += float(lt.bias.detach())
    if lt.dense is not None:
        s += dot(L(lt.dense.weight)[0], d)
    return s


def pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def fm_pairs(v: list) -> float:
    s = 0.0
    for i, j in pairs(len(v)):
        s += dot(v[i], v[j])
    return s


def flat(v: list) -> list:
    return [a for row in v for a in row]


# ---------------------------------------------------------------------------------------------
# Per-model references: (model, one sample's rows [F][W], dense [Nd]) -> logit


def ref_lr(m, e, d):
    _, w = split(m, e)
    return linear_term(m.linear, w, d)


def ref_fm(m, e, d):
    v, w = split(m, e)
    return linear_term(m.linear, w, d) + fm_pairs(v)


def ref_deepfm(m, e, d):
    v, w = split(m, e)
    return linear_term(m.linear, w, []) + fm_pairs(v) + ref_mlp(m.mlp, flat(v) + d)[0]


def ref_widedeep(m, e, d):
    v, w = split(m, e)
    return linear_term(m.linear, w, []) + ref_mlp(m.mlp, flat(v) + d)[0]


def ref_ipnn(m, e, d):
    v, _ = split(m, e)
    products = [dot(v[i], v[j]) for i, j in pairs(len(v))]
    return ref_mlp(m.mlp, flat(v) + products + d)[0]


def ref_cross_v1(cross, x0: list) -> list:
    W, b = L(cross.weight), L(cross.bias)
    x = list(x0)
    for layer in range(len(W)):
        s = dot(x, W[layer])
        x = [x0[k] * s + b[layer][k] + x[k] for k in range(len(x0))]
    return x


def ref_dcn(m, e, d):
    v, _ = split(m, e)
    x0 = flat(v) + d
    out = ref_cross_v1(m.cross, x0)
    if m.mlp is not None:
        out = out + ref_mlp(m.mlp, x0)
    return matvec(L(m.fc.weight), out, L(m.fc.bias))[0]


def ref_cross_v2(cross, x0: list) -> list:
    x = list(x0)
    if hasattr(cross, "layers"):  # full rank
        for lin in cross.layers:
            h = matvec(L(lin.weight), x, L(lin.bias))
            x = [x0[k] * h[k] + x[k] for k in range(len(x0))]
        return x
    U, V, C, b, G = L(cross.U), L(cross.V), L(cross.C), L(cross.bias), L(cross.gate.weight)
    n, dim, r = len(G), len(x0), len(C[0][0])
    for layer in range(len(U)):
        logits = [dot(G[e], x) for e in range(n)]
        mx = max(logits)
        z = sum(math.exp(a - mx) for a in logits)
        gates = [math.exp(a - mx) / z for a in logits]
        new = list(x)
        for e in range(n):
            vx = [math.tanh(sum(V[layer][e][k][q] * x[k] for k in range(dim))) for q in range(r)]
            cx = [math.tanh(sum(C[layer][e][s][q] * vx[q] for q in range(r))) for s in range(r)]
            ux = [sum(U[layer][e][k][s] * cx[s] for s in range(r)) for k in range(dim)]
            for k in range(dim):
                new[k] += gates[e] * x0[k] * (ux[k] + b[layer][k])
        x = new
    return x


def ref_dcnv2(m, e, d):
    v, _ = split(m, e)
    x0 = flat(v) + d
    c = ref_cross_v2(m.cross, x0)
    if m.stacked_mlp is not None:
        c = ref_mlp(m.stacked_mlp, c)
    if m.parallel_mlp is not None:
        c = c + ref_mlp(m.parallel_mlp, x0)
    return matvec(L(m.fc.weight), c, L(m.fc.bias))[0]


def ref_senet(se, v: list) -> list:
    z = [sum(row) / len(row) for row in v]
    a = relu(matvec(L(se.excite.weight), relu(matvec(L(se.squeeze.weight), z))))
    return [[a[f] * x for x in v[f]] for f in range(len(v))]


def ref_bilinear(bl, v: list) -> list:
    W = L(bl.weight)
    out = []
    for p, (i, j) in enumerate(pairs(len(v))):
        Wm = W[{"field_all": 0, "field_each": i, "field_interaction": p}[bl.kind]]
        D = len(v[i])
        out.append([sum(v[i][k] * Wm[k][c] for k in range(D)) * v[j][c] for c in range(D)])
    return out


def ref_fibinet(m, e, d):
    v, w = split(m, e)
    p = ref_bilinear(m.bilinear_p, v)
    q = ref_bilinear(m.bilinear_q, ref_senet(m.senet, v))
    return linear_term(m.linear, w, []) + ref_mlp(m.mlp, flat(p) + flat(q) + d)[0]


def ref_cin(cin, v: list) -> float:
    F_, D = len(v), len(v[0])
    x0 = v
    x = v
    pooled = []
    for lin in cin.layers:
        W, b = L(lin.weight), L(lin.bias)
        H = len(x)
        nxt = []
        for o in range(len(W)):
            row = []
            for c in range(D):
                s = b[o]
                for h in range(F_):
                    for mm in range(H):
                        s += W[o][h * H + mm] * x0[h][c] * x[mm][c]
                row.append(s)
            nxt.append(row)
        x = nxt
        pooled += [sum(row) for row in x]
    return matvec(L(cin.fc.weight), pooled, L(cin.fc.bias))[0]


def ref_xdeepfm(m, e, d):
    v, w = split(m, e)
    return linear_term(m.linear, w, []) + ref_cin(m.cin, v) + ref_mlp(m.mlp, flat(v) + d)[0]


def ref_attention_layer(layer, x: list, scale: bool) -> list:
    W = L(layer.qkv.weight)
    A = len(W) // 3
    nh, hd = layer.num_heads, A // layer.num_heads
    q = [matvec(W[:A], xf) for xf in x]
    k = [matvec(W[A:2 * A], xf) for xf in x]
    val = [matvec(W[2 * A:], xf) for xf in x]
    s = 1.0 / math.sqrt(hd) if scale else 1.0
    out = []
    for f in range(len(x)):
        row = []
        for h in range(nh):
            sl = slice(h * hd, (h + 1) * hd)
            scores = [dot(q[f][sl], k[g][sl]) * s for g in range(len(x))]
            mx = max(scores)
            z = sum(math.exp(a - mx) for a in scores)
            att = [math.exp(a - mx) / z for a in scores]
            row += [sum(att[g] * val[g][sl][c] for g in range(len(x))) for c in range(hd)]
        out.append(row)
    if layer.residual:
        res = [matvec(L(layer.res.weight), xf) for xf in x] if layer.res is not None else x
        out = [[a + b for a, b in zip(o, r)] for o, r in zip(out, res)]
    if layer.norm is not None:
        g, be = L(layer.norm.weight), L(layer.norm.bias)
        normed = []
        for o in out:
            mu = sum(o) / len(o)
            var = sum((a - mu) ** 2 for a in o) / len(o)
            normed.append([(a - mu) / math.sqrt(var + layer.norm.eps) * g[c] + be[c] for c, a in enumerate(o)])
        out = normed
    return [relu(o) for o in out]


def ref_autoint(m, e, d, scale: bool = False):
    v, _ = split(m, e)
    h = v
    for layer in m.attention:
        h = ref_attention_layer(layer, h, scale)
    return matvec(L(m.fc.weight), flat(h), L(m.fc.bias))[0] + ref_mlp(m.mlp, flat(v) + d)[0]


REFS = {
    "lr": ref_lr, "fm": ref_fm, "deepfm": ref_deepfm, "widedeep": ref_widedeep, "ipnn": ref_ipnn,
    "dcn": ref_dcn, "dcnv2": ref_dcnv2, "fibinet": ref_fibinet, "xdeepfm": ref_xdeepfm,
    "autoint": ref_autoint,
}

# (model, options, B, F, D): every block option that changes the math appears at least once.
CASES = [
    ("lr", {}, 4, 3, 2),
    ("fm", {}, 5, 4, 3),
    ("deepfm", {"mlp": (5, 4)}, 4, 4, 3),
    ("deepfm", {"mlp": (6,), "batch_norm": False}, 3, 3, 2),
    ("deepfm", {"mlp": ()}, 3, 3, 2),
    ("widedeep", {"mlp": (5, 4)}, 4, 3, 4),
    ("ipnn", {"mlp": (5, 4)}, 4, 4, 3),
    ("dcn", {"layers": 3, "mlp": (5, 4)}, 4, 3, 3),
    ("dcn", {"layers": 2, "mlp": ()}, 3, 4, 2),
    ("dcnv2", {"layers": 2, "mlp": (5,)}, 4, 3, 3),
    ("dcnv2", {"layers": 2, "mlp": (5, 4), "structure": "stacked"}, 4, 3, 2),
    ("dcnv2", {"layers": 1, "mlp": (5,), "structure": "stacked_parallel"}, 3, 3, 2),
    ("dcnv2", {"layers": 3, "structure": "crossnet_only"}, 3, 4, 2),
    ("dcnv2", {"layers": 2, "mlp": (4,), "low_rank_mixture": True, "low_rank": 2, "experts": 3}, 4, 3, 3),
    ("fibinet", {"mlp": (5,), "bilinear": "field_interaction"}, 4, 4, 3),
    ("fibinet", {"mlp": (5,), "bilinear": "field_each"}, 3, 3, 4),
    ("fibinet", {"mlp": (5, 3), "bilinear": "field_all", "reduction_ratio": 2.0}, 3, 4, 2),
    ("xdeepfm", {"cin": (3, 2), "mlp": (5,)}, 4, 3, 3),
    ("xdeepfm", {"cin": (4,), "mlp": (4,), "batch_norm": False}, 3, 4, 2),
    ("xdeepfm", {"cin": (5, 2, 6), "mlp": (4,)}, 3, 3, 2),  # H_k > F: the other contraction order
    ("autoint", {"mlp": (5,)}, 4, 3, 4),  # attention_dim 8 != D: projected residual
    ("autoint", {"mlp": (5,), "attention_dim": 4, "heads": 2, "scale": True, "attention_layers": 3}, 3, 4, 4),
    ("autoint", {"mlp": (4,), "attention_dim": 6, "heads": 3, "layer_norm": True, "residual": False}, 3, 3, 2),
]


def make_schema(F_: int, num_dense: int, rows_per_field: int = 5) -> FeatureSchema:
    return FeatureSchema(tuple(rows_per_field * f for f in range(F_ + 1)), num_dense=num_dense)


def randomize_(model: torch.nn.Module, gen: torch.Generator, std: float = 0.3) -> None:
    """Every parameter and BatchNorm statistic drawn at random, so no term is zero by init."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.2)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)


def case_id(c) -> str:
    return c[0] + "-" + "-".join(f"{k}={v}" for k, v in c[1].items())


@pytest.mark.parametrize("num_dense", [0, 2])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_forward_matches_direct_formula(case, num_dense, gen, device):
    name, opts, B, F_, D = case
    model = MODELS[name](make_schema(F_, num_dense), embedding_dim=D, **opts).eval()
    randomize_(model, gen)
    emb = torch.randn(B, F_, model.embedding_width, generator=gen)
    dense = torch.randn(B, num_dense, generator=gen) if num_dense else None
    got = model.to(device)(emb.to(device), None if dense is None else dense.to(device))
    # Options that only switch arithmetic (no parameter to read) are handed to the reference.
    reference = functools.partial(ref_autoint, scale=opts.get("scale", False)) if name == "autoint" else REFS[name]
    ref = torch.tensor([
        reference(model, L(emb[b]), L(dense[b]) if dense is not None else []) for b in range(B)
    ], dtype=torch.float64)
    assert got.shape == (B,) and got.dtype == torch.float32
    assert ref.abs().max() > 1e-3  # far above the tolerance: not a comparison of two near-zeros
    assert_close(got, ref)


# ---------------------------------------------------------------------------------------------
# Contracts every registered model keeps (default options, tiny MLPs)

# Wide enough that no sample's MLP is dead (all ReLUs off) for any seed in practice: the checks
# below need every looked-up row and every dense input to reach the logit.
SMALL = {"mlp": (64, 32)}


def small_model(name: str, schema: FeatureSchema, D: int = 4):
    cls = MODELS[name]
    opts = {k: v for k, v in SMALL.items() if k in inspect.signature(cls).parameters}
    return cls(schema, embedding_dim=D, **opts)


def sample_ids(schema: FeatureSchema, B: int, gen: torch.Generator) -> torch.Tensor:
    offs = torch.tensor(schema.field_offsets)
    sizes = offs[1:] - offs[:-1]
    local = (torch.rand(B, schema.num_fields, generator=gen) * sizes).long()
    return offs[:-1] + local


def table_for(m, schema: FeatureSchema, gen: torch.Generator) -> DenseTables:
    """The plain reference table of one model (the trainer's tables hold it otherwise)."""
    t = DenseTables(schema.table_rows, [m.embedding_width], seeds=[int(torch.randint(0, 2**31, (), generator=gen))])
    with torch.no_grad():
        t.tables[0].normal_(0, 0.3, generator=gen)  # far from the 1e-4 init: every row matters
    return t


def test_registry_holds_the_ten_models():
    assert sorted(MODELS) == sorted(
        ["lr", "fm", "deepfm", "dcn", "dcnv2", "widedeep", "ipnn", "fibinet", "xdeepfm", "autoint"]
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_embedding_width_and_no_table(name):
    schema = make_schema(4, 0, rows_per_field=7)
    m = small_model(name, schema, D=5)
    expected = {"lr": 1}.get(name, 5 + (1 if m.uses_linear else 0))
    assert m.embedding_width == expected
    # models read looked-up rows only: the trainer's tables own every embedding
    assert not any(p.numel() >= 28 * expected and p.shape[0] == 28 for p in m.parameters())
    assert not hasattr(m, "embedding")
    assert m.uses_linear == (name in ("lr", "fm", "deepfm", "widedeep", "xdeepfm", "fibinet"))
    with pytest.raises(ValueError, match=rf"\[B, F, {expected}\]"):
        m(torch.zeros(2, 4, expected + 1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradient_reaches_only_looked_up_rows(name, gen, device):
    schema = make_schema(4, 0, rows_per_field=6)
    m = small_model(name, schema).eval()
    randomize_(m, gen)
    m.to(device)
    table = table_for(m, schema, gen).to(device)
    ids = sample_ids(schema, 5, gen).to(device)
    scale = torch.arange(1.0, 6.0, device=device)  # grad_output != 1
    out = m(table(ids)[0])
    assert out.shape == (5,) and torch.isfinite(out).all()
    (out * scale).sum().backward()
    g = table.tables[0].grad
    touched = torch.zeros(schema.table_rows, dtype=torch.bool, device=device)
    touched[ids.flatten()] = True
    assert (g[~touched] == 0).all()
    assert (g[touched].abs().sum(1) > 0).all()
    # The table's gradient is exactly the per-lookup gradient scattered back (duplicates summed).
    emb = table(ids)[0].detach().requires_grad_(True)
    (m(emb) * scale).sum().backward()
    scattered = torch.zeros_like(g).index_add_(0, ids.flatten(), emb.grad.reshape(-1, g.shape[1]))
    torch.testing.assert_close(g, scattered, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_reaches_the_logit(name, gen):
    """No dead branch: with positive parameters and inputs every ReLU is on, so every parameter
    (random draws could switch a whole ReLU gate off, e.g. FiBiNET's SENET) gets a gradient."""
    schema = make_schema(4, num_dense=2)
    m = small_model(name, schema).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.05)
    emb = (torch.rand(3, 4, m.embedding_width, generator=gen) + 0.1).requires_grad_(True)
    out = m(emb, torch.rand(3, 2, generator=gen) + 0.1)
    out.sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    assert (emb.grad.abs().sum(2) > 0).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_reads_strided_rows(name, gen):
    schema = make_schema(3, 0)
    m = small_model(name, schema).eval()
    randomize_(m, gen)
    ids = sample_ids(schema, 4, gen)
    W = m.embedding_width
    rows = table_for(m, schema, gen)(ids)[0].detach()
    ref = m(rows)
    # Rows sliced out of a wider multi-peer lookup, and a transposed layout: both non-contiguous.
    wide = torch.randn(4, 3, W + 5, generator=gen)
    wide[..., 2:2 + W] = rows
    sliced = wide[..., 2:2 + W]
    fields_first = rows.transpose(0, 1).contiguous().transpose(0, 1)
    assert not sliced.is_contiguous() and not fields_first.is_contiguous()
    torch.testing.assert_close(m(sliced), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(fields_first), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_features(name, gen):
    schema = make_schema(3, num_dense=2)
    m = small_model(name, schema).eval()
    randomize_(m, gen)
    ids = table_for(m, schema, gen)(sample_ids(schema, 4, gen))[0].detach()
    dense = torch.randn(4, 2, generator=gen)
    out = m(ids, dense)
    assert out.shape == (4,) and torch.isfinite(out).all()
    # Dense inputs move the logit, and only through dense paths: a different dense row changes it.
    moved = m(ids, dense + torch.tensor([1.0, -2.0]))
    assert (moved - out).abs().min() > 1e-6
    with pytest.raises(ValueError, match=r"dense \[B, 2\]"):
        m(ids)
    with pytest.raises(ValueError, match=r"got \(4, 3\)"):
        m(ids, torch.zeros(4, 3))
    # With no dense features in the schema the argument is ignored.
    m0 = small_model(name, make_schema(3, 0)).eval()
    torch.testing.assert_close(m0(ids), m0(ids, dense), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_mode_batch_and_dtype(name, gen, seed):
    # Dropout/BatchNorm in train mode: shapes, finiteness, and a float64 model stays float64.
    torch.manual_seed(seed)
    schema = make_schema(4, 1)
    m = small_model(name, schema).train().double()
    emb = torch.randn(6, 4, m.embedding_width, dtype=torch.float64, generator=gen)
    out = m(emb, torch.randn(6, 1, dtype=torch.float64, generator=gen))
    assert out.shape == (6,) and out.dtype == torch.float64 and torch.isfinite(out).all()


def test_parameter_counts_follow_the_architecture():
    # 3 fields x 10 rows, D = 4, no dense: x0 width 12.
    schema = make_schema(3, 0, rows_per_field=10)

    def n_params(m) -> int:
        return sum(p.numel() for p in m.parameters())

    mlp = (8, 6)
    mlp_params = (12 * 8 + 2 * 8) + (8 * 6 + 2 * 6)  # Linear (no bias before BN) + BN affine per layer
    # the tables (30 rows x embedding_width) are the trainer's: a model holds only its dense layers
    assert n_params(MODELS["lr"](schema)) == 1 and MODELS["lr"](schema).embedding_width == 1
    assert n_params(MODELS["fm"](schema, embedding_dim=4)) == 1 and MODELS["fm"](schema, 4).embedding_width == 5
    assert n_params(MODELS["deepfm"](schema, 4, mlp=mlp)) == 1 + mlp_params + 6 + 1
    assert n_params(MODELS["dcn"](schema, 4, layers=3, mlp=mlp)) == 3 * 2 * 12 + mlp_params + (12 + 6) + 1
    assert n_params(MODELS["dcnv2"](schema, 4, layers=2, mlp=mlp)) == 2 * (144 + 12) + mlp_params + 19
    assert n_params(MODELS["ipnn"](schema, 4, mlp=mlp)) == mlp_params + 3 * 8 + 6 + 1
    # CIN (3 -> 2 -> 2): Linear(9, 2), Linear(6, 2), fc Linear(4, 1).
    assert n_params(MODELS["xdeepfm"](schema, 4, cin=(2, 2), mlp=mlp)) == (20 + 14 + 5) + mlp_params + 7


def test_every_model_scores_an_empty_batch():
    """A data shard can hold no rows of a step (a tiny last batch, or a streamed evaluation shard
    past its end): every model must take part with an empty batch."""
    from mlfast.models import MODELS, FeatureSchema, parse_peers
    from mlfast.train.group import PeerGroup

    F = 5
    schema = FeatureSchema(field_offsets=tuple(range(0, 10 * (F + 1), 10)), num_dense=2)
    for name in MODELS:
        specs = parse_peers(name if name in ("lr", "fm") else f"{name}:mlp=8")
        group = PeerGroup.build(specs, schema, embedding_dim=4, seeds=[1], kind="fused", device="cpu").eval()
        with torch.no_grad():
            out = group(torch.zeros(0, F, dtype=torch.int64), torch.zeros(0, 2), ())
        assert tuple(out.shape) == (0, 1), name
