"""Loading a model for serving, and the thread it is loaded in.

Any Hugging Face causal-LM directory or hub id loads; the CPU conversions (int8, oneDNN) are
applied here, once, so that the engine only ever sees a ready model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import utils as hub_utils
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from bot.engine import onednn
from bot.engine.allocator import returning_freed_memory
from bot.engine.quantize import load_int8_low_memory, quantize_int8

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """The model cannot be loaded; the message is one line telling the operator what to set."""


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def load_model(
    path: str,
    device: str = "auto",
    dtype: str = "float32",
    quantize: str = "none",
    cpu_onednn: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any Hugging Face causal-LM directory or hub id, or fail with one clear line.

    ``quantize="int8"`` converts the projections to dynamic int8 (CPU only, see
    bot.engine.quantize); ``cpu_onednn`` runs float32 projections through oneDNN on a CPU (see
    bot.engine.onednn). What the conversions free goes back to the system (bot.engine.allocator).
    """
    with returning_freed_memory():
        return _load_model(path, device, dtype, quantize, cpu_onednn)


def _load_model(
    path: str, device: str, dtype: str, quantize: str, cpu_onednn: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    local = Path(path)
    looks_local = local.is_absolute() or path.startswith(".") or local.parent.exists()
    if not local.exists() and (looks_local or path.count("/") != 1):  # not a hub id either
        raise ModelLoadError(
            f"no model at {path!r}: train one (`make finetune PROFILE=tiny-scratch`) or set "
            "MODEL_PATH to a Hugging Face model directory or hub id"
        )
    # Transformers' "Loading weights" bar would land in the service's log, or under the console
    # chat's prompt; the log lines around loading already say what is loaded and how long it took.
    # A first download from the hub (1.5 GB for RuGPT-3 medium) keeps its bar: minutes of silence
    # would look like a hang.
    hf_logging.disable_progress_bar()
    if not hub_constants.HF_HUB_DISABLE_PROGRESS_BARS:
        hub_utils.enable_progress_bars()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        target = pick_device(device)
        use_onednn = (
            cpu_onednn and quantize == "none" and target.type == "cpu" and dtype == "float32"
        ) and onednn.available()
        # int8 from local safetensors: quantized while loading, the float32 model never whole
        model = load_int8_low_memory(local) if local.is_dir() and quantize == "int8" else None
        converted = model is not None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"cannot load the model from MODEL_PATH={path!r}: {reason}. Set MODEL_PATH to a "
            "Hugging Face model directory (e.g. checkpoints/latest after `make finetune`)"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantize == "int8":
        if target.type != "cpu":
            raise ModelLoadError(
                "MODEL_QUANTIZE=int8 is for CPUs; on a GPU use MODEL_DTYPE=bfloat16"
            )
        if dtype != "float32":
            raise ModelLoadError("MODEL_QUANTIZE=int8 needs MODEL_DTYPE=float32")
        if not converted:
            quantize_int8(model)
    elif use_onednn and not converted:
        onednn.to_onednn(model)
    model.to(target)
    model.eval()
    return model, tokenizer


async def run_in_own_thread(function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` in a new thread that ends when it returns (for loading the model).

    Why not ``asyncio.to_thread``: its threads live on, and so does the OpenMP thread team of any
    thread that ran a parallel torch operation (loading and converting weights does). With more
    OpenMP threads alive than cores, libgomp stops spin-waiting between parallel regions and puts
    its threads to sleep instead, and every matrix product of the engine's worker pays for the
    wake-ups: measured on the 2-core machine, a batch-8 decoding step took ~30% longer after the
    model was loaded in a thread that stayed alive. A thread that has ended takes its team with it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as error:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    thread = threading.Thread(target=run, name=f"run-{getattr(function, '__name__', 'call')}")
    thread.start()
    try:
        return await future
    finally:
        thread.join()  # already returned: the thread only has to exit
