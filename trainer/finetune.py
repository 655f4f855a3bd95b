"""The fine-tuning recipe, top to bottom as `run_clm.py` reads.

Set up → load splits → load (or build) model and tokenizer → tokenize with the reply mask → pack
→ HF ``Trainer`` (CPU or GPU, periodic eval, best checkpoint, resumable) → save a standard model
directory → evaluate → metrics.json, loss.png, experiments table, ``checkpoints/latest``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from dataset_tools.dialogue_format import USER_TAG, render_dialogue
from models.loading import count_parameters
from models.scratch_tokenizer import train_scratch_tokenizer
from trainer import data as training_data
from trainer.evaluation import evaluate_model, perplexity
from trainer.experiments import append_experiment, plot_loss, point_latest, write_metrics
from trainer.lora import apply_lora, save_merged, trainable_parameters
from trainer.model_card import data_summary, write_model_card
from trainer.modeling import build_scratch_model, load_pretrained
from trainer.profiles import Profile
from trainer.progress import use_progress

logger = logging.getLogger(__name__)

#: Sampling defaults written into generation_config.json; the bot reads them as its defaults.
REPLY_DEFAULTS = {
    "do_sample": True,
    "temperature": 0.8,
    "top_p": 0.9,
    "top_k": 50,
    "repetition_penalty": 1.15,
    "max_new_tokens": 64,
}


class ResumeError(Exception):
    """``--resume`` was asked for but there is nothing to resume."""


class DistributedError(Exception):
    """Several processes cannot run this as asked; the message says what to change."""


@dataclass(frozen=True)
class Processes:
    """This process's place among those ``torchrun`` started (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Processes:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def main(self) -> bool:
        return self.rank == 0


def split_global_batch(batch_size: int, grad_accum: int, world: int) -> tuple[int, int]:
    """(per-device batch, accumulation) so that per-device × processes × accumulation is the
    profile's global batch (``batch_size × grad_accum``) whatever the number of processes: the
    recipe, and so the loss curve, does not change with the hardware. Accumulation is divided
    first (the per-device batch, and so the memory per device, stays what the profile says)."""
    total = batch_size * grad_accum
    if total % world:
        raise DistributedError(
            f"the global batch {batch_size}×{grad_accum}={total} cannot be split over {world} "
            "processes: choose NPROC dividing it, or --batch-size/--grad-accum"
        )
    per_process = total // world
    device_batch = next(
        b for b in range(min(batch_size, per_process), 0, -1) if per_process % b == 0
    )
    return device_batch, per_process // device_batch


@dataclass(frozen=True)
class FinetuneOptions:
    """Where the data is and where the run goes; the recipe itself is in the profile."""

    profile: Profile
    data_dir: Path = Path("data/processed")
    checkpoints_dir: Path = Path("checkpoints")
    run_name: str | None = None
    resume: bool = False
    seed: int = 42
    limit_train: int | None = None
    limit_val: int | None = None
    n_generate: int = 50
    logging_steps: int = 10
    progress: bool = True
    save_total_limit: int = 2  # checkpoints kept during training (each ~3× the model's size)
    data_seed: int | None = None  # order of the training rows; default: seed


def declare_tied_weights(model: PreTrainedModel) -> None:
    """Say which weights a checkpoint leaves out because they are tied (GPT-2's ``lm_head``).

    ``save_pretrained`` drops a tied weight; when the Trainer loads the best checkpoint at the
    end it compares what was missing with ``_keys_to_ignore_on_save`` and, on a match, re-ties
    the weights in silence. GPT-2 leaves that list empty, so every correct run ended with
    "There were missing keys in the checkpoint model loaded: ['lm_head.weight']". Declaring the
    tied keys makes the comparison match (what is saved does not change: they were dropped).
    """
    if getattr(model.config, "tie_word_embeddings", False):
        tied = getattr(model, "all_tied_weights_keys", None) or model._tied_weights_keys or {}
        model._keys_to_ignore_on_save = set(tied)


