"""Export a finished run for serving: one file (ONNX or TorchScript) that maps the arrays the reader
produces to click probabilities, loadable without mlfast, plus a JSON sidecar saying what to feed.

The exported module (`ServingModel`) holds the selected peers' table columns, fully materialised,
as one packed buffer [V, sum W_p] and the selected peer models, and computes exactly what
``Predictor.predict`` computes:

    inputs   sparse [B, F] int64 global row ids (``CTRData.sparse``)
             dense  [B, num_dense] float32          (only when the run trained on dense features)
             bag<s>_offsets [B + 1] int64, bag<s>_values [nnz_s] int64   (per multi-hot field s)
    rows     e_p[b, f]     = table_p[sparse[b, f]]
             e_p[b, F + s] = mean_{i in bag s of row b} table_p[values_s[i]]     (an empty bag: 0)
    output   one peer: sigmoid(peer(e_p, dense)) [B]; "ensemble": the mean of the peers'
             probabilities [B]; "all": [B, P + 1], the peers' then the ensemble's

The mean pooling is written with ops both exporters translate (scatter-add and cumsum instead of
``repeat_interleave`` / ``index_add``), in the reference's order: each member's row is scaled by
1 / |bag| and the scaled rows are summed in member order, as ``mlfast.ops.embedding`` does.

`export_run` loads the run, writes the file and its sidecar (``<out>.json``), and, unless
``verify=False``, runs the written file (onnxruntime / ``torch.jit.load``) on a few hundred rows of
random valid ids (or of a given file) and fails with `ExportMismatch` if any probability differs
from ``Predictor.predict`` by more than ``TOLERANCE``.

Example (from the repository root)::

    from mlfast.export import export_run
    report = export_run("runs/head10k", "serving/model.onnx", format="onnx", peer="ensemble")
    report.max_abs_diff            # <= 1e-5, against Predictor.predict on the same rows

and, in serving code without mlfast::

    import onnxruntime as ort
    sess = ort.InferenceSession("serving/model.onnx")
    p = sess.run(None, {"sparse": ids, "dense": dense})[0]      # [B] probabilities
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

EXPORT_FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-5  # largest |exported - Predictor.predict| accepted, on probabilities
VERIFY_ROWS = 256
ONNX_OPSET = 18  # ScatterElements with reduction="add" needs 16; 18 is what onnxruntime >= 1.14 runs
SIDECAR_VERSION = 1
# ONNX files are protobufs, at most 2 GiB: past this many bytes of weights the dynamo exporter puts
# them in ``<out>.data``, and the TorchScript-based one is refused (it would scatter them over files
# named after its tensors).
EXTERNAL_DATA_BYTES = 1 << 30


class ExportMismatch(RuntimeError):
    """The exported file's probabilities differ from ``Predictor.predict`` beyond the tolerance."""


