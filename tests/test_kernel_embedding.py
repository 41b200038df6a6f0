"""The fused interleaved lookups (mlfast.kernels.embedding_bag) against plain torch.

One-hot lookups are compared with ``F.embedding`` and bags with ``nn.EmbeddingBag``, each on the
peer's own columns of the table, in both layouts: packed (``col_offsets=None``) and aligned
(``peer_offsets(widths, 4)``, rows of ``row_width(widths, 4)`` columns). The pad columns of an
aligned table hold NaN: a kernel that read one into an output would fail every comparison. Runs on
CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU)
and on CUDA when present.
"""
from __future__ import annotations

import mmap
import os
import sys

import torch

if not torch.cuda.is_available():  # before triton is imported (conftest does it first in pytest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from conftest import assert_close  # noqa: E402

import mlfast.kernels.embedding_bag as eb  # noqa: E402
from mlfast.kernels.embedding_bag import (  # noqa: E402
    embedding_bag_forward, embedding_forward, peer_offsets, row_width)

WIDTH_SETS = [(17, 16), (16,), (17, 16, 5, 9), (3, 64, 1)]
LAYOUTS = ("packed", "aligned")


@pytest.fixture
def device(kernel_device) -> torch.device:
    return kernel_device


def layout_of(widths, layout: str) -> tuple[int, tuple[int, ...] | None]:
    """(row width, col_offsets argument) of ``layout``."""
    if layout == "packed":
        return row_width(widths), None
    return row_width(widths, 4), peer_offsets(widths, 4)


def pad_columns(widths, offsets, wtot: int) -> torch.Tensor:
    """[wtot] bool: the columns that belong to no peer."""
    pad = torch.ones(wtot, dtype=torch.bool)
    for o, w in zip(offsets, widths):
        pad[o:o + w] = False
    return pad


def make_table(gen, V: int, widths, layout: str, pad_value: float = float("nan")):
    """(weight [V, Wtot] on the CPU, col_offsets argument, offsets): random peers' columns, pads =
    ``pad_value``."""
    wtot, col_offsets = layout_of(widths, layout)
    offs = col_offsets or peer_offsets(widths)
    w = torch.randn(V, wtot, generator=gen)
    w[:, pad_columns(widths, offs, wtot)] = pad_value
    return w, col_offsets, offs


def split(weight, widths, offsets):
    """Each peer's own table: the column slices."""
    return [weight[:, o:o + w] for o, w in zip(offsets, widths)]


def _ids(gen, shape, V, dtype=torch.int64):
    """Random ids with repeats, the last row of the table, and row 0."""
    ids = torch.randint(0, V, shape, generator=gen)
    flat = ids.view(-1)
    flat[0] = V - 1
    if flat.numel() > 2:
        flat[1] = V - 1
        flat[-1] = 0
    return ids.to(dtype)


# ---------------------------------------------------------------------------------------------
# Layout helpers

def test_peer_offsets_and_row_width():
    assert peer_offsets((17, 16)) == (0, 17) and row_width((17, 16)) == 33
    assert peer_offsets((17, 16), 4) == (0, 20) and row_width((17, 16), 4) == 36
    assert peer_offsets((17, 16, 5, 9), 4) == (0, 20, 36, 44) and row_width((17, 16, 5, 9), 4) == 56
    assert peer_offsets((3, 64, 1), 8) == (0, 8, 72) and row_width((3, 64, 1), 8) == 80
    assert row_width((16,), 4) == 16
    for ws in WIDTH_SETS:  # every aligned peer segment and row starts on a 16-byte boundary
        assert row_width(ws, 4) % 4 == 0 and all(o % 4 == 0 for o in peer_offsets(ws, 4))
        assert peer_offsets(ws, 1) == peer_offsets(ws) and row_width(ws, 1) == sum(ws)
    with pytest.raises(ValueError, match="power of two"):
        peer_offsets((17, 16), 3)


