"""What a finished run leaves beside its model: metrics.json, loss.png, the experiments table.

``checkpoints/experiments.csv`` is the record (one row appended per run, never rewritten), and
``checkpoints/EXPERIMENTS.md`` is rendered from it so that runs can be compared at a glance.
``checkpoints/latest`` is a symlink to the newest run: what the bot loads by default.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt

EXPERIMENT_COLUMNS = (
    "run",
    "profile",
    "base_model",
    "parameters",
    "train_dialogues",
    "train_tokens",
    "epochs",
    "train_time_s",
    "tokens_per_s",
    "eval_loss",
    "perplexity",
    "bleu",
    "chrf",
)


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    (run_dir / "metrics.json").write_text(
        json.dumps(metrics, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8"
    )


def plot_loss(log_history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train and eval loss against optimizer steps, from the Trainer's log history."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss (val)", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def append_experiment(checkpoints_dir: Path, row: dict[str, Any]) -> None:
    """Append the run to experiments.csv and re-render EXPERIMENTS.md from the whole CSV."""
    table = checkpoints_dir / "experiments.csv"
    new_file = not table.exists()
    with table.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=EXPERIMENT_COLUMNS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k)) for k in EXPERIMENT_COLUMNS})
    with table.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    lines = [
        "# Experiments",
        "",
        "Rendered from `experiments.csv` by `python -m trainer finetune`; one row per run.",
        "",
        "| " + " | ".join(EXPERIMENT_COLUMNS) + " |",
        "|" + "---|" * len(EXPERIMENT_COLUMNS),
    ]
    lines += ["| " + " | ".join(r.get(k, "") for k in EXPERIMENT_COLUMNS) + " |" for r in rows]
    (checkpoints_dir / "EXPERIMENTS.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def point_latest(checkpoints_dir: Path, run_dir: Path) -> None:
    """Make ``checkpoints/latest`` a relative symlink to the run (replaced atomically)."""
    link = checkpoints_dir / "latest"
    tmp = checkpoints_dir / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, link)
