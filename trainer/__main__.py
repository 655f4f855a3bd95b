"""Command line: ``python -m trainer finetune|evaluate|bench``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dotenv import load_dotenv

from trainer.profiles import DEFAULT_PROFILE, PROFILES, get_profile


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    ft = commands.add_parser("finetune", help="train a chat model on the prepared splits")
    ft.add_argument(
        "--profile",
        default=os.environ.get("PROFILE") or DEFAULT_PROFILE,
        choices=sorted(PROFILES),
        help="recipe defaults (default %(default)s)",
    )
    ft.add_argument(
        "--base-model",
        default=os.environ.get("BASE_MODEL") or None,
        help="hub id or local directory of the base model (env BASE_MODEL)",
    )
    ft.add_argument("--data-dir", type=Path, default=Path("data/processed"))
    ft.add_argument("--checkpoints-dir", type=Path, default=Path("checkpoints"))
    ft.add_argument("--run-name", help="directory name under checkpoints/ (default: profile-time)")
    ft.add_argument(
        "--resume",
        action="store_true",
        help="continue the named run (or the newest one) from its last checkpoint",
    )
    ft.add_argument("--epochs", type=float)
    ft.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    ft.add_argument("--learning-rate", type=float)
    ft.add_argument("--batch-size", type=int)
    ft.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    ft.add_argument("--block-size", type=int, help="tokens per packed training sequence")
    ft.add_argument("--max-length", type=int, help="longest dialogue, cut on a turn boundary")
    ft.add_argument("--eval-steps", type=int, help="evaluate and save every N steps")
    ft.add_argument("--loss-on", choices=["replies", "all"], help="which tokens carry the loss")
    ft.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    ft.add_argument(
        "--lora-r", type=int, help="LoRA rank (0: train every weight); the result is merged"
    )
    ft.add_argument("--lora-alpha", type=int, help="LoRA scaling numerator (default 32)")
    ft.add_argument("--seed", type=int, default=42)
    ft.add_argument("--data-seed", type=int, help="order of the training rows (default: --seed)")
    ft.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps")
    ft.add_argument("--limit-train", type=int, help="use only the first N train dialogues")
    ft.add_argument("--limit-val", type=int, help="use only the first N val dialogues")
    ft.add_argument(
        "--n-generate",
        type=int,
        default=50,
        help="held-out replies generated for BLEU/chrF (default %(default)s)",
    )
    ft.add_argument("--no-progress", action="store_true")
    ft.add_argument(
        "--save-total-limit",
        type=int,
        default=2,
        help="checkpoints kept while training (each ~3x the model's size: weights + optimizer)",
    )

    pu = commands.add_parser(
        "push", help="upload a trained model directory to the Hugging Face Hub (HF_TOKEN)"
    )
    pu.add_argument(
        "--model", type=Path, required=True, help="a run directory, e.g. checkpoints/latest"
    )
    pu.add_argument("--repo-id", required=True, help="user-or-org/model-name on the Hub")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    ev = commands.add_parser("evaluate", help="perplexity and reply metrics of a model on a split")
    ev.add_argument("--model", type=Path, required=True, help="a Hugging Face model directory")
    ev.add_argument("--data", type=Path, required=True, help="a split parquet with 'turns'")
    ev.add_argument("--max-length", type=int, default=512)
    ev.add_argument("--n-generate", type=int, default=50)
    ev.add_argument("--limit", type=int, help="use only the first N dialogues")
    ev.add_argument("--json", type=Path, help="also write the metrics to this file")
    ev.add_argument(
        "--greedy",
        action="store_true",
        help="greedy replies with no repetition penalty (older figures); default: the bot's "
        "sampling from the model's generation_config.json",
    )
    ev.add_argument("--seed", type=int, default=0, help="seed of the sampled replies")
    ev.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="evaluate the model as the bot serves it with MODEL_QUANTIZE=int8",
    )
    ev.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "auto"],
        default="float32",
        help="evaluate the model as the bot serves it on this CPU with MODEL_DTYPE=...: "
        "bfloat16 (and auto where it picks it) runs the packed oneDNN projections",
    )
    return parser


def _finetune(args: argparse.Namespace) -> int:
    from trainer.finetune import FinetuneOptions, finetune

    profile = get_profile(args.profile).override(
        base_model=args.base_model,
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        block_size=args.block_size,
        max_length=args.max_length,
        eval_steps=args.eval_steps,
        loss_on=args.loss_on,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
    )
    metrics = finetune(
        FinetuneOptions(
            profile=profile,
            data_dir=args.data_dir,
            checkpoints_dir=args.checkpoints_dir,
            run_name=args.run_name,
            resume=args.resume,
            seed=args.seed,
            limit_train=args.limit_train,
            limit_val=args.limit_val,
            n_generate=args.n_generate,
            progress=not args.no_progress,
            save_total_limit=args.save_total_limit,
            data_seed=args.data_seed,
            logging_steps=args.logging_steps,
        )
    )
    if "rank" in metrics:  # another process than the main one: it printed nothing, writes nothing
        return 0
    keys = (
        "run",
        "parameters",
        "train_time_s",
        "tokens_per_s",
        "eval_loss",
        "perplexity_before_training",
        "perplexity",
        "perplexity_all",
        "bleu",
        "chrf",
        "distinct_1",
        "distinct_2",
    )
    for key in keys:
        print(f"{key:28} {metrics.get(key)}")
    decoding = metrics.get("decoding") or {}
    print(f"{'replies decoded':28} {decoding.get('mode')} (seed {decoding.get('seed')})")
    print(
        f"model saved in {args.checkpoints_dir / metrics['run']} (checkpoints/latest points here)"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data import read_dialogues
    from trainer.evaluation import Decoding, evaluate_model

    if not args.model.is_dir():
        raise FileNotFoundError(f"{args.model}: model directory not found")
    if args.quantize == "int8" or args.dtype != "float32":
        # The very loading path the bot serves with (shared in models/, not the bot's package).
        from models.loading import ModelLoadError, load_model

        try:
            model, tokenizer = load_model(
                str(args.model), "cpu", args.dtype, args.quantize, cpu_onednn=True
            )
        except ModelLoadError as error:  # one line for the operator, as the others
            raise ValueError(str(error)) from None
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
    dialogues = read_dialogues(args.data, args.limit)
    decoding = Decoding.greedy() if args.greedy else Decoding.of_model(model, seed=args.seed)
    metrics = evaluate_model(
        model,
        tokenizer,
        dialogues,
        max_length=args.max_length,
        n_generate=args.n_generate,
        decoding=decoding,
    )
    for sample in metrics.pop("samples", []):
        print("контекст:", " | ".join(sample["context"]))
        print("эталон:  ", sample["reference"])
        print("модель:  ", sample["generated"])
        print()
    for key, value in metrics.items():
        print(f"{key:20} {value}")
    if args.json:
        args.json.write_text(json.dumps(metrics, ensure_ascii=False, indent=2), encoding="utf-8")
    return 0


def _push(args: argparse.Namespace) -> int:
    from trainer.publish import files_to_upload, push

    print(f"uploading {len(files_to_upload(args.model))} files of {args.model} to {args.repo_id}")
    url = push(args.model, args.repo_id, args.private)
    print(f"published: {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a command; an operator's mistake is one line on stderr and exit code 2."""
    load_dotenv()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    from trainer.finetune import DistributedError, ResumeError
    from trainer.modeling import BaseModelError
    from trainer.publish import PublishError

    try:
        if args.command == "finetune":
            return _finetune(args)
        if args.command == "push":
            return _push(args)
        return _evaluate(args)
    except (
        BaseModelError,
        ResumeError,
        DistributedError,
        PublishError,
        FileNotFoundError,
        ValueError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
