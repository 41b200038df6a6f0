"""The mlfast command end to end on the real Criteo sample, and its argument checks."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mlfast.cli import main

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw"
HEAD10K = DATA / "criteo_kaggle_head10k" / "train_head10000.txt"
HEAD10K_TEST = DATA / "criteo_kaggle_head10k" / "test_head10000_nolabel.txt"
needs_data = pytest.mark.skipif(not HEAD10K.exists(), reason="../shared/datasets_raw not present")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFAST_CACHE_DIR", str(tmp_path / "cache"))


@needs_data
def test_train_predict_eval_on_the_kaggle_sample(tmp_path, capsys):
    run = tmp_path / "run"
    # the command (defaults: 3 epochs, default hashing), plus --out and --quiet
    assert main(["train", str(HEAD10K), "--peers", "deepfm,dcn", "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    for name in ("deepfm", "dcn", "ensemble"):
        assert name in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["peers"] == ["deepfm", "dcn"]
    for split in ("valid", "test"):
        for name in ("deepfm", "dcn", "ensemble"):
            assert 0.6 < metrics[split][name]["auc"] < 1.0, (split, name, metrics[split][name])
            assert 0.3 < metrics[split][name]["logloss"] < 0.7
    assert metrics["train"]["samples"] == 3 * 8000  # 3 epochs over the 8:1:1 split's 8000 rows
    for f in ("config.json", "curves.csv", "curves.png", "model.pt", "best.pt", "last.pt"):
        assert (run / f).stat().st_size > 0, f
    with open(run / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r["train_loss"] for r in rows) and any(r.get("valid_deepfm_auc") for r in rows)

    preds = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(HEAD10K_TEST), "--out", str(preds)]) == 0
    with open(preds) as f:
        header = f.readline().strip().split(",")
    assert header == ["row", "deepfm", "dcn", "ensemble"]
    p = np.loadtxt(preds, delimiter=",", skiprows=1)
    assert p.shape == (10_000, 4)  # one row per input line, in input order
    assert (p[:, 0] == np.arange(10_000)).all()
    p = p[:, 1:]
    assert ((p > 0) & (p < 1)).all()
    np.testing.assert_allclose(p[:, 2], p[:, :2].mean(1), atol=2e-6)

    capsys.readouterr()
    assert main(["eval", str(run), str(HEAD10K)]) == 0
    table = capsys.readouterr().out
    assert "ensemble" in table and "AUC" in table


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "{data}", "--peers", "deepfm,nosuchmodel"], "unknown peer 'nosuchmodel'"),
        (["train", "{data}", "--peers", "dcn:depth=3"], "unknown option 'depth'"),
        (["train", "{data}", "--peers", "dcn:layers=two"], "layers='two'"),
        (["train", "/no/such/file.tsv"], "training file not found: /no/such/file.tsv"),
        (["train", "{data}", "--valid", "/no/valid.tsv"], "--valid file not found: /no/valid.tsv"),
        (["train", "{data}", "--test", "{data}"], "--test needs --valid"),
        (["train", "{data}", "--resume"], "--resume needs --out"),
        (["train", "{data}", "--finetune-epochs", "2"], "only apply with --regime finetune"),
        (["train", "{data}", "--regime", "finetune", "--peers", "deepfm"], "at least two peers"),
        (["train", "{data}", "--epochs", "0"], "--epochs 0: expected an integer >= 1"),
        (["train", "{data}", "--hash-buckets", "12,x"], "--hash-buckets '12,x'"),
        (["predict", "/no/run", "{data}", "--out", "x.csv"], "run directory not found: /no/run"),
    ],
)
def test_bad_arguments_are_rejected_before_any_work(argv, needle, tmp_path, capsys):
    data = tmp_path / "d.tsv"
    data.write_text("0\t1\t2\n")  # never read: every case must fail before reading
    argv = [a.replace("{data}", str(data)) for a in argv]
    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    assert e.value.code in (1, 2)
    err = capsys.readouterr().err
    assert needle in err, err
    assert not list(Path.cwd().glob("runs/*d.tsv*"))


def test_bad_data_line_names_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    good = "\t".join(["1"] + ["3"] * 13 + ["68fd1e64"] * 26)
    broken = "\t".join(["0"] + ["3"] * 13 + ["68fd1e64"] * 6 + ["zz"] + ["68fd1e64"] * 19)
    bad.write_text(good + "\n" + broken + "\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "r"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "line 2" in err and "C7" in err
