"""What the serving benchmarks share: the model shapes, the random-weight model built in one of
them (no download: ``--shape medium`` is RuGPT-3 medium's), and a process's peak memory."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

SHAPES = {
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 2},
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12},
    "medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
}


def build(shape: str, path: Path) -> None:
    """A random-weight GPT-2 of ``shape`` and a tokenizer as large as its vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dataset_tools.dialogue_format import render_dialogue
    from dataset_tools.sample_data import generate_dialogues
    from models.scratch_tokenizer import train_scratch_tokenizer

    vocab = 50264 if shape != "tiny" else 4096
    texts = (render_dialogue(d) for d in generate_dialogues())
    tokenizer = train_scratch_tokenizer(texts, 4000, pad_to=vocab)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=2048 if shape != "tiny" else 1024,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def peak_rss_kb() -> int:
    """This process's peak resident memory. Not ``ru_maxrss``: Linux carries that across
    ``execve``, so a child started by a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
