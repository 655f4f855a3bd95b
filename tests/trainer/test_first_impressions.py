"""What a newcomer sees: `make demo`'s training output, and reply metrics decoded as the bot
decodes."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.evaluation import Decoding, evaluate_model

ROOT = Path(__file__).resolve().parents[2]


def test_demo_training_shows_progress_and_no_alarming_warnings(tmp_path, sample_splits):
    """The demo's own command (`make demo`: tiny-scratch on the prepared sample, progress on),
    cut to a few steps. Its output is not a terminal here: plain progress lines, no raw log
    dictionaries, and no "missing keys" warning when the best checkpoint is loaded back."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "finetune",
            "--profile",
            "tiny-scratch",
            "--data-dir",
            str(sample_splits),
            "--checkpoints-dir",
            str(tmp_path),
            "--max-steps",
            "4",
            "--eval-steps",
            "2",
            "--limit-train",
            "300",
            "--limit-val",
            "20",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "{'loss':" not in output and "'grad_norm'" not in output
    assert "missing keys" not in output.lower()
    assert "PAD/BOS/EOS" not in output and "loss_type" not in output  # aligned before training
    assert "Writing model shards" not in output  # one progress display, ours
    assert "step 4/4" in output and "tok/s" in output and "left" in output


def test_evaluation_decodes_as_configured_and_repeats(chatty_model_dir, sample_splits):
    model = AutoModelForCausalLM.from_pretrained(chatty_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(chatty_model_dir)
    dialogues = [list(t) for t in pd.read_parquet(sample_splits / "test.parquet")["turns"]][:12]

    def replies(decoding: Decoding) -> list[str]:
        metrics = evaluate_model(
            model, tokenizer, dialogues, n_generate=12, n_show=12, decoding=decoding
        )
        assert metrics["decoding"]["mode"] == decoding.mode
        return [s["generated"] for s in metrics["samples"]]

    sampled = Decoding.of_model(model, seed=7)
    assert sampled.mode == "sampled" and sampled.temperature > 0
    first, again = replies(sampled), replies(sampled)
    assert first == again  # seeded: a run repeats exactly
    greedy = replies(Decoding.greedy())
    assert greedy != first  # and the figures describe the sampling, not greedy decoding
    assert replies(Decoding.of_model(model, seed=8)) != first
