"""``mlfast study``: the mutual fine-tuning protocol of arXiv 2406.12087 as one command.

For every seed: each peer is pretrained alone with early stopping; then every requested group is
fine-tuned mutually starting from those solo weights (the solo phase is shared by all groups). The
table reports, per seed, group and peer, the solo and the mutual test AUC / logloss and the
relative change, plus each group's ensemble (mean probability) before and after; then the mean
and standard deviation over seeds.

Fine-tuning also trains each peer longer, so a gain over solo mixes two effects. With ``control``
(the default) every peer is also fine-tuned *alone* from the same solo weights, for the same
epochs at the same learning rate (the protocol with no peer term); the ``alone`` columns and
``mutual_vs_alone_pct`` isolate what the mutual term itself adds. The phases are the same code as ``mlfast train --regime
finetune`` (``api.Session``), so a study's numbers equal those of the separate runs.
"""
from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mlfast.train import checkpoint as ckpt
from mlfast.api import Session, prepare_data
from mlfast.train.config import TrainConfig
from mlfast.train.metrics import peer_metrics
from mlfast.models import parse_peers
from mlfast.report import format_table


def parse_groups(text: str | Sequence[Sequence[str]], labels: Sequence[str]) -> list[tuple[str, ...]]:
    """Groups of peer labels: ``"default"`` (all pairs and the whole group), ``"pairs"``, ``"all"``,
    or explicit groups ``"deepfm+dcn,deepfm+dcn+ipnn"`` (labels joined by ``+``)."""
    labels = list(labels)
    if not isinstance(text, str):
        groups = [tuple(g) for g in text]
    else:
        groups = []
        for item in (t.strip() for t in text.split(",") if t.strip()):
            if item == "default":
                groups += list(itertools.combinations(labels, 2)) + ([tuple(labels)] if len(labels) > 2 else [])
            elif item == "pairs":
                groups += list(itertools.combinations(labels, 2))
            elif item == "all":
                groups.append(tuple(labels))
            else:
                groups.append(tuple(x.strip() for x in item.split("+")))
    out: list[tuple[str, ...]] = []
    for g in groups:
        unknown = [x for x in g if x not in labels]
        if unknown:
            raise ValueError(f"group {'+'.join(g)!r}: {unknown[0]!r} is not one of the peers ({', '.join(labels)})")
        if len(g) < 2 or len(set(g)) != len(g):
            raise ValueError(f"group {'+'.join(g)!r}: needs two or more different peers")
        if g not in out:
            out.append(g)
    if not out:
        raise ValueError("no groups to fine-tune")
    return out


@dataclass
class StudyResult:
    rows: list[dict]  # one per (seed, group, peer|ensemble)
    summary: list[dict]  # mean/std over seeds per (group, peer|ensemble)
    out_dir: Path | None


def run_study(
    train, valid=None, test=None, *, peers: str | Sequence[str], groups: str | Sequence[Sequence[str]] = "default",
    seeds: Sequence[int] = (0,), split_seed: int = 0, reader: dict | None = None, out: str | Path | None = None,
    resume: bool = False, control: bool = True, log: Callable = print, **config: Any,
) -> StudyResult:
    """Run the protocol; ``config`` takes `TrainConfig` fields (``epochs`` for pretraining,
    ``finetune_epochs``, ``finetune_lr``, ``alpha``, ``mutual``, ...); ``control`` adds the
    fine-tuned-alone baseline (see the module docstring)."""
    specs = parse_peers(peers)
    by_label = {s.label: s for s in specs}
    group_list = parse_groups(groups, list(by_label))
    if not seeds:
        raise ValueError("no seeds")
    out_dir = Path(out) if out is not None else None
    prep = prepare_data(train, valid, test, reader=reader, split_seed=split_seed)
    split = "test" if prep.splits["test"] is not None else "valid"
    rows: list[dict] = []
    for seed in seeds:
        cfg = TrainConfig(peers=[str(s) for s in specs], seed=seed, regime="finetune", **config)
        s = Session(prep, cfg, log=log)
        seed_dir = out_dir / f"seed{seed}" if out_dir is not None else None
        log(f"seed {seed}: {len(specs)} solo runs, then {len(group_list)} mutual group(s)")
        solo_states, solo_metrics, _, solo_preds = s.pretrain(specs, seed_dir, resume)
        alone_preds = {}
        if control:
            for label in dict.fromkeys(x for g in group_list for x in g):
                adir = seed_dir / f"alone_{label}" if seed_dir is not None else None
                t, _, _ = s.finetune([by_label[label]], solo_states, adir, resume)
                alone_preds[label] = s.predictions(t)[split]
        for g in group_list:
            gspecs = [by_label[x] for x in g]
            gdir = seed_dir / ("mutual_" + "+".join(g)) if seed_dir is not None else None
            _, mutual, _ = s.finetune(gspecs, solo_states, gdir, resume)
            solo_ens = _solo_ensemble([solo_preds[x][split] for x in g])
            for name in list(g) + ["ensemble"]:
                sm = solo_ens if name == "ensemble" else solo_metrics[name][split][name]
                mm = mutual[split][name]
                row = {
                    "seed": seed, "group": "+".join(g), "peer": name,
                    "solo_auc": sm["auc"], "mutual_auc": mm["auc"],
                    "auc_gain_pct": 100 * (mm["auc"] - sm["auc"]) / sm["auc"],
                    "solo_logloss": sm["logloss"], "mutual_logloss": mm["logloss"],
                    "logloss_change_pct": 100 * (mm["logloss"] - sm["logloss"]) / sm["logloss"],
                }
                if control:
                    am = _solo_ensemble([alone_preds[x] for x in (g if name == "ensemble" else (name,))])
                    row.update({"alone_auc": am["auc"], "alone_logloss": am["logloss"],
                                "mutual_vs_alone_pct": 100 * (mm["auc"] - am["auc"]) / am["auc"]})
                rows.append(row)
    summary = summarize(rows)
    result = StudyResult(rows, summary, out_dir)
    if out_dir is not None:
        write_study(result, out_dir, split, {"peers": [str(s) for s in specs], "groups": ["+".join(g) for g in group_list],
                                             "seeds": list(seeds), "split_seed": split_seed, "data": prep.info,
                                             "reader": prep.reader, "config": config})
    log(f"\n{split} split, mean over {len(seeds)} seed(s):")
    log(format_summary(summary))
    return result


