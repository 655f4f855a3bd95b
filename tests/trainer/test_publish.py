"""Publishing a trained model: its card, rendered from a real run, and the upload path up to the
network (the Hub is not reachable from here: a closed local port stands in for it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataset_tools.dialogue_format import BOT_TAG, USER_TAG, render_prompt
from tests.servers import free_port
from trainer.finetune import FinetuneOptions, finetune
from trainer.publish import files_to_upload

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, sample_splits, fast_profile) -> Path:
    out = tmp_path_factory.mktemp("published")
    finetune(
        FinetuneOptions(
            fast_profile, sample_splits, out, run_name="run", n_generate=3, progress=False
        )
    )
    return out / "run"


def push(model: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "push",
            "--model",
            str(model),
            "--repo-id",
            "someone/tiny-dialogue",
        ],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_run_writes_a_card_from_its_metrics(trained_run, sample_splits):
    card = (trained_run / "README.md").read_text(encoding="utf-8")
    metrics = json.loads((trained_run / "metrics.json").read_text(encoding="utf-8"))
    stats = json.loads((sample_splits / "stats.json").read_text(encoding="utf-8"))
    assert card.startswith("---\nlanguage: ru\n")
    assert "fine-tuned from **scratch**" in card and f"{metrics['parameters']:,}" in card
    # the data: rows, split and what cleaning did, from the prepared splits' stats
    assert f"rows read {stats['rows_read']:,}" in card
    splits = stats["splits"]
    assert f"train {splits['train']:,}, val {splits['val']:,}, test {splits['test']:,}" in card
    assert "duplicate_exact" in card and "whitespace" in card
    # the dialogue format, with the very prompt the bot builds
    assert USER_TAG in card and BOT_TAG in card and render_prompt(["Привет! Как дела?"]) in card
    # training settings and the metrics before/after
    assert f"| steps / epochs | {metrics['global_step']} /" in card
    assert f"{metrics['perplexity_before_training']:,.2f}" in card
    assert f"{metrics['perplexity']:,.2f}" in card
    assert "decoded sampled (seed 0)" in card
    assert (
        "![training and validation loss](loss.png)" in card and (trained_run / "loss.png").exists()
    )
    assert "## Limits" in card and "not meant to make sense" in card


def test_push_goes_as_far_as_the_network_and_says_why_it_stopped(trained_run):
    done = push(
        trained_run, {"HF_TOKEN": "hf_test", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0  # one line, no traceback
    assert done.stderr.startswith("error: cannot reach the Hugging Face Hub")
    assert "uploading" in done.stdout
    # the card was rendered for the repository before the upload was tried
    assert 'from_pretrained("someone/tiny-dialogue")' in (trained_run / "README.md").read_text()
    # what would go up: the model, not the training state
    files = files_to_upload(trained_run)
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "README.md",
        "metrics.json",
        "loss.png",
    } <= set(files)
    assert not [f for f in files if f.startswith("checkpoint-") or f == "training_args.bin"]


def test_push_without_a_token_is_one_clear_line(trained_run, tmp_path, monkeypatch, capsys):
    from trainer.__main__ import main as trainer_cli

    monkeypatch.delenv("HF_TOKEN", raising=False)
    command = ["push", "--model", str(trained_run), "--repo-id", "someone/tiny-dialogue"]
    assert trainer_cli(command) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: HF_TOKEN is not set") and "\n" not in error.strip()
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert trainer_cli(["push", "--model", str(tmp_path), "--repo-id", "someone/x"]) == 2
    assert "not a trained model directory" in capsys.readouterr().err