# ------------------------------------------------------------------------------------ the module
def pool_bags(table: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean of ``table``'s rows over each bag: [B, W] for ``offsets`` [B+1] and ``values`` [nnz].

    The bag of member i is the number of bag starts ``offsets[1:B]`` at or before i (a scatter-add
    of ones, then a cumsum): exportable, and right for empty bags (they add no member and pool to 0).
    """
    nnz = values.shape[0]
    starts = offsets[1:-1]
    marks = torch.zeros(nnz + 1, dtype=torch.int64).scatter_add(0, starts, torch.ones_like(starts))
    bag_of = marks.cumsum(0)[:nnz]
    counts = offsets[1:] - offsets[:-1]
    scale = (1.0 / counts.clamp(min=1).float()).index_select(0, bag_of)
    members = table.index_select(0, values) * scale[:, None]
    pooled = torch.zeros(counts.shape[0], table.shape[1], dtype=table.dtype)
    return pooled.scatter_add(0, bag_of[:, None].expand(-1, table.shape[1]), members)


class ServingModel(nn.Module):
    """The selected peers and their table columns, from the reader's arrays to probabilities.

    ``forward(sparse, [dense], [bag0_offsets, bag0_values, ...])``: the inputs `input_names` lists,
    in that order (dense only when ``num_dense > 0``; two per bag field).

    Example::

        >>> from mlfast.models import FeatureSchema, parse_peers
        >>> from mlfast.train.group import PeerGroup
        >>> g = PeerGroup.build(parse_peers("deepfm:mlp=8,dcn:mlp=8"), FeatureSchema((0, 10, 25)), embedding_dim=4,
        ...                     seeds=[1, 2]).eval()
        >>> m = ServingModel.from_group(g, "all")
        >>> m(torch.tensor([[1, 12], [0, 24]])).shape       # 2 peers + the ensemble
        torch.Size([2, 3])
    """

    def __init__(self, table: torch.Tensor, widths: Sequence[int], models: Sequence[nn.Module], *, num_onehot: int,
                 num_bags: int, num_dense: int, output: str):
        super().__init__()
        if output not in ("peer", "ensemble", "all"):
            raise ValueError(f"output must be 'peer', 'ensemble' or 'all', got {output!r}")
        if output == "peer" and len(models) != 1:
            raise ValueError(f"output='peer' needs exactly one model, got {len(models)}")
        if table.shape[1] != sum(widths):
            raise ValueError(f"a table of {table.shape[1]} columns for peers of widths {list(widths)}")
        self.register_buffer("table", table.contiguous())
        self.widths = tuple(int(w) for w in widths)
        self.col_offsets = tuple(int(x) for x in np.cumsum((0,) + self.widths[:-1]))
        self.peers = nn.ModuleList(models)
        self.num_onehot = int(num_onehot)
        self.num_bags = int(num_bags)
        self.num_dense = int(num_dense)
        self.output = output

    @classmethod
    def from_group(cls, group, output: str = "ensemble", peers: Sequence[int] | None = None) -> "ServingModel":
        """The peers ``peers`` (indices; default all) of a ``PeerGroup``: CPU copies of their models
        in eval mode and of their table columns, every row materialised (a lazy CPU table
        initialises the rows no lookup reached yet, which leaves its values as they were)."""
        idx = list(range(group.num_peers)) if peers is None else [int(p) for p in peers]
        tables = group.tables
        widths = [tables.widths[p] for p in idx]
        table = torch.empty(tables.num_rows, sum(widths), dtype=torch.float32)
        with torch.no_grad():
            col = 0
            for p, w in zip(idx, widths):
                table[:, col:col + w] = _peer_table(tables, p)
                col += w
        models = [copy.deepcopy(group.peers[p]).to("cpu").eval() for p in idx]
        schema = group.schema
        return cls(table, widths, models, num_onehot=schema.num_onehot, num_bags=schema.num_bags,
                   num_dense=schema.num_dense, output=output).eval()

    @property
    def input_names(self) -> list[str]:
        names = ["sparse"] + (["dense"] if self.num_dense else [])
        for s in range(self.num_bags):
            names += [f"bag{s}_offsets", f"bag{s}_values"]
        return names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        sparse = inputs[0]
        dense = inputs[1] if self.num_dense else None
        k = 2 if self.num_dense else 1
        rows = self.table.index_select(0, sparse.reshape(-1)).view(sparse.shape[0], self.num_onehot, -1)
        if self.num_bags:
            pooled = [pool_bags(self.table, inputs[k + 2 * s], inputs[k + 2 * s + 1]) for s in range(self.num_bags)]
            rows = torch.cat([rows, torch.stack(pooled, 1)], 1)
        probs = []
        for m, c, w in zip(self.peers, self.col_offsets, self.widths):
            probs.append(torch.sigmoid(m(rows[..., c:c + w].contiguous(), dense).float()))
        if self.output == "peer":
            return probs[0]
        p = torch.stack(probs, 1)
        mean = p.mean(1)
        return mean if self.output == "ensemble" else torch.cat([p, mean[:, None]], 1)


def _peer_table(tables, p: int) -> torch.Tensor:
    """Peer ``p``'s whole table [V, W_p], every row initialised (a view where it can be: the table
    may be most of the memory): ``PeerTables`` (fused engine) or ``DenseTables`` (plain reference)."""
    if hasattr(tables, "materialize"):
        tables.materialize(torch.arange(tables.num_rows))  # a lazy CPU table: rows no lookup reached yet
        return tables.weight[:, tables.layout.columns(p)]
    return tables.tables[p].detach()


# ------------------------------------------------------------------------------------- selection
def select_peers(labels: Sequence[str], peer: str) -> tuple[list[int], str]:
    """(peer indices, output kind) for ``peer``: "ensemble", "all" or one of ``labels``."""
    labels = list(labels)
    if peer == "ensemble":
        return list(range(len(labels))), "ensemble"
    if peer == "all":
        return list(range(len(labels))), "all"
    if peer in labels:
        return [labels.index(peer)], "peer"
    raise ValueError(f"peer {peer!r} is not in this run: choose ensemble, all or one of {', '.join(labels)}")


def output_columns(labels: Sequence[str], peer: str) -> list[str]:
    """What the output's columns are (one name for a [B] output)."""
    idx, kind = select_peers(labels, peer)
    if kind == "all":
        return list(labels) + ["ensemble"]
    return ["ensemble"] if kind == "ensemble" else [labels[idx[0]]]


