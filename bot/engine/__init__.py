"""Inference: the model, the batched engine around it, and the ways the bot reaches it.

- :mod:`bot.engine.backend`: the interface the dialogue service calls (:class:`ReplyBackend`);
- :mod:`bot.engine.generation`: the local engine (continuous batching, prefix cache, streaming)
  over :mod:`~bot.engine.decoder`, :mod:`~bot.engine.sampling`, :mod:`~bot.engine.prefix_cache`;
- :mod:`models.loading`: loading any Hugging Face causal LM, with the CPU conversions
  (:mod:`~models.quantize`, :mod:`~models.onednn`, :mod:`~models.allocator`);
- :mod:`bot.engine.server`: ``python -m bot serve``, the OpenAI-compatible HTTP API over the local
  engine (:mod:`~bot.engine.openai_api` parses and shapes its JSON);
- :mod:`bot.engine.remote`: the backend that sends each turn to such a server (or vLLM);
- :mod:`bot.engine.bench`, :mod:`bot.engine.bench_decode`: the serving benchmarks.
"""

from bot.engine.backend import ReplyBackend
from bot.engine.generation import GenerationEngine
from bot.engine.own_thread import run_in_own_thread
from bot.engine.requests import (
    Completion,
    ContextLengthError,
    EngineBusy,
    EngineClosed,
    EngineTimeout,
    RequestStats,
    stop_token_ids,
)
from bot.engine.sampling import SamplingParams
from models.loading import ModelLoadError, load_model

__all__ = [
    "Completion",
    "ContextLengthError",
    "EngineBusy",
    "EngineClosed",
    "EngineTimeout",
    "GenerationEngine",
    "ModelLoadError",
    "ReplyBackend",
    "RequestStats",
    "SamplingParams",
    "load_model",
    "run_in_own_thread",
    "stop_token_ids",
]
