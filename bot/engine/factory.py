"""Which backend the settings ask for, built and started: the one place that decides.

``LLM_BASE_URL`` set → :class:`~bot.engine.remote.RemoteBackend` (no model in this process);
otherwise the local :class:`~bot.engine.generation.GenerationEngine`, loaded and warmed up, as
the bot, the console chat and ``python -m bot serve`` all run it.
"""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

from bot.config import Settings
from bot.engine.backend import ReplyBackend
from bot.engine.cpu_attention import KernelUnavailable, decode_attention_for
from bot.engine.generation import GenerationEngine
from bot.engine.own_thread import run_in_own_thread
from bot.engine.remote import RemoteBackend
from bot.logs import adopt_library_logs
from dataset_tools.dialogue_format import missing_speaker_tags
from models.loading import ModelLoadError, load_model

logger = logging.getLogger(__name__)


def warn_if_not_dialogue_tuned(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """One warning at start when the model never learned this project's dialogue format (its
    tokenizer lacks the speaker tags the trainer adds): the usual cause is pointing MODEL_PATH
    at the base RuGPT-3, whose replies then run on and on, speaking for both sides."""
    if missing := missing_speaker_tags(tokenizer.get_vocab()):
        logger.warning(
            "the model at %s was not fine-tuned on this project's dialogue format (its "
            "tokenizer has no %s token): replies will ramble; fine-tune it first "
            "(`make finetune`, docs/training.md) and point MODEL_PATH at the result",
            where,
            " / ".join(missing),
        )


async def open_local_engine(settings: Settings) -> GenerationEngine:
    """Load ``MODEL_PATH`` and start the engine with the settings' batch, cache and limits."""
    model, tokenizer = await run_in_own_thread(
        load_model,
        settings.model_path,
        settings.model_device,
        settings.model_dtype,
        settings.model_quantize,
        settings.model_cpu_onednn,
    )
    warn_if_not_dialogue_tuned(tokenizer, f"MODEL_PATH={settings.model_path}")
    try:  # built in a thread of its own: the first build compiles for ~30 s
        attention = await run_in_own_thread(
            decode_attention_for, model, settings.cpu_attention_kernel
        )
    except KernelUnavailable as error:
        raise ModelLoadError(str(error)) from error
    engine = GenerationEngine(
        model,
        tokenizer,
        persona=settings.system_prompt or None,
        context_tokens=settings.context_tokens,
        reply_tokens=settings.reply_tokens,
        queue_size=settings.queue_size,
        timeout_s=settings.request_timeout_s,
        max_batch=settings.max_batch,
        cache_mb=settings.kv_cache_mb,
        prefill_chunk=settings.prefill_chunk_tokens,
        threads=settings.engine_threads or None,
        attention=attention,
    )
    engine.start(warm_up=True)
    try:
        await engine.ready()
    except Exception as error:
        engine.close()
        raise ModelLoadError(
            f"the model at MODEL_PATH={settings.model_path!r} loaded but could not generate "
            f"(warm-up failed: {error}); check MODEL_DEVICE, MODEL_DTYPE and free memory"
        ) from error
    logger.info(
        "model %s ready: context %d tokens, reply %d tokens",
        settings.model_path,
        engine.context_tokens,
        engine.reply_tokens,
    )
    return engine


async def open_backend(settings: Settings) -> ReplyBackend:
    """The remote backend when ``LLM_BASE_URL`` is set, else the local engine."""
    adopt_library_logs()  # transformers is imported by now: its warnings in our format, once
    if not settings.llm_base_url:
        return await open_local_engine(settings)
    if settings.num_beams > 1:
        logger.warning("NUM_BEAMS is ignored with LLM_BASE_URL: the server samples")
    backend = await RemoteBackend.connect(
        settings.llm_base_url,
        api_key=settings.llm_api_key.get_secret_value() if settings.llm_api_key else None,
        model=settings.llm_model,
        tokenizer_path=settings.tokenizer_path or settings.model_path,
        persona=settings.system_prompt or None,
        context_tokens=settings.context_tokens,
        reply_tokens=settings.reply_tokens,
        timeout_s=settings.llm_timeout_s,
        connect_timeout_s=settings.llm_connect_timeout_s,
    )
    tokenizer_path = settings.tokenizer_path or settings.model_path
    warn_if_not_dialogue_tuned(backend.tokenizer, f"TOKENIZER_PATH={tokenizer_path}")
    return backend