# ------------------------------------------------------------------------------------------ inputs
def random_inputs(schema, num_rows: int, seed: int = 0, empty_bags: bool = True) -> dict[str, np.ndarray]:
    """Valid inputs of ``num_rows`` rows for a model of ``schema``: each field's ids drawn from its own
    rows (the missing row included), dense values as the reader's log transform gives, bags of
    0..6 members (empty ones only with ``empty_bags``; the reader never makes them)."""
    rng = np.random.default_rng(seed)
    offs = np.asarray(schema.field_offsets, np.int64)
    F = schema.num_onehot
    lo, hi = offs[:F], offs[1:F + 1]
    out: dict[str, np.ndarray] = {
        "sparse": (lo + (rng.random((num_rows, F)) * (hi - lo)).astype(np.int64)).astype(np.int64)}
    if schema.num_dense:
        dense = rng.normal(1.0, 2.0, (num_rows, schema.num_dense)).astype(np.float32)
        dense[rng.random(dense.shape) < 0.2] = 0.0
        out["dense"] = dense
    for s in range(schema.num_bags):
        blo, bhi = offs[F + s], offs[F + s + 1]
        lengths = rng.integers(0 if empty_bags else 1, 7, num_rows)
        offsets = np.zeros(num_rows + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        out[f"bag{s}_offsets"] = offsets
        out[f"bag{s}_values"] = rng.integers(blo, bhi, int(offsets[-1])).astype(np.int64)
    return out


def data_inputs(data, schema, rows: int | None = None) -> dict[str, np.ndarray]:
    """The inputs for (the first ``rows`` rows of) a ``CTRData``, named as `ServingModel.input_names`."""
    if rows is not None and rows < len(data):
        data = data.take(slice(0, rows))
    out = {"sparse": np.ascontiguousarray(data.sparse, np.int64)}
    if schema.num_dense:
        out["dense"] = np.ascontiguousarray(data.dense, np.float32)
    for s, b in enumerate(data.bags):
        out[f"bag{s}_offsets"] = np.ascontiguousarray(b.offsets, np.int64)
        out[f"bag{s}_values"] = np.ascontiguousarray(b.values, np.int64)
    return out


def inputs_to_data(inputs: dict[str, np.ndarray], schema):
    """A ``CTRData`` (no labels) holding ``inputs``, for ``Predictor.predict``."""
    from mlfast.io.data import BagField, CTRData

    sparse = inputs["sparse"]
    n = sparse.shape[0]
    dense = inputs.get("dense", np.zeros((n, 0), np.float32))
    return CTRData(labels=None, dense=dense, dense_missing=np.zeros(dense.shape, bool), sparse=sparse,
                   field_offsets=np.asarray(schema.field_offsets, np.int64), field_names=list(schema.field_names),
                   bags=[BagField(inputs[f"bag{s}_offsets"], inputs[f"bag{s}_values"])
                         for s in range(schema.num_bags)])


def expected_output(predictor, inputs: dict[str, np.ndarray], peer: str) -> np.ndarray:
    """What the exported file must return for ``inputs``: ``Predictor.predict``'s columns."""
    preds = predictor.predict(inputs_to_data(inputs, predictor.schema))
    cols = output_columns(predictor.labels, peer)
    return np.stack([preds[c] for c in cols], 1) if peer == "all" else preds[cols[0]]


# ---------------------------------------------------------------------------------------- writing
def _example(model: ServingModel, schema) -> tuple[torch.Tensor, ...]:
    # Three rows: the check afterwards runs other batch sizes, so a size baked into the file would show.
    ex = random_inputs(schema, 3, seed=1, empty_bags=False)
    return tuple(torch.from_numpy(ex[n]) for n in model.input_names)


def _dynamic_axes(model: ServingModel) -> dict[str, dict[int, str]]:
    axes = {"sparse": {0: "batch"}, "probability": {0: "batch"}}
    if model.num_dense:
        axes["dense"] = {0: "batch"}
    for s in range(model.num_bags):
        axes[f"bag{s}_offsets"] = {0: "batch_plus_1"}
        axes[f"bag{s}_values"] = {0: f"nnz{s}"}
    return axes


def _need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"{what} needs the {module!r} package ({e}): pip install 'mlfast[export]' "
                           f"(onnx, onnxruntime)") from None