def test_kernels_import_nothing_from_mlfast():
    """kernels/ sits below mlfast: its launchers take plain tensors and scalars."""
    import ast
    import pathlib

    for path in pathlib.Path(eb.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(n == "mlfast" or n.startswith("mlfast.") for n in names), (path.name, names)


# ---------------------------------------------------------------------------------------------
# One-hot forward

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("widths", WIDTH_SETS)
@pytest.mark.parametrize("B,F_,ids_dtype", [(1, 1, torch.int64), (7, 39, torch.int32), (41, 3, torch.int64)])
def test_forward_matches_per_peer_embedding(device, gen, layout, widths, B, F_, ids_dtype):
    V = 257
    weight, col_offsets, offs = make_table(gen, V, widths, layout)
    ids = _ids(gen, (B, F_), V, ids_dtype)
    outs = embedding_forward(weight.to(device), ids.to(device), widths, col_offsets)
    assert len(outs) == len(widths)
    for out, table, w in zip(outs, split(weight, widths, offs), widths):
        assert out.shape == (B, F_, w) and out.is_contiguous() and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), F.embedding(ids.long(), table), rtol=0, atol=0)  # a copy: exact


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_bf16_output_and_int32_ids(device, gen, layout):
    widths, V = (17, 16), 300
    weight, col_offsets, offs = make_table(gen, V, widths, layout)
    ids = _ids(gen, (13, 39), V)
    outs = embedding_forward(weight.to(device), ids.int().to(device), widths, col_offsets, out_dtype=torch.bfloat16)
    for out, table in zip(outs, split(weight, widths, offs)):
        assert out.dtype == torch.bfloat16
        assert_close(out, F.embedding(ids, table))


def test_forward_reads_the_ids_in_place(device, gen, monkeypatch):
    """int32 and int64 ids reach the kernel as they are: no host-side conversion or copy."""
    seen = []
    kernel = eb._embedding_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(args[1])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(eb, "_embedding_fwd_kernel", Spy())
    weight, col_offsets, _ = make_table(gen, 50, (17, 16), "aligned")
    weight = weight.to(device)
    for dtype in (torch.int32, torch.int64):
        ids = _ids(gen, (6, 5), 50, dtype).to(device)
        embedding_forward(weight, ids, (17, 16), col_offsets)
        assert seen[-1].dtype == dtype and seen[-1].data_ptr() == ids.data_ptr()


def test_forward_empty_batch(device):
    outs = embedding_forward(torch.zeros(5, 36, device=device), torch.zeros(0, 39, dtype=torch.long, device=device),
                             (17, 16), (0, 20))
    assert [tuple(o.shape) for o in outs] == [(0, 39, 17), (0, 39, 16)]


def test_forward_rejects_bad_layouts(device):
    w = torch.zeros(5, 33, device=device)
    ids = torch.zeros(2, 3, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="add up to 32"):
        embedding_forward(w, ids, (16, 16))
    with pytest.raises(ValueError, match="contiguous"):
        embedding_forward(w.t(), ids, (3, 2))
    with pytest.raises(ValueError, match="int64 or int32"):
        embedding_forward(w, ids.float(), (17, 16))
    with pytest.raises(ValueError, match="overlaps"):
        embedding_forward(w, ids, (17, 16), (0, 16))  # peer 1 starts inside peer 0
    with pytest.raises(ValueError, match="passes the row"):
        embedding_forward(w, ids, (17, 16), (0, 20))  # 20 + 16 > 33 columns
    with pytest.raises(ValueError, match="2 col_offsets for 1 peers"):
        embedding_forward(w, ids, (17,), (0, 20))
    with pytest.raises(TypeError, match="by keyword"):  # the old positional out_dtype
        embedding_forward(w, ids, (17, 16), torch.bfloat16)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_forward_bounds_check(device, gen, ids_dtype):
    """Checked mode: out-of-range ids read nothing (ids far outside any mapping would crash the
    process or fault the GPU otherwise) and the first offending position is named; valid ids give
    the unchecked result."""
    widths, V = (17, 16), 40
    weight, col_offsets, _ = make_table(gen, V, widths, "aligned")
    weight = weight.to(device)
    ids = _ids(gen, (6, 7), V, ids_dtype)
    checked = embedding_forward(weight, ids.to(device), widths, col_offsets, bounds_check=True)
    for a, b in zip(checked, embedding_forward(weight, ids.to(device), widths, col_offsets)):
        assert torch.equal(a, b)
    far = -2**31 if ids_dtype == torch.int32 else 2**40
    for bad, value in (((2, 3), V), ((4, 0), -1), ((1, 6), far)):
        wrong = ids.clone()
        wrong[bad] = value
        wrong[5, 5] = V + 7  # a later offender: not the one reported
        msg = rf"ids\[{bad[0]}, {bad[1]}\] = {value} is out of range.*\[0, {V}\).*position {bad[0] * 7 + bad[1]}\b"
        with pytest.raises(IndexError, match=msg):
            embedding_forward(weight, wrong.to(device), widths, col_offsets, bounds_check=True)


