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
    assert header == ["line", "deepfm", "dcn", "ensemble"]
    p = np.loadtxt(preds, delimiter=",", skiprows=1)
    assert p.shape == (10_000, 4)  # one row per input line, in input order
    assert (p[:, 0] == np.arange(1, 10_001)).all()  # each row's 1-based line in the file
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
        (["bench", "--rows", "1.8M,2.5x"], "--rows '1.8M,2.5x': expected comma-separated numbers"),
        (["bench", "--batch-sizes", "1.5k,0.5"], "--batch-sizes '1.5k,0.5'"),
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


# ---------------------------------------------------------------------------------------------
# Resume, run directories, and the command line's manners

SMALL = ["--peers", "deepfm:mlp=16,dcn:mlp=16", "--hash-buckets", "300", "--batch-size", "200", "--quiet",
         "--no-cache"]


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    from mlfast.io.synth import synth_criteo

    path = tmp_path_factory.mktemp("cli") / "s.tsv"
    synth_criteo(path, rows=3000, seed=2)
    return path


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    m["train"] = {k: v for k, v in m["train"].items() if k not in ("train_seconds", "samples_per_second",
                                                                 "checkpoint_seconds")}
    return m


def test_resume_takes_the_saved_configuration(small_file, tmp_path, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", str(small_file), "--out", str(full), "--epochs", "2", *SMALL]) == 0
    assert main(["train", str(small_file), "--out", str(cut), "--epochs", "2", "--max-steps", "5", *SMALL]) == 0
    config = (cut / "config.json").read_bytes()
    # neither DATA nor --epochs given again: the saved run's decide (not the defaults: 3 epochs)
    assert main(["train", "--out", str(cut), "--resume", "--max-steps", "1000"]) == 0
    assert _metrics(cut)["train"]["steps"] == _metrics(full)["train"]["steps"] == 2 * 12
    assert _metrics(cut)["valid"] == _metrics(full)["valid"] and _metrics(cut)["test"] == _metrics(full)["test"]
    saved = json.loads(config)["config"]
    assert json.loads((cut / "config.json").read_text())["config"] == {**saved, "max_steps": 1000}


def test_resume_rejects_changed_settings(small_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(small_file), "--out", str(run), "--epochs", "1", "--max-steps", "3", *SMALL]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.01", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "--lr: the run was trained with 0.001, given 0.01" in err and "--seed: the run was trained with 0" in err
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.001"]) == 0  # the same value is fine


def test_finished_run_is_left_alone_or_extended(small_file, tmp_path, capsys):
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert main(["train", str(small_file), "--out", str(run), "--epochs", "1", *SMALL]) == 0
    before = _files(run)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().err
    assert _files(run) == before  # every file byte for byte, curves included
    # --epochs extends it, to exactly what an uninterrupted 2-epoch run gives
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
    assert main(["train", str(small_file), "--out", str(ref), "--epochs", "2", *SMALL]) == 0
    assert _metrics(run)["valid"] == _metrics(ref)["valid"] and _metrics(run)["train"]["steps"] == 24


def test_existing_run_directory_needs_resume_or_overwrite(small_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(small_file), "--out", str(run), "--epochs", "1", "--max-steps", "2", *SMALL]) == 0
    capsys.readouterr()
    assert main(["train", str(small_file), "--out", str(run), "--epochs", "1", *SMALL]) == 2
    assert "--resume" in capsys.readouterr().err and "--overwrite" in capsys.readouterr().err + "--overwrite"
    assert main(["train", str(small_file), "--out", str(run), "--epochs", "1", "--overwrite", *SMALL]) == 0
    assert _metrics(run)["train"]["steps"] == 12


def test_a_run_that_fails_before_any_checkpoint_leaves_no_directory(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("\t".join(["1"] + ["3"] * 13 + ["68fd1e64"] * 26) + "\nnot a criteo line\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["train", "--epoch", "1"], ["train", "--peer", "deepfm"]])
def test_no_prefix_abbreviations_and_the_subcommand_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: mlfast train" in err and "unrecognized arguments" in err


def test_version_and_help_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from mlfast import __version__

    assert capsys.readouterr().out.strip() == f"mlfast {__version__}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--lr LR Adam learning rate (dense layers and embeddings) (default: 0.001)",
                   "(default: 3)", "--seed SEED", "--patience PATIENCE", "Models: autoint, dcn, dcnv2, deepfm"):
        assert needle in text, needle
    import argparse

    from mlfast.cli import build_parser

    for name, sub in build_parser()[1].items():
        for act in sub._actions:
            if act.option_strings and not isinstance(act, argparse._HelpAction):
                assert act.help, f"mlfast {name} {act.option_strings[0]} has no help text"


def test_plain_progress_lines_and_one_line_per_validation(small_file, tmp_path, capfd, monkeypatch):
    import mlfast.train.trainer as trainer

    monkeypatch.setattr(trainer, "PLAIN_PROGRESS_SECONDS", 0.0)
    argv = ["train", str(small_file), "--out", str(tmp_path / "run"), "--epochs", "2", "--eval-every", "5", *SMALL]
    argv.remove("--quiet")
    assert main(argv) == 0
    out, err = capfd.readouterr()
    assert "\r" not in out + err  # not a terminal: no carriage-return bar
    assert any(line.startswith("step 1/24 (epoch 0.08): loss") for line in err.splitlines())
    valid = [line for line in err.splitlines() if " valid: " in line]
    assert len(valid) == 4 + 2  # every 5 steps (5, 10, 15, 20) and after each epoch
    assert all("deepfm AUC" in v and "dcn AUC" in v and "ensemble AUC" in v and "logloss" in v for v in valid)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "data: " in log and sum(" valid: " in line for line in log.splitlines()) == 6


def test_tensorboard_scalars(small_file, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert main(["train", str(small_file), "--out", str(run), "--epochs", "1", "--tensorboard", *SMALL]) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "valid/deepfm_auc" in tags and "train/loss" in tags
    assert [e.step for e in acc.Scalars("valid/deepfm_auc")] == [12]


def test_exit_codes_for_data_and_usage_errors(tmp_path, capsys):
    csv_with_header = tmp_path / "x.csv"
    csv_with_header.write_text("clk,a,b\n1,x,y\n0,z,w\n")
    assert main(["train", str(csv_with_header), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "--label" in err and "--categorical" in err and "read_delimited" not in err
    assert main(["train", str(csv_with_header), "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err


def test_synth_as_the_readme_writes_it(tmp_path, capsys):
    out = tmp_path / "out.tsv"
    assert main(["synth", str(out), "--rows", "1000"]) == 0
    assert len(out.read_text().splitlines()) == 1000
    assert main(["synth", "criteo", str(tmp_path / "old.tsv"), "--rows", "10"]) == 0  # the older form


def test_every_mlfast_command_in_the_readme_parses():
    """Each `mlfast ...` line of the README's shell blocks is a valid command line for this CLI
    (the parser and the CLI's own checks; nothing runs)."""
    import re
    import shlex

    from mlfast.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    cmds = [c.strip() for b in blocks for line in b.splitlines() for c in line.split("&&")
            if c.strip().startswith("mlfast ")]
    assert len(cmds) >= 5
    parser, subs = build_parser()
    for c in cmds:
        argv = shlex.split(c, comments=True)[1:]
        ns, extra = parser.parse_known_args(argv)
        assert not extra, f"{c}: unknown arguments {extra}"
