"""Fine-tuning in several processes (DDP over gloo on this CPU, started by torchrun, as
`make finetune NPROC=2` does): the same recipe as one process, one set of outputs."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.finetune import (
    DistributedError,
    FinetuneOptions,
    finetune,
    split_global_batch,
)
from trainer.profiles import get_profile

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def start(out: Path, splits: Path, processes: int, data_seed: int, *extra: str):  # type: ignore[no-untyped-def]
    """`trainer finetune` on tiny-scratch, STEPS steps, the loss logged at every step; each
    process on one core (as `make finetune NPROC=2` on this machine), so two runs fit side by
    side."""
    command = [
        *("-m", "trainer", "finetune", "--profile", "tiny-scratch", "--data-dir", str(splits)),
        *("--checkpoints-dir", str(out), "--run-name", "run", "--max-steps", str(STEPS)),
        *("--eval-steps", str(STEPS), "--logging-steps", "1", "--limit-train", "200"),
        *("--limit-val", "10", "--n-generate", "0", "--no-progress"),
        *("--block-size", "128", "--max-length", "128"),
        *("--data-seed", str(data_seed), *extra),
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        command = [*launcher, str(processes), *command]
    return subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process) -> str:  # type: ignore[no-untyped-def]
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, (stdout + stderr)[-3000:]
    return stdout


def run(out: Path, splits: Path, processes: int, data_seed: int, *extra: str) -> str:
    return finish(start(out, splits, processes, data_seed, *extra))


def losses(out: Path, step: int = STEPS) -> list[float]:
    state = json.loads((out / "run" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def mean_gap(a: list[float], b: list[float]) -> float:
    return statistics.mean(abs(x - y) for x, y in zip(a, b, strict=True))


def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, sample_splits):
    # the two one-process runs side by side (one core each), then the two-process run
    baselines = [
        start(tmp_path / "one", sample_splits, 1, data_seed=42),
        start(tmp_path / "reshuffled", sample_splits, 1, data_seed=7),
    ]
    one = finish(baselines[0])
    finish(baselines[1])
    two = run(tmp_path / "two", sample_splits, 2, data_seed=42)

    metrics = json.loads((tmp_path / "two" / "run" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["global_batch"] == 8  # tiny-scratch: 8 × 1
    assert metrics["per_device_batch"] == 4 and metrics["grad_accum"] == 1
    assert metrics["global_step"] == STEPS
    # One set of outputs: one run directory, one experiments row, one summary printed.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "EXPERIMENTS.md",
        "experiments.csv",
        "latest",
        "run",
    ]
    assert len((tmp_path / "two" / "experiments.csv").read_text().splitlines()) == 2
    assert two.count("model saved in") == 1 and one.count("model saved in") == 1

    # The tolerance: two processes start from the same weights as one and see the same global
    # batches' worth of rows, only grouped differently (DistributedSampler shards the shuffled
    # rows). So their loss curve may differ from one process's by as much as reshuffling the
    # rows does, not more (see docs/training.md, DDP).
    single, ddp, reshuffled = (
        losses(tmp_path / "one"),
        losses(tmp_path / "two"),
        losses(tmp_path / "reshuffled"),
    )
    assert len(single) == len(ddp) == STEPS
    assert mean_gap(single, ddp) <= max(mean_gap(single, reshuffled), 0.05), (single, ddp)
    assert ddp[-1] < ddp[0] - 0.5  # and it learns

    # --resume with the same number of processes goes on from the last checkpoint.
    run(tmp_path / "two", sample_splits, 2, 42, "--resume", "--max-steps", str(STEPS + 2))
    resumed = json.loads((tmp_path / "two" / "run" / "metrics.json").read_text())
    assert resumed["global_step"] == STEPS + 2


def test_the_global_batch_is_split_not_changed():
    assert split_global_batch(4, 8, 1) == (4, 8)
    assert split_global_batch(4, 8, 2) == (4, 4)  # accumulation divided first
    assert split_global_batch(8, 1, 2) == (4, 1)
    assert split_global_batch(2, 3, 3) == (2, 1)
    for batch, accumulation, world in [(4, 8, 4), (8, 1, 4), (6, 4, 8)]:
        device_batch, steps = split_global_batch(batch, accumulation, world)
        assert device_batch * steps * world == batch * accumulation
    with pytest.raises(DistributedError, match="cannot be split over 3"):
        split_global_batch(8, 1, 3)


def test_several_processes_need_one_run_name(monkeypatch, tmp_path, sample_splits):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DistributedError, match="--run-name"):
        finetune(FinetuneOptions(get_profile("tiny-scratch"), sample_splits, tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing written
