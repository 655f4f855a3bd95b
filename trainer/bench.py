"""Training throughput: this project's data path against the naive recipe, same model, same data.

The naive recipe (what this product replaces) pads every dialogue to 128 tokens and trains with
batch size 1 and gradient accumulation 16: most of each forward pass is padding. Ours packs
dialogues into full blocks. Both run through the same HF ``Trainer`` with the same optimizer on
the same model shape; what is compared is **real (non-padding) tokens trained per second**.

``--shape small`` is GPT-2 small (12 layers, 768 wide, vocab 50264, as rugpt3small);
``--shape medium`` is RuGPT-3 medium's shape (24 layers, 1024 wide); both random weights from a
config, since the figure of interest is speed, not quality. ``--shape tiny`` is a quick check.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

from dataset_tools.dialogue_format import render_dialogue
from dataset_tools.sample_data import DEFAULT_SAMPLE_PATH
from models.scratch_tokenizer import train_scratch_tokenizer
from trainer import data as training_data

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 2},
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12},
    "medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
}
RUGPT3_VOCAB = 50264


def _load_turns(path: Path, limit: int) -> list[list[str]]:
    import pyarrow.parquet as pq

    column = "turns" if "turns" in pq.ParquetFile(path).schema_arrow.names else "sample"
    rows = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return [r for r in rows if r and all(isinstance(t, str) and t for t in r)][:limit]


def naive_rows(tokenized: list[training_data.TokenizedDialogue], length: int) -> list[dict]:
    """One padded row per dialogue, truncated to ``length`` (the seed's recipe)."""
    return [{"input_ids": d.input_ids[:length], "labels": d.input_ids[:length]} for d in tokenized]


def _run(
    model_config: GPT2Config,
    dataset: Any,
    collator: Any,
    *,
    batch_size: int,
    grad_accum: int,
    steps: int,
    seed: int,
) -> dict[str, float]:
    set_seed(seed)
    model = GPT2LMHeadModel(model_config)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum,
            learning_rate=5e-5,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to="none",
            include_num_input_tokens_seen="non_padding",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_pin_memory=torch.cuda.is_available(),
            seed=seed,
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        started = time.perf_counter()
        trainer.train()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    real = trainer.state.num_input_tokens_seen
    result = {"real_tokens": real, "seconds": round(elapsed, 2), "tokens_per_s": real / elapsed}
    if torch.cuda.is_available():
        result["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def run_bench(
    data: Path,
    shape: str,
    *,
    naive_steps: int,
    packed_steps: int,
    block_size: int = 256,
    batch_size: int = 4,
    limit: int = 5000,
    seed: int = 0,
) -> dict[str, Any]:
    """Both recipes on the same dialogues and model shape; returns both figures and the ratio."""
    turns = _load_turns(data, limit)
    tokenizer = train_scratch_tokenizer((render_dialogue(t) for t in turns), 4000)
    tokenized = list(
        training_data.tokenize_all(turns, tokenizer, loss_on="all", max_length=block_size)
    )
    config = GPT2Config(
        vocab_size=RUGPT3_VOCAB,
        n_positions=2048,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **SHAPES[shape],
    )
    naive = _run(
        config,
        training_data.BlockDataset(
            [
                training_data.TokenizedDialogue(r["input_ids"], r["labels"])
                for r in naive_rows(tokenized, 128)
            ]
        ),
        training_data.PadCollator(tokenizer.pad_token_id, pad_to=128),
        batch_size=1,
        grad_accum=16,
        steps=naive_steps,
        seed=seed,
    )
    packed = _run(
        config,
        training_data.BlockDataset(training_data.pack(tokenized, block_size)),
        training_data.PadCollator(tokenizer.pad_token_id),
        batch_size=batch_size,
        grad_accum=1,
        steps=packed_steps,
        seed=seed,
    )
    mean_len = sum(len(d.input_ids) for d in tokenized) / len(tokenized)
    return {
        "shape": shape,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "dialogues": len(tokenized),
        "mean_dialogue_tokens": round(mean_len, 1),
        "naive": {"recipe": "pad to 128, batch 1, grad accum 16", **naive},
        "packed": {"recipe": f"packed {batch_size} x {block_size}", **packed},
        "ratio": packed["tokens_per_s"] / naive["tokens_per_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.bench", description=__doc__)
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_SAMPLE_PATH,
        help="parquet with 'turns' or 'sample' (default: the bundled sample)",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--naive-steps", type=int, default=3, help="optimizer steps (16 rows each)")
    parser.add_argument("--packed-steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run_bench(
        args.data,
        args.shape,
        naive_steps=args.naive_steps,
        packed_steps=args.packed_steps,
        block_size=args.block_size,
        batch_size=args.batch_size,
    )
    print(
        f"shape {result['shape']} on {result['device']}, {result['dialogues']} dialogues, "
        f"mean {result['mean_dialogue_tokens']} tokens each"
    )
    for key in ("naive", "packed"):
        r = result[key]
        mem = f", peak GPU {r['peak_gpu_mem_gb']} GB" if "peak_gpu_mem_gb" in r else ""
        print(
            f"{key:7} {r['recipe']:36} {r['real_tokens']:>8,} real tokens in {r['seconds']:7.1f} s"
            f" = {r['tokens_per_s']:8.1f} tokens/s{mem}"
        )
    print(f"ratio   packed / naive = {result['ratio']:.2f}x")
    if args.json:
        from benchmarks.machine import describe_machine

        document = {
            "benchmark": "training",
            "machine": describe_machine(),
            "settings": {
                "shape": args.shape,
                "data": str(args.data),
                "block_size": args.block_size,
                "batch_size": args.batch_size,
            },
            "result": result,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
