"""`mlfast export`: the exported module against its references (bag pooling against a loop, the
module against the PeerGroup), and the written ONNX / TorchScript files, loaded in a process where
mlfast cannot be imported, against ``Predictor.predict`` on the same rows (within 1e-5), for a
hashed Criteo run with dense features, a vocabulary-mode run and a delimited log with a bag field."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_close
from mlfast.api import fit, load_run
from mlfast.cli import main
from mlfast.io.reader import DelimitedSchema
from mlfast.export import (TOLERANCE, ExportMismatch, ServingModel, data_inputs, export_run, inputs_to_data,
                           pool_bags, random_inputs)
from mlfast.models import FeatureSchema, parse_peers
from mlfast.train.group import PeerGroup

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw"
CRITEO = DATA / "criteo_kaggle_head10k" / "train_head10000.txt"
CRITEO_TEST = DATA / "criteo_kaggle_head10k" / "test_head10000_nolabel.txt"
TAOBAO = DATA / "taobao_ad_tiny_fuxictr"
TAOBAO_CATS = ["userid", "adgroup_id", "pid", "cate_id", "campaign_id", "customer", "brand", "age_level"]
needs_data = pytest.mark.skipif(not (CRITEO.exists() and TAOBAO.exists()), reason="../shared/datasets_raw not present")
SMALL = dict(epochs=1, max_steps=3, progress=False, log=lambda *a: None, embedding_dim=4)

# The runs the export and featurize tests share, each trained once per session (see trained_run).
RUNS = {
    "criteo_hash": dict(train=CRITEO, peers="deepfm:mlp=16-16,dcn:mlp=16", use_dense=True,
                        reader={"hash_buckets": 1000, "cache": False}),
    "criteo_vocab": dict(train=CRITEO, peers="deepfm:mlp=16-16,dcn:mlp=16",
                         reader={"min_count": 2, "cache": False}),
    "taobao_bags": dict(train=TAOBAO / "train_sample.csv", valid=TAOBAO / "test_sample.csv",
                        peers="deepfm:mlp=16-16,dcn:mlp=16,autoint", use_dense=True,
                        reader={"hash_buckets": 1000, "cache": False,
                                "schema": DelimitedSchema(label="clk", categorical=TAOBAO_CATS, numeric=["price"],
                                                          sequence=["click_sequence"])}),
}


def trained_run(name: str, base: Path) -> Path:
    """The run ``name`` of `RUNS` under ``base`` (the session's temp root), trained on first use."""
    run = base / "export_runs" / name
    if not (run / "model.pt").is_file():
        spec = dict(RUNS[name])
        fit(spec.pop("train"), spec.pop("valid", None), out=run, overwrite=True, **spec, **SMALL)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not (CRITEO.exists() and TAOBAO.exists()):
        pytest.skip("../shared/datasets_raw not present")
    base = tmp_path_factory.getbasetemp()
    return {name: trained_run(name, base) for name in RUNS}


# ------------------------------------------------------------------------------------ references
def pool_reference(table: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean of each bag's rows, bag by bag (an empty bag: zeros)."""
    out = torch.zeros(len(offsets) - 1, table.shape[1], dtype=table.dtype)
    for b in range(len(offsets) - 1):
        rows = values[offsets[b]:offsets[b + 1]]
        if len(rows):
            out[b] = table[rows].mean(0)
    return out


def test_pool_bags_matches_a_loop(gen):
    table = torch.randn(97, 13, generator=gen)
    for B in (1, 2, 41):
        lengths = torch.randint(0, 6, (B,), generator=gen)
        lengths[0] = 0  # empty bags first, in the middle and last
        lengths[-1] = 0
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        values = torch.randint(0, 97, (int(offsets[-1]),), generator=gen)
        got = pool_bags(table, offsets, values)
        assert_close(got, pool_reference(table, offsets, values))
        assert got[0].abs().sum().item() == 0.0
    empty = pool_bags(table, torch.zeros(4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert empty.shape == (3, 13) and empty.abs().sum().item() == 0.0


@pytest.mark.parametrize("kind", ["fused", "dense"])
@pytest.mark.parametrize("output", ["all", "ensemble", "peer"])
def test_serving_model_is_the_peer_group(seed, output, kind):
    """Against the group's own forward, with either table kind (PeerTables, lazily initialised on the
    CPU, or the plain DenseTables)."""
    schema = FeatureSchema((0, 10, 25, 31, 50, 70), num_dense=3, num_bags=2)
    g = PeerGroup.build(parse_peers("deepfm:mlp=8,dcn:mlp=8,lr"), schema, embedding_dim=4,
                        seeds=[seed, seed + 1, seed + 2], kind=kind).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move some rows away from their initial values: a stale copy would show
        rows = torch.randint(0, 70, (30,), generator=gen)
        for p, w in enumerate(g.tables.widths):
            new = torch.randn(30, w, generator=gen)
            if kind == "fused":
                g.tables.materialize(rows)
                g.tables.weight[rows, g.tables.layout.columns(p)] = new
            else:
                g.tables.tables[p][rows] = new
    x = random_inputs(schema, 37, seed)
    args = [torch.from_numpy(x["sparse"]), torch.from_numpy(x["dense"])]
    bags = [(torch.from_numpy(x[f"bag{s}_offsets"]), torch.from_numpy(x[f"bag{s}_values"])) for s in range(2)]
    with torch.no_grad():
        m = ServingModel.from_group(g, output, [1] if output == "peer" else None)  # before any lookup
        probs = torch.sigmoid(g(args[0], args[1], bags))
        got = m(*args, *(t for bag in bags for t in bag))
    want = {"all": torch.cat([probs, probs.mean(1, keepdim=True)], 1), "ensemble": probs.mean(1),
            "peer": probs[:, 1]}[output]
    assert m.input_names == ["sparse", "dense", "bag0_offsets", "bag0_values", "bag1_offsets", "bag1_values"]
    assert_close(got, want)


# ---------------------------------------------------------------------------- written files
_LOADER = r"""
import json, sys
sys.modules["mlfast"] = None  # any import of mlfast now fails
sys.path = [p for p in sys.path if p and not p.rstrip("/").endswith(("main", "tests"))]
import numpy as np
jobs = json.load(open(sys.argv[1]))
for job in jobs:
    side = json.load(open(job["path"] + ".json"))  # the sidecar says what to feed
    names = [i["name"] for i in side["inputs"]]
    x = np.load(job["inputs"])
    dtypes = {i["name"]: i["dtype"] for i in side["inputs"]}
    feed = {n: x[n].astype(dtypes[n]) for n in names}
    if side["format"] == "onnx":
        import onnxruntime as ort
        sess = ort.InferenceSession(job["path"], providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == names, [i.name for i in sess.get_inputs()]
        out = sess.run(None, feed)[0]
    else:
        import torch
        m = torch.jit.load(job["path"])
        with torch.no_grad():
            out = m(*(torch.from_numpy(feed[n]) for n in names)).numpy()
    np.save(job["output"], out)
assert not [m for m in sys.modules if m.startswith("mlfast.")]
print("ok", len(jobs))
"""


def run_without_mlfast(jobs: list[dict], tmp: Path) -> list[np.ndarray]:
    """Each job's file run on its inputs in a fresh Python where ``import mlfast`` fails."""
    script = tmp / "load.py"
    script.write_text(_LOADER)
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(script), str(tmp / "jobs.json")], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return [np.load(j["output"]) for j in jobs]


CASES = [  # (run, format, peer)
    ("criteo_hash", "onnx", "ensemble"),
    ("criteo_hash", "torchscript", "all"),
    ("criteo_vocab", "onnx", "dcn"),
    ("criteo_vocab", "torchscript", "ensemble"),
    ("taobao_bags", "onnx", "all"),
    ("taobao_bags", "torchscript", "deepfm"),
]


def test_exported_files_give_predict_without_mlfast(runs, tmp_path):
    """Written, verified by export_run, then run where mlfast cannot be imported, on 300 rows of the
    run's own file (bags as the reader made them) and 50 of random valid ids with empty bags."""
    jobs, want = [], []
    for name, fmt, peer in CASES:
        out = tmp_path / name / f"{peer}.{'onnx' if fmt == 'onnx' else 'pt'}"
        report = export_run(runs[name], out, format=fmt, peer=peer)
        assert report.max_abs_diff <= TOLERANCE and report.verified_rows == 257
        assert [f.name for f in report.files] == [out.name] and report.sidecar_path == Path(str(out) + ".json")
        pred = load_run(runs[name])
        data = pred.read(RUNS[name].get("valid", RUNS[name]["train"])).take(slice(0, 300))
        rnd = random_inputs(pred.schema, 50, seed=7)
        for k, rows in enumerate((data_inputs(data, pred.schema), rnd)):
            np.savez(tmp_path / f"{name}-{fmt}-{k}.npz", **rows)
            jobs.append({"path": str(out), "inputs": str(tmp_path / f"{name}-{fmt}-{k}.npz"),
                         "output": str(tmp_path / f"{name}-{fmt}-{k}.out.npy")})
            p = pred.predict(data if k == 0 else inputs_to_data(rnd, pred.schema))
            want.append(np.stack([p[c] for c in [*pred.labels, "ensemble"]], 1) if peer == "all" else p[peer])
    for job, got, w in zip(jobs, run_without_mlfast(jobs, tmp_path), want):
        assert got.shape == w.shape, job
        np.testing.assert_allclose(got, w, rtol=0, atol=TOLERANCE, err_msg=job["path"])


def test_sidecar_describes_inputs_and_outputs(runs, tmp_path):
    import onnx

    out = tmp_path / "m.onnx"
    export_run(runs["taobao_bags"], out, peer="all", verify_rows=20)
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    graph = onnx.load(str(out)).graph
    assert [i["name"] for i in side["inputs"]] == [i.name for i in graph.input] == \
        ["sparse", "dense", "bag0_offsets", "bag0_values"]
    assert [i["dtype"] for i in side["inputs"]] == ["int64", "float32", "int64", "int64"]
    assert {o.domain for o in onnx.load(str(out)).opset_import} <= {"", "ai.onnx"}  # standard ops only
    cfg = json.loads((runs["taobao_bags"] / "config.json").read_text())
    offs = cfg["schema"]["field_offsets"]
    fields = side["inputs"][0]["fields"]
    assert [f["name"] for f in fields] == TAOBAO_CATS and side["inputs"][0]["shape"] == ["batch", 8]
    assert [(f["first_row"], f["end_row"]) for f in fields] == list(zip(offs[:8], offs[1:9]))
    assert side["inputs"][1]["columns"] == ["price"]
    assert side["inputs"][3]["field"] == {"name": "click_sequence", "first_row": offs[8], "end_row": offs[9],
                                          "missing_row": offs[8]}
    assert side["outputs"][0]["columns"] == ["deepfm", "dcn", "autoint", "ensemble"]
    assert side["outputs"][0]["shape"] == ["batch", 4]
    assert side["reader"] == cfg["reader"] and side["ids"] == "hashing"
    assert side["verified"]["rows"] == 21 and side["verified"]["max_abs_diff"] <= TOLERANCE
    vocab = export_run(runs["criteo_vocab"], tmp_path / "v.pt", format="torchscript", verify=False)
    v = json.loads(vocab.sidecar_path.read_text())
    assert v["ids"] == "vocabulary" and [i["name"] for i in v["inputs"]] == ["sparse"]  # no dense: not trained on it
    assert all(f["oov_row"] == f["end_row"] - 1 for f in v["inputs"][0]["fields"])
    assert v["outputs"][0]["shape"] == ["batch"] and v["verified"] is None


def test_a_file_that_fails_its_check_is_not_written(runs, tmp_path, monkeypatch):
    import mlfast.export as ex

    good = tmp_path / "m.onnx"
    export_run(runs["criteo_hash"], good, peer="deepfm", verify_rows=10)
    before = good.read_bytes()
    real = ex.expected_output
    monkeypatch.setattr(ex, "expected_output", lambda *a: real(*a) + 3e-5)
    with pytest.raises(ExportMismatch, match=r"differs from Predictor.predict by 3(\.\d+)?e-05 \(> 1e-05\)"):
        export_run(runs["criteo_hash"], good, peer="dcn", verify_rows=10)
    assert good.read_bytes() == before  # the earlier export stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]  # no scratch folder left


def test_cli_export(runs, tmp_path, capsys):
    run = str(runs["criteo_hash"])
    out = tmp_path / "cli.pt"
    assert main(["export", run, "--format", "torchscript", "--out", str(out), "--peer", "dcn",
                 "--verify-data", str(CRITEO_TEST), "--verify-rows", "40"]) == 0
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["peer"] == "dcn" and side["verified"]["rows"] == 41
    assert "the first 40 rows of" in side["verified"]["inputs"]
    assert "matches mlfast predict" in capsys.readouterr().out
    for bad, what in ((["--peer", "nope"], "is not in this run"), (["--dynamo", "--format", "torchscript"], "--dynamo"),
                      (["--verify-rows", "0"], "--verify-rows"), (["--opset", "13"], "--opset")):
        assert main(["export", run, "--out", str(tmp_path / "x.onnx"), *bad]) == 2
        assert what in capsys.readouterr().err
    assert main(["export", str(tmp_path / "no_run"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_dynamo_exporter_with_external_weights(runs, tmp_path, monkeypatch):
    """torch.export-based ONNX, its weights forced into <out>.data (as for a table past 1 GiB)."""
    pytest.importorskip("onnxscript")
    import mlfast.export as ex

    monkeypatch.setattr(ex, "EXTERNAL_DATA_BYTES", 0)
    with pytest.raises(ValueError, match="export with dynamo=True"):
        export_run(runs["taobao_bags"], tmp_path / "legacy.onnx", verify=False)
    r = export_run(runs["taobao_bags"], tmp_path / "m.onnx", peer="all", dynamo=True, verify_rows=64)
    assert [f.name for f in r.files] == ["m.onnx", "m.onnx.data"] and r.max_abs_diff <= TOLERANCE
    assert json.loads(r.sidecar_path.read_text())["files"] == ["m.onnx", "m.onnx.data"]