def _dynamic_shapes(model: ServingModel) -> tuple:
    batch = torch.export.Dim("batch", min=1)
    shapes: list[dict] = [{0: batch}] + ([{0: batch}] if model.num_dense else [])
    for s in range(model.num_bags):
        shapes += [{0: batch + 1}, {0: torch.export.Dim(f"nnz{s}", min=0)}]
    return (tuple(shapes),)  # forward(*inputs): one argument, the tuple


def write_onnx(model: ServingModel, schema, path: Path, opset: int = ONNX_OPSET, dynamo: bool = False) -> list[Path]:
    """Write ``model`` as ONNX; returns the files written (the model, and its external weights
    where the table is too large for one protobuf).

    ``dynamo=False``: the TorchScript-based exporter (needs ``onnx``; deprecated by PyTorch, but
    quick and self-contained). ``dynamo=True``: the ``torch.export``-based one (needs ``onnx`` and
    ``onnxscript``; its weights go to ``<out>.data`` when the table passes 1 GiB)."""
    _need("onnx", "ONNX export")
    weights = sum(t.nbytes for t in model.state_dict().values())
    if dynamo:
        _need("onnxscript", "ONNX export with dynamo=True")
    elif weights >= EXTERNAL_DATA_BYTES:
        raise ValueError(f"the exported weights take {weights / 2**30:.2f} GiB, too many for one ONNX file: export with "
                         f"dynamo=True (mlfast export --dynamo), which writes them to {path.name}.data")
    example = _example(model, schema)
    names = dict(input_names=model.input_names, output_names=["probability"], opset_version=opset)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes
        if dynamo:
            torch.onnx.export(model, example, str(path), dynamo=True, dynamic_shapes=_dynamic_shapes(model),
                              external_data=weights >= EXTERNAL_DATA_BYTES, verbose=False, **names)
        else:
            torch.onnx.export(model, example, str(path), dynamo=False, dynamic_axes=_dynamic_axes(model), **names)
    return [path] + _external_files(path)


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter's progress lines (stdout) and notes ("torchvision is not installed") off."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def _external_files(path: Path) -> list[Path]:
    """The files an ONNX model keeps its weights in besides itself."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return [path.parent / n for n in sorted(names)]


def write_torchscript(model: ServingModel, schema, path: Path) -> list[Path]:
    """Write ``model`` as a traced TorchScript archive (``torch.jit.load`` reads it without mlfast)."""
    example = _example(model, schema)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
    return [path]


def run_exported(path: str | Path, format: str, inputs: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """Run a written file on ``inputs`` the way serving code would (onnxruntime on the CPU, or
    ``torch.jit.load``)."""
    if format == "onnx":
        ort = _need("onnxruntime", "Running an ONNX export")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {n: inputs[n] for n in names})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's, from torch 2.10 on
        m = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return m(*(torch.from_numpy(inputs[n]) for n in names)).numpy()


# ----------------------------------------------------------------------------------------- sidecar
def _dense_names(reader: dict[str, Any], num_dense: int) -> list[str]:
    from mlfast.io.reader import CRITEO_INT_NAMES

    if not num_dense:
        return []
    if reader.get("schema") is not None:
        return [str(c) for c in reader["schema"].get("numeric", [])]
    return list(CRITEO_INT_NAMES)[:num_dense]


def sidecar(model: ServingModel, predictor, peer: str, format: str, files: Sequence[Path], exporter: str,
            verified: dict[str, Any] | None) -> dict[str, Any]:
    """What serving code needs to know: inputs (names, dtypes, shapes, which field each id column
    is and its rows), the output, the peers and the run's reader configuration."""
    schema = predictor.schema
    offs = list(schema.field_offsets)
    F = schema.num_onehot

    def field(f: int) -> dict[str, Any]:
        d = {"name": schema.field_names[f], "first_row": offs[f], "end_row": offs[f + 1], "missing_row": offs[f]}
        if predictor.vocab is not None:  # vocabulary mode: the field's last row is out-of-vocabulary
            d["oov_row"] = offs[f + 1] - 1
        return d

    inputs: list[dict[str, Any]] = [{
        "name": "sparse", "dtype": "int64", "shape": ["batch", F],
        "description": "global row ids, one column per one-hot field: column f holds ids in "
                       "[first_row, end_row) of field f (first_row = the field's missing value)",
        "fields": [dict(field(f), column=f) for f in range(F)]}]
    if schema.num_dense:
        inputs.append({"name": "dense", "dtype": "float32", "shape": ["batch", schema.num_dense],
                       "description": "numeric columns after the reader's transform (CTRData.dense; missing = 0)",
                       "columns": _dense_names(predictor.reader, schema.num_dense)})
    for s in range(schema.num_bags):
        f = F + s
        inputs.append({"name": f"bag{s}_offsets", "dtype": "int64", "shape": ["batch + 1"],
                       "description": f"CSR offsets of multi-hot field {schema.field_names[f]!r}: row b's values are "
                                      f"bag{s}_values[offsets[b]:offsets[b+1]] (offsets[0] = 0, non-decreasing)",
                       "field": field(f)})
        inputs.append({"name": f"bag{s}_values", "dtype": "int64", "shape": [f"nnz{s}"],
                       "description": f"global row ids of field {schema.field_names[f]!r}'s values, mean-pooled "
                                      f"per row (an empty bag pools to zeros)", "field": field(f)})
    cols = output_columns(predictor.labels, peer)
    out_shape = ["batch", len(cols)] if peer == "all" else ["batch"]
    idx, _ = select_peers(predictor.labels, peer)
    reader = dict(predictor.reader)
    import mlfast

    return {
        "sidecar_version": SIDECAR_VERSION,
        "format": format,
        "files": [p.name for p in files],
        "exporter": exporter,
        "exported_by": {"mlfast": mlfast.__version__, "torch": torch.__version__},
        "peer": peer,
        "peers": [{"label": predictor.labels[i], **predictor.specs[i].to_dict(),
                   "embedding_width": int(model.widths[k])} for k, i in enumerate(idx)],
        "inputs": inputs,
        "outputs": [{"name": "probability", "dtype": "float32", "shape": out_shape, "columns": cols,
                     "description": "click probability (sigmoid of the logit)" + (
                         "; the ensemble is the mean of the peers' probabilities" if "ensemble" in cols else "")}],
        "table_rows": schema.table_rows,
        "field_names": list(schema.field_names),
        "field_offsets": offs,
        "ids": "vocabulary" if predictor.vocab is not None else "hashing",
        "reader": reader,
        "featurize": "mlfast.Featurizer.from_run(<run>) turns raw lines or dicts into these inputs with the "
                     "run's exact reader configuration" + (" and vocabulary" if predictor.vocab is not None else ""),
        "verified": verified,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


# ------------------------------------------------------------------------------------------ export
@dataclass
class ExportReport:
    """What `export_run` wrote and how it checked it."""

    path: Path
    sidecar_path: Path
    format: str
    peer: str
    files: list[Path] = field(default_factory=list)
    verified_rows: int = 0
    max_abs_diff: float | None = None  # None: not verified


def export_predictor(predictor, out_path: str | Path, format: str = "onnx", peer: str = "ensemble", *,
                     verify: bool = True, verify_rows: int = VERIFY_ROWS, verify_data=None, seed: int = 0,
                     opset: int = ONNX_OPSET, dynamo: bool = False, run_dir: str | Path | None = None
                     ) -> ExportReport:
    """`export_run` for a loaded ``Predictor`` (e.g. ``fit(...).predictor``)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    if verify_rows < 1:
        raise ValueError(f"verify_rows={verify_rows}: expected >= 1")
    idx, kind = select_peers(predictor.labels, peer)
    out = Path(out_path)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory: give the file to write, e.g. {out / 'model.onnx'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = ServingModel.from_group(predictor.group, kind, idx)
    # Written and checked in a scratch folder next to the target, then moved: a file that failed its
    # check never replaces a good one (external weight files keep their names, which the model cites).
    with tempfile.TemporaryDirectory(prefix=".mlfast-export-", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        files = write_onnx(model, predictor.schema, staged, opset, dynamo) if format == "onnx" else \
            write_torchscript(model, predictor.schema, staged)
        verified = diff = None
        rows = 0
        if verify:
            diff, rows, where = _verify(predictor, staged, format, model.input_names, peer, verify_rows, verify_data,
                                        seed)
            verified = {"against": "Predictor.predict", "rows": rows, "inputs": where, "max_abs_diff": diff,
                        "tolerance": TOLERANCE, "runtime": _runtime_name(format)}
        exporter = (f"torch.onnx.export(dynamo={dynamo}, opset_version={opset})" if format == "onnx"
                    else "torch.jit.trace + torch.jit.save")
        info = sidecar(model, predictor, peer, format, files, exporter, verified)
        if run_dir is not None:
            info["run"] = str(Path(run_dir).resolve())
        side = Path(str(staged) + ".json")
        side.write_text(json.dumps(_jsonable(info), indent=1) + "\n")
        final = []
        for f in files + [side]:
            os.replace(f, out.parent / f.name)
            final.append(out.parent / f.name)
    return ExportReport(out, final[-1], format, peer, final[:-1], rows, diff)


def _runtime_name(format: str) -> str:
    if format == "onnx":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"
    return f"torch.jit.load (torch {torch.__version__})"


def _verify(predictor, path: Path, format: str, names: list[str], peer: str, rows: int, data, seed: int
            ) -> tuple[float, int, str]:
    """Largest |exported - Predictor.predict| over the check's batches; ExportMismatch past TOLERANCE.
    Two batches: ``rows`` rows (a file's first rows, or random valid ids) and a single row, so a
    batch size baked into the file would show."""
    if data is not None:
        d = predictor.read(data) if not hasattr(data, "sparse") else data
        big = data_inputs(d, predictor.schema, rows)
        where = f"the first {len(big['sparse'])} rows of {getattr(d, 'source', '') or 'the given data'}"
    else:
        big = random_inputs(predictor.schema, rows, seed)
        where = f"{rows} rows of random valid ids (seed {seed})"
    one = {k: v[:1] for k, v in big.items() if not k.startswith("bag")}
    for s in range(predictor.schema.num_bags):
        o, v = big[f"bag{s}_offsets"], big[f"bag{s}_values"]
        one[f"bag{s}_offsets"] = o[:2] - o[0]
        one[f"bag{s}_values"] = v[o[0]:o[1]]
    worst = 0.0
    n = 0
    for batch in (big, one):
        if len(batch["sparse"]) == 0:
            continue
        got = np.asarray(run_exported(path, format, batch, names))
        want = expected_output(predictor, batch, peer)
        if got.shape != want.shape:
            raise ExportMismatch(f"{path}: the exported {format} model returned shape {got.shape} for "
                                 f"{len(batch['sparse'])} rows, Predictor.predict {want.shape}")
        d = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
        if not np.isfinite(got).all() or d > TOLERANCE:
            bad = int(np.argmax(np.abs(got.astype(np.float64) - want).reshape(len(got), -1).max(1)))
            raise ExportMismatch(f"{path}: the exported {format} model differs from Predictor.predict by {d:.3g} "
                                 f"(> {TOLERANCE:g}) on {where}, worst at row {bad}: {got[bad]} vs {want[bad]}")
        worst = max(worst, d)
        n += len(batch["sparse"])
    return worst, n, where


def export_run(run_dir: str | Path, out_path: str | Path, format: str = "onnx", peer: str = "ensemble", *,
               verify: bool = True, verify_rows: int = VERIFY_ROWS, verify_data: str | Path | None = None,
               seed: int = 0, opset: int = ONNX_OPSET, dynamo: bool = False) -> ExportReport:
    """Export a run's peers to ``out_path`` (ONNX or TorchScript) with a JSON sidecar ``<out>.json``.

    ``peer``: "ensemble" (mean of every peer's probability, [B]), "all" ([B, P + 1]: each peer,
    then the ensemble) or one peer's label ([B]). ``verify``: run the written file on
    ``verify_rows`` rows (the first rows of ``verify_data``, read as the run reads files, or random
    valid ids) and on one row, and raise `ExportMismatch` if any probability differs from
    ``Predictor.predict`` by more than ``TOLERANCE``.

    Example (a run trained as in ``mlfast.api``'s example)::

        report = export_run("runs/head10k", "serving/deepfm.pt", format="torchscript", peer="deepfm")
        report.max_abs_diff          # <= 1e-5: checked against Predictor.predict on 257 rows
    """
    from mlfast.api import load_run

    predictor = load_run(run_dir, device="cpu")
    return export_predictor(predictor, out_path, format, peer, verify=verify, verify_rows=verify_rows,
                            verify_data=verify_data, seed=seed, opset=opset, dynamo=dynamo, run_dir=run_dir)
