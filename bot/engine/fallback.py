"""The engine's fallback path: ``model.generate`` for one request at a time.

Beam search (``NUM_BEAMS`` > 1) and models the slot decoder does not cover
(:func:`bot.engine.decoder.supports`) are served this way, between the batch's decoding steps:
slower, but any Hugging Face causal LM answers.
"""

from __future__ import annotations

import threading

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from bot.engine.requests import Request


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> bool:  # type: ignore[override]
        return self.event.is_set()


def generate_apart(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[int], request: Request
) -> list[int]:
    """The tokens ``model.generate`` adds to prompt ``ids`` under the request's settings (a stop
    token included when one ended it); stops early when the request is cancelled."""
    params = request.params
    input_ids = torch.tensor([ids], device=model.device)
    sampling = {}
    if params.num_beams <= 1:
        sampling = {
            "do_sample": params.temperature > 0.001,
            "temperature": max(params.temperature, 0.001),
            "top_p": params.top_p,
            "top_k": params.top_k,
        }
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            num_beams=params.num_beams,
            repetition_penalty=params.repetition_penalty,
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens,
            eos_token_id=sorted(request.stop_ids),
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([_Cancelled(request.cancelled)]),
            **sampling,
        )
    return output[0, len(ids) :].tolist()
