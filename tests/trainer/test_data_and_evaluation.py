"""The loss mask, turn-boundary cutting, packing, and perplexity that can be checked by hand."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dataset_tools.dialogue_format import USER_TAG, render_dialogue
from dataset_tools.sample_data import generate_dialogues
from models.scratch_tokenizer import train_scratch_tokenizer
from trainer.data import IGNORE_INDEX, TokenizedDialogue, pack, tokenize_dialogue
from trainer.evaluation import distinct_n, perplexity


@pytest.fixture(scope="module")
def tokenizer():
    return train_scratch_tokenizer((render_dialogue(d) for d in generate_dialogues()), 600)


def _labelled_text(tokenizer, tokenized):
    kept = [
        t
        for t, label in zip(tokenized.input_ids, tokenized.labels, strict=True)
        if label != IGNORE_INDEX
    ]
    return tokenizer.decode(kept)


def test_loss_mask_covers_exactly_the_replies_and_their_stop_tag(tokenizer):
    turns = ["Привет, как дела? 😊", "Хорошо, спасибо!", "А погода?", "Солнечно."]
    tokenized = tokenize_dialogue(turns, tokenizer, loss_on="replies")
    assert _labelled_text(tokenizer, tokenized) == (
        f" Хорошо, спасибо!{USER_TAG} Солнечно.{tokenizer.eos_token}"
    )
    everything = tokenize_dialogue(turns, tokenizer, loss_on="all")
    assert everything.labels == everything.input_ids


def test_a_dialogue_ending_on_a_user_turn_puts_no_loss_on_it(tokenizer):
    tokenized = tokenize_dialogue(["Вопрос?", "Ответ.", "Ещё вопрос?"], tokenizer)
    assert _labelled_text(tokenizer, tokenized) == f" Ответ.{USER_TAG}"


def test_long_dialogue_is_cut_on_a_turn_boundary(tokenizer):
    turns = ["Привет!", "Привет, рад тебя слышать.", "Как дела?", "Хорошо. " * 30]
    full = tokenize_dialogue(turns, tokenizer, max_length=1000)
    short = tokenize_dialogue(turns, tokenizer, max_length=len(full.input_ids) - 5)
    two_turns = tokenize_dialogue(turns[:2], tokenizer, max_length=1000)
    # the cut keeps whole turns (here three: user, reply, user) and no EOS
    assert tokenizer.decode(short.input_ids).endswith("Как дела?")
    assert short.input_ids[: len(two_turns.input_ids) - 1] == two_turns.input_ids[:-1]
    assert tokenize_dialogue(turns, tokenizer, max_length=3) is None


def test_packing_fills_blocks_and_keeps_every_token():
    dialogues = [TokenizedDialogue(list(range(n)), list(range(n))) for n in (5, 7, 3, 9)]
    blocks = pack(dialogues, block_size=8)
    assert [len(b.input_ids) for b in blocks] == [8, 8, 8]
    flat = [token for block in blocks for token in block.input_ids]
    assert flat == [token for d in dialogues for token in d.input_ids]


def _constant_model(vocab_size: int, seed: int = 0) -> tuple[GPT2LMHeadModel, torch.Tensor]:
    """A GPT-2 whose next-token distribution is the same fixed p at every position.

    All weights zero except the final layer norm's bias b: the hidden state is then b at every
    position, so logits = wte @ b, which we set to chosen values through wte's first column.
    """
    config = GPT2Config(vocab_size=vocab_size, n_layer=1, n_embd=8, n_head=1, n_positions=64)
    model = GPT2LMHeadModel(config)
    logits = torch.randn(vocab_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = logits  # tied to lm_head
    return model, torch.log_softmax(logits, dim=0)


def test_perplexity_is_token_weighted_and_matches_a_hand_computation(tokenizer):
    model, log_p = _constant_model(len(tokenizer))
    dialogues = [["Привет!", "Здравствуй, рад тебя видеть, как дела?"], ["Да?", "Нет."]]
    result = perplexity(model, tokenizer, dialogues, batch_size=1)

    nll_all, n_all, nll_replies, n_replies = 0.0, 0, 0.0, 0
    for turns in dialogues:
        t = tokenize_dialogue(turns, tokenizer, loss_on="replies")
        for token, label in zip(t.input_ids[1:], t.labels[1:], strict=True):
            nll_all -= log_p[token].item()
            n_all += 1
            if label != IGNORE_INDEX:
                nll_replies -= log_p[token].item()
                n_replies += 1
    assert result.tokens_all == n_all and result.tokens_replies == n_replies
    assert result.all == pytest.approx(math.exp(nll_all / n_all), rel=1e-4)
    assert result.replies == pytest.approx(math.exp(nll_replies / n_replies), rel=1e-4)
    # batching must not change it: padding is never scored
    batched = perplexity(model, tokenizer, dialogues, batch_size=2)
    assert batched.all == pytest.approx(result.all, rel=1e-4)


def test_uniform_model_has_perplexity_equal_to_vocabulary_size(tokenizer):
    model, _ = _constant_model(len(tokenizer))
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
    result = perplexity(model, tokenizer, [["Привет!", "Пока."]])
    assert result.all == pytest.approx(len(tokenizer), rel=1e-4)


def test_distinct_n():
    assert distinct_n(["а б а б"], 1) == 0.5
    assert distinct_n(["а б в"], 2) == 1.0
    assert distinct_n([], 1) == 0.0
