"""A model named by a Hugging Face hub id, on a machine that cannot reach the hub."""

import os
import shutil

from tests.bot.harness import ROOT, run_python
from tests.servers import free_port

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# The bot's loader and the trainer's, as `python -m bot` and `make finetune` call them.
PROBE = """
import time
from models.loading import ModelLoadError, load_model
from trainer.modeling import BaseModelError, load_pretrained

for load, refusal in ((load_model, ModelLoadError), (load_pretrained, BaseModelError)):
    started = time.monotonic()
    model, _ = load("someone/tiny-chat")
    print("cached:", round(time.monotonic() - started, 1), type(model).__name__, flush=True)
    started = time.monotonic()
    try:
        load("someone/not-downloaded")
    except refusal as error:
        print("refused:", round(time.monotonic() - started, 1), error, flush=True)
"""


def test_without_the_hub_a_cached_model_loads_at_once_and_another_is_one_error(
    tmp_path, tiny_model_dir
):
    """Before: huggingface_hub retried every file five times with backoff (~23 s each, a wall of
    warnings), for a cached model as for one that could never load."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-chat"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env = {k: v for k, v in env.items() if not k.startswith("HF_")} | {
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens: the hub is away
        "HF_HUB_CACHE": str(cache),
        "PYTHONPATH": str(ROOT),
    }
    done = run_python("-c", PROBE, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    cached = [line.split() for line in lines if line.startswith("cached:")]
    refused = [line for line in lines if line.startswith("refused:")]
    assert [words[2] for words in cached] == ["GPT2LMHeadModel"] * 2, lines
    assert all(float(words[1]) < 15 for words in cached), lines  # retries: 23 s+
    assert len(refused) == 2, lines
    for line in refused:
        assert float(line.split()[1]) < 15, line
        assert "cannot be reached from this machine" in line, line
        assert "'someone/not-downloaded' is not in the local Hugging Face cache" in line, line
    assert "hf download someone/not-downloaded" in refused[1]  # the trainer's way out
    assert "Retrying" not in done.stderr
    assert done.stderr.count("from the local cache") == 2, done.stderr[-3000:]
