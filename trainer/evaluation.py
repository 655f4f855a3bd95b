"""How good a chat model is on held-out dialogues: perplexity and reply metrics.

Perplexity is token-weighted: the summed negative log-likelihood of all scored tokens divided by
their count, then exponentiated (averaging per-batch perplexities, as some scripts do, overweights
short batches). It is reported twice: over reply tokens (what the bot will say) and over all tokens.

Reply metrics come from generation: for a sample of dialogues the model answers the context before
the last reply, and its answer is compared with the reference by BLEU and chrF (sacrebleu), and
judged for variety by distinct-1/2 (the share of unique words / word pairs among all generated).
Replies are generated the way the bot generates them: sampling with the temperature, top-p, top-k
and repetition penalty of the model's ``generation_config.json`` (what ``make finetune`` writes,
the bot's defaults), seeded per pair so that a run repeats exactly. Greedy decoding with no
repetition control (``--greedy``) describes a decoder the bot never uses; it stays as an option
for comparison with older figures. ``metrics.json`` records which decoding produced them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import sacrebleu
import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from dataset_tools.dialogue_format import USER_TAG, parse_reply, render_prompt
from trainer.data import IGNORE_INDEX, PadCollator, tokenize_dialogue


@dataclass(frozen=True)
class Perplexity:
    """Summed NLL and token counts, so that results from parts can be combined exactly."""

    nll_replies: float
    tokens_replies: int
    nll_all: float
    tokens_all: int

    @property
    def replies(self) -> float:
        return math.exp(self.nll_replies / self.tokens_replies) if self.tokens_replies else math.nan

    @property
    def all(self) -> float:
        return math.exp(self.nll_all / self.tokens_all) if self.tokens_all else math.nan


@torch.no_grad()
def token_nll(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Per-token negative log-likelihood of each next token, shape (batch, length - 1)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view(targets.shape)


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dialogues: Sequence[Sequence[str]],
    *,
    max_length: int = 512,
    batch_size: int = 8,
) -> Perplexity:
    """Token-weighted perplexity of the dialogues, each scored on its own (no packing)."""
    model.eval()
    device = next(model.parameters()).device
    collate = PadCollator(tokenizer.pad_token_id)
    rows = []
    for turns in dialogues:
        replies = tokenize_dialogue(turns, tokenizer, loss_on="replies", max_length=max_length)
        if replies is not None:
            rows.append({"input_ids": replies.input_ids, "labels": replies.labels})
    sums = [0.0, 0, 0.0, 0]
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size]).items()}
        nll = token_nll(model, batch["input_ids"], batch["attention_mask"])
        scored_all = batch["attention_mask"][:, 1:].bool()
        scored_replies = batch["labels"][:, 1:] != IGNORE_INDEX
        sums[0] += nll[scored_replies].sum().item()
        sums[1] += int(scored_replies.sum().item())
        sums[2] += nll[scored_all].sum().item()
        sums[3] += int(scored_all.sum().item())
    return Perplexity(sums[0], sums[1], sums[2], sums[3])


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams over all word n-grams in the texts (0 when there are none)."""
    grams = [
        tuple(words[i : i + n])
        for words in (t.lower().split() for t in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def context_reply_pairs(
    dialogues: Sequence[Sequence[str]], n: int, seed: int = 0
) -> list[tuple[list[str], str]]:
    """Up to n (context ending in a user turn, reference reply) pairs, a seeded sample."""
    pairs = []
    for turns in dialogues:
        last_reply = len(turns) - 1 if len(turns) % 2 == 0 else len(turns) - 2
        if last_reply >= 1:
            pairs.append((list(turns[:last_reply]), turns[last_reply]))
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


@dataclass(frozen=True)
class Decoding:
    """How evaluation generates replies; ``metrics.json`` keeps it beside the figures."""

    mode: str  # "sampled" (the bot's settings) or "greedy" (no randomness, no penalty)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 40

    @classmethod
    def greedy(cls, max_new_tokens: int = 40) -> Decoding:
        return cls("greedy", max_new_tokens=max_new_tokens)

    @classmethod
    def of_model(cls, model: PreTrainedModel, seed: int = 0, max_new_tokens: int = 40) -> Decoding:
        """The sampling the model's ``generation_config.json`` sets (the bot's defaults where it
        sets nothing, as for a base model)."""
        config = getattr(model, "generation_config", None) or GenerationConfig()
        if not config.do_sample:  # a base model's config: the bot samples anyway
            config = GenerationConfig(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.15)
        return cls(
            "sampled",
            temperature=float(config.temperature or 1.0),
            top_p=float(config.top_p or 1.0),
            top_k=int(config.top_k or 0),
            repetition_penalty=float(config.repetition_penalty or 1.0),
            seed=seed,
            max_new_tokens=max_new_tokens,
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.no_grad()
def generate_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    context: Sequence[str],
    *,
    decoding: Decoding | None = None,
    max_length: int = 512,
    seed_offset: int = 0,
) -> str:
    """The reply to a context, decoded as ``decoding`` says (greedy when not given). A sampled
    reply draws from its own seed (``decoding.seed + seed_offset``), so that a run repeats and
    one pair's reply does not depend on the others."""
    decoding = decoding or Decoding.greedy()
    device = next(model.parameters()).device
    ids = tokenizer(render_prompt(context), add_special_tokens=False)["input_ids"]
    ids = ids[-(max_length - decoding.max_new_tokens) :]
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(USER_TAG)]
    sampling: dict[str, object] = {"do_sample": False}
    if decoding.mode == "sampled":
        sampling = {
            "do_sample": True,
            "temperature": decoding.temperature,
            "top_p": decoding.top_p,
            "top_k": decoding.top_k,
            "repetition_penalty": decoding.repetition_penalty,
        }
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed + seed_offset)
        output = model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=decoding.max_new_tokens,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    return parse_reply(
        tokenizer.decode(output[0, len(ids) :], skip_special_tokens=False),
        eos_token=tokenizer.eos_token,
    )


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dialogues: Sequence[Sequence[str]],
    *,
    max_length: int = 512,
    n_generate: int = 50,
    n_show: int = 3,
    decoding: Decoding | None = None,
) -> dict[str, object]:
    """Everything ``metrics.json`` and ``trainer evaluate`` report about a model on a split;
    replies decoded as the bot decodes (see the module docstring) unless ``decoding`` says."""
    decoding = decoding or Decoding.of_model(model)
    ppl = perplexity(model, tokenizer, dialogues, max_length=max_length)
    pairs = context_reply_pairs(dialogues, n_generate)
    generated = [
        generate_reply(model, tokenizer, c, decoding=decoding, max_length=max_length, seed_offset=i)
        for i, (c, _) in enumerate(pairs)
    ]
    references = [reference for _, reference in pairs]
    metrics: dict[str, object] = {
        "dialogues": len(dialogues),
        "perplexity_replies": ppl.replies,
        "perplexity_all": ppl.all,
        "eval_loss_replies": ppl.nll_replies / ppl.tokens_replies if ppl.tokens_replies else None,
        "tokens_replies": ppl.tokens_replies,
        "tokens_all": ppl.tokens_all,
        "generated_pairs": len(pairs),
        "decoding": decoding.as_dict(),
    }
    if pairs:
        metrics["bleu"] = sacrebleu.corpus_bleu(generated, [references]).score
        metrics["chrf"] = sacrebleu.corpus_chrf(generated, [references]).score
        metrics["distinct_1"] = distinct_n(generated, 1)
        metrics["distinct_2"] = distinct_n(generated, 2)
        metrics["samples"] = [
            {"context": c, "reference": r, "generated": g}
            for (c, r), g in list(zip(pairs, generated, strict=True))[:n_show]
        ]
    return metrics