# ---------------------------------------------------------------------------------------------
# Multi-hot bags

def _bags(gen, n_bags, V, max_len, dtype=torch.int64):
    """Random bag sizes in [0, max_len] (empty bags first, last and in the middle)."""
    sizes = torch.randint(0, max_len + 1, (n_bags,), generator=gen)
    sizes[0] = 0
    sizes[-1] = 0
    if n_bags > 3:
        sizes[n_bags // 2] = 0
        sizes[1] = max_len
    offsets = torch.zeros(n_bags + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(sizes, 0)
    indices = _ids(gen, (int(offsets[-1]),), V)
    return indices.to(dtype), offsets.to(dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("widths,index_dtype", [((17, 16), torch.int32), ((3, 64, 1), torch.int64)])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_bag_forward_matches_embedding_bag(device, gen, layout, widths, index_dtype, mode, weighted):
    V, n_bags = 211, 11
    weight, col_offsets, offs = make_table(gen, V, widths, layout)
    indices, offsets = _bags(gen, n_bags, V, max_len=37, dtype=index_dtype)  # 37 > BAG_CHUNK: several chunks
    psw = torch.rand(indices.numel(), generator=gen) * 2 - 0.5 if weighted else None
    outs = embedding_bag_forward(weight.to(device), indices.to(device), offsets.to(device), widths, col_offsets,
                                 per_sample_weights=None if psw is None else psw.to(device), mode=mode)
    for out, table, w in zip(outs, split(weight, widths, offs), widths):
        bag = torch.nn.EmbeddingBag.from_pretrained(table.contiguous(), mode=mode, include_last_offset=True)
        ref = bag(indices.long(), offsets.long(), per_sample_weights=psw)
        assert out.shape == (n_bags, w)
        assert_close(out, ref)
        assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[-1]) == 0  # empty bags


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bag_forward_bf16_and_all_empty(device, gen, layout):
    widths = (17, 16)
    weight, col_offsets, offs = make_table(gen, 50, widths, layout)
    indices, offsets = _bags(gen, 9, 50, max_len=5)
    a, b = embedding_bag_forward(weight.to(device), indices.to(device), offsets.to(device), widths, col_offsets,
                                 out_dtype=torch.bfloat16)
    packed = torch.cat(split(weight, widths, offs), 1)
    ref = torch.nn.EmbeddingBag.from_pretrained(packed, mode="sum", include_last_offset=True)(indices, offsets)
    assert a.dtype == torch.bfloat16
    assert_close(torch.cat([a, b], 1), ref)
    empty = embedding_bag_forward(weight.to(device), torch.zeros(0, dtype=torch.long, device=device),
                                  torch.zeros(4, dtype=torch.long, device=device), widths, col_offsets, mode="mean")
    assert all(torch.count_nonzero(e) == 0 and e.shape[0] == 3 for e in empty)


def test_bag_forward_rejects_weights_with_mean_and_tensor_offsets(device):
    w = torch.zeros(5, 33, device=device)
    idx, off = torch.zeros(3, dtype=torch.long, device=device), torch.tensor([0, 3], device=device)
    with pytest.raises(ValueError, match="mode='sum'"):
        embedding_bag_forward(w, idx, off, (17, 16), per_sample_weights=torch.ones(3, device=device), mode="mean")
    with pytest.raises(TypeError, match="by keyword"):  # the old positional per_sample_weights
        embedding_bag_forward(w, idx, off, (17, 16), torch.ones(3, device=device))


def test_bag_forward_bounds_check(device, gen):
    widths, V = (17, 16), 30
    weight, col_offsets, _ = make_table(gen, V, widths, "aligned")
    weight = weight.to(device)
    indices, offsets = _bags(gen, 8, V, max_len=6, dtype=torch.int32)
    nnz = indices.numel()
    ok = embedding_bag_forward(weight, indices.to(device), offsets.to(device), widths, col_offsets, mode="mean",
                               bounds_check=True)
    for a, b in zip(ok, embedding_bag_forward(weight, indices.to(device), offsets.to(device), widths, col_offsets,
                                              mode="mean")):
        assert torch.equal(a, b)
    bad = indices.clone()
    bad[3], bad[nnz - 1] = V, -2**31
    with pytest.raises(IndexError, match=rf"indices\[3\] = {V} is out of range"):
        embedding_bag_forward(weight, bad.to(device), offsets.to(device), widths, col_offsets, bounds_check=True)
    for j, value in ((2, nnz + 5), (4, -1)):  # past nnz; below the previous offset
        off = offsets.clone()
        off[j] = value
        with pytest.raises(IndexError, match=rf"offsets\[{j - 1}:{j + 1}\] = .* is not a bag"):
            embedding_bag_forward(weight, indices.to(device), off.to(device), widths, col_offsets, bounds_check=True)


# ---------------------------------------------------------------------------------------------
# Index arithmetic past 2^31
#
# A table whose element offsets pass 2^31 needs > 8 GiB. On the CPU the table is an anonymous
# MAP_NORESERVE mapping: the kernel sees a real [V, Wtot] tensor, but only the pages of the rows
# written below ever get memory (the rest read as zeros), so the test costs a few MiB. Rows are
# taken on both sides of row * Wtot = 2^31 and 2^32 and at the table end: with 32-bit offsets
# they would wrap to other rows or into an unused guard region and the comparison would fail. On CUDA
# the table is allocated for real when the GPU has room.

def huge_table(rows: int, width: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A [rows, width] tensor whose untouched parts cost no memory (CPU) or a real one (CUDA)."""
    nbytes = rows * width * torch.empty(0, dtype=dtype).element_size()
    if device.type == "cuda":
        if torch.cuda.mem_get_info(device)[0] < nbytes + (2 << 30):
            pytest.skip(f"needs {(nbytes >> 30) + 2} GiB of free GPU memory per table")
        return torch.empty(rows, width, dtype=dtype, device=device)
    if not hasattr(mmap, "MAP_ANONYMOUS"):
        pytest.skip("needs anonymous mmap")
    # MAP_NORESERVE (Python exposes it from 3.13; 0x4000 on Linux): no swap is reserved, so the
    # mapping may exceed the machine's memory
    noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve
    # 8 GiB of unused mapping in front: an offset that wrapped to a negative int32 reads zeros
    # there and fails the comparison, instead of crashing the test process.
    guard = 2**31 * 4
    buf = mmap.mmap(-1, guard + nbytes, flags=flags)
    return torch.frombuffer(buf, dtype=dtype, offset=guard).view(rows, width)


def rows_past_2_31(width: int) -> tuple[int, torch.Tensor]:
    """(table rows, interesting row ids) for a table of ``width`` columns: every id fits int32."""
    b31, b32 = 2**31 // width, 2**32 // width
    V = b32 + 50
    rows = torch.cat([torch.arange(b31 - 3, b31 + 4), torch.arange(b32 - 3, b32 + 4), torch.tensor([V - 1])])
    return V, rows


@pytest.mark.parametrize("layout,ids_dtype", [("packed", torch.int64), ("aligned", torch.int32)])
def test_forward_index_arithmetic_past_2_31(device, gen, layout, ids_dtype):
    widths = (17, 16)
    wtot, col_offsets = layout_of(widths, layout)
    offs = col_offsets or peer_offsets(widths)
    V, rows = rows_past_2_31(wtot)
    weight = huge_table(V, wtot, device)
    vals = torch.randn(rows.numel(), wtot, generator=gen).to(device)
    weight[rows.to(device)] = vals
    assert (V - 1) * wtot > 2**32 and V < 2**31
    perm = torch.randperm(rows.numel(), generator=gen)
    ids = rows[perm].repeat(4).view(4, -1).to(ids_dtype).to(device)
    a, b = embedding_forward(weight, ids, widths, col_offsets)
    expect = vals[perm.to(device)].repeat(4, 1).view(4, -1, wtot)
    assert torch.equal(a, expect[..., offs[0]:offs[0] + 17]) and torch.equal(b, expect[..., offs[1]:offs[1] + 16])
    idx = ids.reshape(-1)
    off = torch.arange(0, idx.numel() + 1, 2, device=device).to(ids_dtype)
    pooled = embedding_bag_forward(weight, idx, off, widths, col_offsets)
    ref = expect.reshape(-1, 2, wtot).sum(1)
    assert_close(torch.cat(pooled, 1), torch.cat(split(ref, widths, offs), 1))
