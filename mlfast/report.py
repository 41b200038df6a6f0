"""Run reports: the summary tables printed at the end, the learning-curve CSV and its PNG plot."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterable, Sequence


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"  # undefined (e.g. AUC on a split with one class)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"
    return str(x)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        parts = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def metrics_table(splits: dict[str, dict[str, dict[str, float]]]) -> str:
    """Per-peer (and ensemble) AUC / logloss for each split, e.g. {"valid": {...}, "test": {...}}."""
    splits = {k: v for k, v in splits.items() if v}
    if not splits:
        return "(no labelled evaluation data)"
    names = list(next(iter(splits.values())).keys())
    headers = ["peer"] + [f"{s} {m}" for s in splits for m in ("AUC", "logloss")]
    rows = [[n] + [splits[s][n][m] for s in splits for m in ("auc", "logloss")] for n in names]
    return format_table(headers, rows)


def solo_vs_mutual_table(rows: Sequence[dict]) -> str:
    """The paper's table: each peer's solo vs mutual AUC / logloss and the relative change."""
    headers = ["peer", "solo AUC", "mutual AUC", "AUC gain %", "solo logloss", "mutual logloss", "logloss change %"]
    return format_table(headers, [
        [r["peer"], r["solo_auc"], r["mutual_auc"], r["auc_gain_pct"], r["solo_logloss"],
         r["mutual_logloss"], r["logloss_change_pct"]] for r in rows
    ])


def solo_vs_mutual_rows(solo: dict[str, dict], mutual: dict[str, dict]) -> list[dict]:
    """Rows of `solo_vs_mutual_table` from per-peer {auc, logloss} of both phases."""
    out = []
    for name, s in solo.items():
        m = mutual[name]
        out.append({
            "peer": name,
            "solo_auc": s["auc"], "mutual_auc": m["auc"],
            "auc_gain_pct": 100.0 * (m["auc"] - s["auc"]) / s["auc"],
            "solo_logloss": s["logloss"], "mutual_logloss": m["logloss"],
            "logloss_change_pct": 100.0 * (m["logloss"] - s["logloss"]) / s["logloss"],
        })
    return out


def write_curves_csv(history: Sequence[dict], path: str | Path) -> None:
    """One row per logged step or evaluation; columns are the union of all keys (blank if absent)."""
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(history)


def plot_curves(history: Sequence[dict], peers: Sequence[str], path: str | Path, title: str = "") -> None:
    """Training loss and per-peer validation AUC against step, as a PNG. A bare ``Figure`` (no
    pyplot, no global state, no GUI backend), so it may run on any thread."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_loss, ax_auc = fig.subplots(1, 2)
    tr = [r for r in history if "train_loss" in r]
    if tr:
        ax_loss.plot([r["step"] for r in tr], [r["train_loss"] for r in tr], color="black")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (sum over peers)")
    ax_loss.grid(alpha=0.3)
    ev = [r for r in history if any(k.startswith("valid_") for k in r)]
    for name in list(peers) + ["ensemble"]:
        key = f"valid_{name}_auc"
        pts = [(r["step"], r[key]) for r in ev if key in r]
        if pts:
            ax_auc.plot(*zip(*pts), marker="o", label=name, linestyle="--" if name == "ensemble" else "-")
    ax_auc.set_xlabel("step")
    ax_auc.set_ylabel("validation AUC")
    ax_auc.grid(alpha=0.3)
    if ev:
        ax_auc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


class TensorBoardScalars:
    """Writes each history row's numbers as TensorBoard scalars (``torch.utils.tensorboard``) at its
    step: training loss and per-peer BCE, validation AUC / logloss per peer, learning rate."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise ValueError("--tensorboard needs the tensorboard package: pip install 'mlfast[tensorboard]'") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, row: dict) -> None:
        step = int(row["step"])
        for k, v in row.items():
            if k in ("step", "epoch", "samples") or v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            self.writer.add_scalar(k.replace("_", "/", 1), float(v), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