def _solo_ensemble(preds: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Metrics of the mean probability of peers trained separately (one peer: its own metrics)."""
    ens = np.mean([p[:, 0] for p, _ in preds], axis=0)
    return peer_metrics(preds[0][1], ens[:, None], ["ensemble"])["ensemble"]


def summarize(rows: Sequence[dict]) -> list[dict]:
    keys = [k for k in rows[0] if k not in ("seed", "group", "peer")]
    out = []
    seen = []
    for r in rows:
        k = (r["group"], r["peer"])
        if k not in seen:
            seen.append(k)
    for group, peer in seen:
        sel = [r for r in rows if r["group"] == group and r["peer"] == peer]
        d = {"group": group, "peer": peer, "seeds": len(sel)}
        for key in keys:
            vals = np.array([r[key] for r in sel], dtype=float)
            d[key] = float(vals.mean())
            d[key + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out.append(d)
    return out


def format_summary(summary: Sequence[dict]) -> str:
    def pm(d, k, digits=4):
        return f"{d[k]:.{digits}f}" + (f" ±{d[k + '_std']:.{digits}f}" if d["seeds"] > 1 else "")

    control = bool(summary) and "alone_auc" in summary[0]
    head = ["group", "peer", "solo AUC", "mutual AUC", "AUC gain %", "solo logloss", "mutual logloss", "logloss chg %"]
    if control:
        head += ["alone AUC", "mutual vs alone %"]
    rows = []
    for d in summary:
        row = [d["group"], d["peer"], pm(d, "solo_auc"), pm(d, "mutual_auc"), pm(d, "auc_gain_pct", 3),
               pm(d, "solo_logloss"), pm(d, "mutual_logloss"), pm(d, "logloss_change_pct", 3)]
        if control:
            row += [pm(d, "alone_auc"), pm(d, "mutual_vs_alone_pct", 3)]
        rows.append(row)
    return format_table(head, rows)


def write_study(result: StudyResult, out: Path, split: str, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("study_runs.csv", result.rows), ("study.csv", result.summary)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    ckpt.write_json(out / "study.json", {**meta, "split": split, "runs": result.rows, "summary": result.summary})
    plot_study(result.summary, out / "study.png", split)


def plot_study(summary: Sequence[dict], path: Path, split: str) -> None:
    """Relative AUC change of mutual fine-tuning per peer, one bar group per peer group: against the
    solo peers, and (with the control) against the peers fine-tuned alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("auc_gain_pct", "mutual vs solo")]
    if summary and "mutual_vs_alone_pct" in summary[0]:
        panels.append(("mutual_vs_alone_pct", "mutual vs fine-tuned alone"))
    groups = list(dict.fromkeys(d["group"] for d in summary))
    peers = list(dict.fromkeys(d["peer"] for d in summary))
    width = 0.8 / len(peers)
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * max(6, 1.8 * len(groups) + 2), 4),
                             squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for k, peer in enumerate(peers):
            xs, ys, es = [], [], []
            for i, g in enumerate(groups):
                d = next((d for d in summary if d["group"] == g and d["peer"] == peer), None)
                if d is not None:
                    xs.append(i + k * width)
                    ys.append(d[key])
                    es.append(d[key + "_std"])
            ax.bar(xs, ys, width, yerr=es if any(es) else None, label=peer,
                   hatch="//" if peer == "ensemble" else None)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks([i + width * (len(peers) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels(groups, rotation=15)
        ax.set_title(title)
        ax.set_ylabel(f"{split} AUC change (%)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
