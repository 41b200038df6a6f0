"""`mlfast study` end to end on generated data (its table equals separate runs), the fine-tuning
regime (never worse on validation than the solo peers), and a generic delimited log via the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlfast.api import fit
from mlfast.cli import main
from mlfast.io.reader import read_criteo
from mlfast.study import parse_groups, run_study
from mlfast.io.synth import synth_criteo

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw"
TAOBAO = DATA / "taobao_ad_tiny_fuxictr"
quiet = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("study") / "s.tsv"
    synth_criteo(path, rows=15_000, seed=11)
    return read_criteo(path, hash_buckets=2000, cache=False)


def test_groups():
    assert parse_groups("default", ["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]
    assert parse_groups("a+c,all", ["a", "b", "c"]) == [("a", "c"), ("a", "b", "c")]
    with pytest.raises(ValueError, match="'x' is not one of the peers"):
        parse_groups("a+x", ["a", "b"])
    with pytest.raises(ValueError, match="two or more"):
        parse_groups("a+a", ["a", "b"])


def test_study_table_equals_the_separate_runs(synth_data, tmp_path):
    cfg = dict(epochs=2, finetune_epochs=1, batch_size=512)
    res = run_study(synth_data, peers="deepfm,dcn", groups="default", seeds=[0], out=tmp_path / "study", **cfg, **quiet)
    rows = {(r["group"], r["peer"]): r for r in res.rows}
    assert set(rows) == {("deepfm+dcn", "deepfm"), ("deepfm+dcn", "dcn"), ("deepfm+dcn", "ensemble")}
    for f in ("study.csv", "study_runs.csv", "study.json", "study.png"):
        assert (tmp_path / "study" / f).stat().st_size > 0
    # the solo column is what training the peer alone gives ...
    solo = fit(synth_data, peers=["dcn"], seed=0, **cfg, **quiet)
    assert rows[("deepfm+dcn", "dcn")]["solo_auc"] == pytest.approx(solo.metrics["test"]["dcn"]["auc"], abs=1e-9)
    # ... and the mutual column what `train --regime finetune` gives
    ft = fit(synth_data, peers=["deepfm", "dcn"], regime="finetune", seed=0, **cfg, **quiet)
    for peer in ("deepfm", "dcn", "ensemble"):
        assert rows[("deepfm+dcn", peer)]["mutual_auc"] == pytest.approx(ft.metrics["test"][peer]["auc"], abs=1e-9)
    for r in ft.metrics["solo_vs_mutual"]["rows"]:
        assert rows[("deepfm+dcn", r["peer"])]["auc_gain_pct"] == pytest.approx(r["auc_gain_pct"], abs=1e-7)
    for peer in ("deepfm", "dcn", "ensemble"):
        r = rows[("deepfm+dcn", peer)]
        assert r["mutual_vs_alone_pct"] == pytest.approx(100 * (r["mutual_auc"] / r["alone_auc"] - 1), abs=1e-9)
    # fine-tuning starts from the solo weights and keeps the best validation state: never worse on valid
    for peer in ("deepfm", "dcn"):
        assert ft.metrics["valid"][peer]["auc"] >= ft.metrics["solo"][peer]["valid"][peer]["auc"] - 1e-12
    print("mutual fine-tuning gains (test AUC %):",
          {r["peer"]: round(r["auc_gain_pct"], 3) for r in ft.metrics["solo_vs_mutual"]["rows"]})


def test_control_is_fine_tuning_without_the_peer_term(synth_data, tmp_path):
    """The control column (each peer fine-tuned alone) equals fine-tuning the group with alpha=0.
    Dropout off: with it, a group's peers draw dropout masks from one RNG stream, alone from their
    own, so the runs would differ by chance (test_trainer checks the same equality step by step)."""
    cfg = dict(epochs=1, finetune_epochs=1, batch_size=512, deterministic=True)
    peers = "deepfm:dropout=0,dcn:dropout=0"
    res = run_study(synth_data, peers=peers, seeds=[0], **cfg, **quiet)
    zero = fit(synth_data, peers=peers, regime="finetune", alpha=0.0, seed=0, **cfg, **quiet)
    for r in res.rows:
        m = zero.metrics["test"][r["peer"]]
        # float rounding differs between a [B, 2] and a [B, 1] step; a leaked peer term would not be this small
        assert r["alone_auc"] == pytest.approx(m["auc"], abs=1e-4), r
        assert r["alone_logloss"] == pytest.approx(m["logloss"], rel=1e-4), r
        assert r["alone_auc"] != pytest.approx(r["mutual_auc"], abs=1e-6)  # the peer term did change something


@pytest.mark.skipif(not TAOBAO.exists(), reason="../shared/datasets_raw not present")
def test_generic_delimited_log_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFAST_CACHE_DIR", str(tmp_path / "cache"))
    cats = ("userid,adgroup_id,pid,cate_id,campaign_id,customer,brand,cms_segid,cms_group_id,final_gender_code,"
            "age_level,pvalue_level,shopping_level,occupation,new_user_class_level")
    run = tmp_path / "run"
    assert main(["train", str(TAOBAO / "train_sample.csv"), "--valid", str(TAOBAO / "test_sample.csv"),
                 "--label", "clk", "--categorical", cats, "--numeric", "price", "--use-dense", "--peers", "lr,deepfm",
                 "--epochs", "1", "--out", str(run), "--quiet", "--hash-buckets", "1000"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["schema"]["field_names"] == cats.split(",") and cfg["schema"]["num_dense"] == 1
    assert cfg["reader"]["schema"]["label"] == "clk"
    assert main(["predict", str(run), str(TAOBAO / "test_sample.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    p = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)[:, 1:]  # after the row column
    assert p.shape == (100, 3) and ((p > 0) & (p < 1)).all()


@pytest.mark.skipif(not TAOBAO.exists(), reason="../shared/datasets_raw not present")
@pytest.mark.parametrize("vocab", [False, True], ids=["hashing", "vocabulary"])
def test_sequence_column_end_to_end_through_the_cli(tmp_path, monkeypatch, vocab):
    """click_sequence as a multi-hot bag field: train (fused engine), predict and eval read it
    back the same way (hashing or the run's vocabulary)."""
    monkeypatch.setenv("MLFAST_CACHE_DIR", str(tmp_path / "cache"))
    cats = "userid,adgroup_id,pid,cate_id,campaign_id,customer,brand,age_level"
    run = tmp_path / "run"
    extra = ["--min-count", "1"] if vocab else ["--hash-buckets", "1000"]
    assert main(["train", str(TAOBAO / "train_sample.csv"), "--valid", str(TAOBAO / "test_sample.csv"),
                 "--label", "clk", "--categorical", cats, "--sequence", "click_sequence", "--peers", "deepfm,dcn",
                 "--epochs", "2", "--out", str(run), "--quiet", *extra]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["schema"]["field_names"] == cats.split(",") + ["click_sequence"] and cfg["schema"]["num_bags"] == 1
    assert cfg["reader"]["schema"]["sequence"] == ["click_sequence"]
    assert main(["predict", str(run), str(TAOBAO / "test_sample.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    p = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)[:, 1:]  # after the row column
    assert p.shape == (100, 3) and ((p > 0) & (p < 1)).all()
    from mlfast.api import load_run

    pred = load_run(run)
    np.testing.assert_allclose(pred.predict(TAOBAO / "test_sample.csv")["ensemble"], p[:, 2], rtol=1e-5)


@pytest.mark.skipif(not TAOBAO.exists(), reason="../shared/datasets_raw not present")
def test_cli_on_the_cpu_without_the_triton_interpreter(tmp_path):
    """What a user's CPU run does: no TRITON_INTERPRET in the process (the test session sets it),
    so nothing on the fused CPU path may reach a Triton kernel; bag fields included."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(MLFAST_CACHE_DIR=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="")
    args = ["train", str(TAOBAO / "train_sample.csv"), "--label", "clk", "--categorical", "userid,adgroup_id,pid",
            "--sequence", "click_sequence", "--peers", "deepfm,dcn", "--epochs", "1", "--quiet",
            "--out", str(tmp_path / "run"), "--hash-buckets", "1000"]
    code = "import sys; from mlfast.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["schema"]["num_bags"] == 1