def agree_with_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the model's configs the tokenizer's special tokens and name its loss, before the
    Trainer looks: otherwise it "aligns" them itself and warns that the tokenizer has new
    PAD/BOS/EOS tokens, and GPT-2 (whose class name names no loss) warns that ``loss_type=None``
    is unrecognized, on every correct run. Both would use these very values."""
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        if value is not None:
            setattr(model.config, name, value)
            setattr(model.generation_config, name, value)
    eos = tokenizer.eos_token_id
    model.config.eos_token_id = eos
    stops = model.generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    model.generation_config.eos_token_id = [eos, *(t for t in stops if t not in (None, eos))]
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"  # what Transformers falls back to, after its warning


class ThroughputCallback(TrainerCallback):
    """Adds real (non-padding) tokens per second to every log line the progress bar prints."""

    def __init__(self) -> None:
        self.started = 0.0
        self.tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.started = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        elapsed = time.perf_counter() - self.started
        if logs is not None and elapsed > 0 and "loss" in logs:
            logs["tokens_per_s"] = round(
                (state.num_input_tokens_seen - self.tokens_at_start) / elapsed, 1
            )


def _find_run_to_resume(options: FinetuneOptions) -> Path:
    if options.run_name:
        run_dir = options.checkpoints_dir / options.run_name
        if not run_dir.is_dir() or get_last_checkpoint(str(run_dir)) is None:
            raise ResumeError(f"{run_dir}: no saved checkpoint to resume from")
        return run_dir
    if not options.checkpoints_dir.is_dir():
        raise ResumeError(f"no run with a saved checkpoint under {options.checkpoints_dir}")
    candidates = [
        d
        for d in options.checkpoints_dir.iterdir()
        if d.is_dir() and not d.is_symlink() and get_last_checkpoint(str(d)) is not None
    ]
    if not candidates:
        raise ResumeError(f"no run with a saved checkpoint under {options.checkpoints_dir}")
    return max(candidates, key=lambda d: d.stat().st_mtime)


def _model_and_tokenizer(
    profile: Profile, run_dir: Path, train: list[list[str]], resume: bool, main: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if profile.base_model is not None:
        return load_pretrained(profile.base_model)
    if resume and (run_dir / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(
            run_dir
        )  # the one the checkpoint was trained with
    else:
        # Every process trains it (deterministic: the same data in the same order; checked
        # across processes in _check_same_tokenizer); only the main one writes it.
        tokenizer = train_scratch_tokenizer((render_dialogue(t) for t in train), profile.vocab_size)
        if main:
            tokenizer.save_pretrained(run_dir)
    return build_scratch_model(tokenizer, profile.scratch_config), tokenizer


def _check_same_tokenizer(tokenizer: PreTrainedTokenizerBase, processes: Processes) -> None:
    """Processes that tokenised differently would train one model on mismatched ids, silently."""
    if processes.world == 1 or not torch.distributed.is_initialized():
        return
    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    digests: list[str | None] = [None] * processes.world
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise DistributedError("the processes built different tokenizers; train on one first")


def _distributed_args(processes: Processes) -> dict[str, Any]:
    """DDP through the Trainer: gloo on a CPU (NCCL needs GPUs), over the loopback interface."""
    if processes.world == 1:
        return {}
    if torch.cuda.is_available():
        return {"ddp_backend": "nccl"}
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return {"ddp_backend": "gloo", "use_cpu": True}


def _precision() -> dict[str, bool]:
    """bf16 where the GPU has it, else fp16 on a GPU; float32 on a CPU (no fast bf16 there)."""
    if not torch.cuda.is_available():
        return {}
    return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}


def finetune(options: FinetuneOptions) -> dict[str, Any]:
    """Train, save, evaluate; return the metrics written to ``metrics.json``."""
    profile = options.profile
    processes = Processes.from_env()
    if processes.world > 1 and not options.run_name:
        raise DistributedError(
            "several processes write one run: pass --run-name (make finetune NPROC=N does)"
        )
    device_batch, accumulation = split_global_batch(
        profile.batch_size, profile.grad_accum, processes.world
    )
    set_seed(options.seed)
    if options.resume:
        run_dir = _find_run_to_resume(options)
    else:
        name = options.run_name or f"{profile.name}-{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = options.checkpoints_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)

    train = training_data.read_dialogues(options.data_dir / "train.parquet", options.limit_train)
    val = training_data.read_dialogues(options.data_dir / "val.parquet", options.limit_val)
    if not val:  # e.g. a 100/0/0 split: evaluate on a slice of train rather than not at all
        logger.warning("val split is empty: evaluating on the first 5%% of train")
        val = train[: max(1, len(train) // 20)]
    model, tokenizer = _model_and_tokenizer(profile, run_dir, train, options.resume, processes.main)
    model.generation_config = GenerationConfig(
        **REPLY_DEFAULTS,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(USER_TAG)],
        pad_token_id=tokenizer.pad_token_id,
    )
    logger.info("model: %s parameters", f"{count_parameters(model):,}")
    declare_tied_weights(model)
    agree_with_tokenizer(model, tokenizer)
    if profile.lora_r > 0:
        model = apply_lora(
            model,
            tokenizer,
            profile.lora_r,
            profile.lora_alpha,
            profile.lora_dropout,
            profile.gradient_checkpointing,
        )
        logger.info("LoRA: %s parameters train", f"{trainable_parameters(model):,}")

    def blocks(dialogues: list[list[str]]) -> training_data.BlockDataset:
        tokenized = training_data.tokenize_all(
            dialogues, tokenizer, loss_on=profile.loss_on, max_length=profile.max_length
        )
        return training_data.BlockDataset(training_data.pack(list(tokenized), profile.block_size))

    train_set, val_set = blocks(train), blocks(val)
    before = perplexity(model, tokenizer, val, max_length=profile.max_length)

    args = TrainingArguments(
        output_dir=str(run_dir),
        num_train_epochs=profile.epochs,
        max_steps=profile.max_steps,
        per_device_train_batch_size=device_batch,
        per_device_eval_batch_size=device_batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=profile.learning_rate,
        weight_decay=profile.weight_decay,
        warmup_steps=profile.warmup_steps,
        lr_scheduler_type="cosine",
        activation_checkpointing=profile.gradient_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(),
        eval_strategy="steps",
        eval_steps=profile.eval_steps,
        save_strategy="steps",
        save_steps=profile.eval_steps,
        save_total_limit=options.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        logging_steps=options.logging_steps,
        include_num_input_tokens_seen="non_padding",
        seed=options.seed,
        data_seed=options.seed if options.data_seed is None else options.data_seed,
        report_to="none",
        disable_tqdm=True,  # progress is TrainingProgress's (trainer.progress)
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **_precision(),
        **_distributed_args(processes),
        ddp_find_unused_parameters=False,  # GPT-2 uses every parameter in every step
    )
    _ = args.device  # sets up the process group (gloo/nccl) when there are several processes
    _check_same_tokenizer(tokenizer, processes)
    throughput = ThroughputCallback()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=training_data.PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[throughput],
    )
    use_progress(trainer, options.progress)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if options.resume else None)
    train_time = time.perf_counter() - started

    if not processes.main:  # one set of outputs: the main process writes them
        return {"run": run_dir.name, "rank": processes.rank}
    # the best checkpoint's weights (load_best_model_at_end); with LoRA, merged into the base
    trained = trainable_parameters(trainer.model)
    if profile.lora_r > 0:
        final_model = save_merged(trainer.model, run_dir)
    else:
        trainer.save_model(str(run_dir))
        final_model = trainer.model
    tokenizer.save_pretrained(run_dir)
    model.generation_config.save_pretrained(run_dir)

    eval_metrics = evaluate_model(
        final_model, tokenizer, val, max_length=profile.max_length, n_generate=options.n_generate
    )
    tokens_this_run = trainer.state.num_input_tokens_seen - throughput.tokens_at_start
    metrics: dict[str, Any] = {
        "run": run_dir.name,
        "profile": profile.name,
        "base_model": profile.base_model or "scratch",
        "parameters": count_parameters(final_model),
        "trained_parameters": trained,
        "lora": (
            {"r": profile.lora_r, "alpha": profile.lora_alpha, "adapter": "adapter/"}
            if profile.lora_r > 0
            else None
        ),
        "device": str(trainer.args.device),
        "processes": processes.world,
        "global_batch": device_batch * accumulation * processes.world,
        "per_device_batch": device_batch,
        "grad_accum": accumulation,
        "train_dialogues": len(train),
        "train_tokens": train_set.n_tokens,
        "val_dialogues": len(val),
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "global_step": trainer.state.global_step,
        "train_time_s": round(train_time, 1),
        "tokens_per_s": round(tokens_this_run / max(train_time, 1e-9), 1),
        "train_loss": result.training_loss,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "eval_loss": min(
            (e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e), default=None
        ),
        "perplexity_before_training": before.replies,
        "perplexity": eval_metrics["perplexity_replies"],
        **{k: v for k, v in eval_metrics.items() if k != "perplexity_replies"},
        "profile_settings": {k: v for k, v in asdict(profile).items() if k != "name"},
        "data": data_summary(options.data_dir),
    }
    write_metrics(run_dir, metrics)
    plot_loss(trainer.state.log_history, run_dir / "loss.png", f"{run_dir.name} ({profile.name})")
    write_model_card(run_dir)
    append_experiment(options.checkpoints_dir, metrics)
    point_latest(options.checkpoints_dir, run_dir)
    return metrics
