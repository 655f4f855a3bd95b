"""Choosing each row's next token inside a batch (``bot.engine.sampling``) against Hugging Face's
own logits processors, in ``generate``'s order: every row gets what ``generate`` would do to its
scores with its own settings, whatever else shares the batch."""

import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bot.engine.sampling import SamplingParams, choose_tokens

VOCAB = 1000
STOP = 7


def _seen(histories: list[list[int]]) -> torch.Tensor:
    seen = torch.zeros(len(histories), VOCAB, dtype=torch.bool)
    for row, history in enumerate(histories):
        seen[row, history] = True
    return seen


def _hf_scores(row: torch.Tensor, history: list[int], params: SamplingParams, banned: bool):
    """One row's scores as ``generate`` leaves them before sampling."""
    scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(
        torch.tensor([history]), row[None].clone()
    )
    if banned:  # MinNewTokensLengthLogitsProcessor: no stop token before the minimum length
        scores[:, STOP] = float("-inf")
    if params.temperature <= 1e-3:
        return scores
    scores = TemperatureLogitsWarper(params.temperature)(None, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    return TopPLogitsWarper(params.top_p)(None, scores)


def test_greedy_rows_take_the_best_token_after_their_own_repetition_penalty_and_stop_ban():
    torch.manual_seed(0)
    histories = [[3, 11, 42], [42, 5], [STOP, 9, 100], [1, 2]]
    logits = torch.randn(len(histories), VOCAB)
    for row, history in enumerate(histories):  # the seen tokens lead, so the penalty decides
        logits[row, history] = torch.linspace(6.0, 5.0, len(history))
        logits[row, 500 + row] = 4.5
    logits[2, STOP] = 9.0
    logits[3, 0] = -0.5
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=0.0, repetition_penalty=1.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.1),
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
    ]
    banned = torch.tensor([False, False, True, False])
    stop_mask = torch.zeros(VOCAB, dtype=torch.bool)
    stop_mask[STOP] = True
    before = logits.clone()

    chosen = choose_tokens(logits, params, _seen(histories), banned, stop_mask)

    expected = [
        int(_hf_scores(logits[i], h, p, bool(banned[i])).argmax())
        for i, (h, p) in enumerate(zip(histories, params, strict=True))
    ]
    assert chosen.tolist() == expected
    assert expected != logits.argmax(dim=-1).tolist()  # the penalty and the ban changed rows
    assert torch.equal(logits, before)  # the caller's logits are left as they were


def test_a_sampled_row_draws_from_exactly_generates_distribution_beside_other_rows():
    torch.manual_seed(1)
    history = [4, 8, 15, 16, 23, 42]
    row = torch.randn(VOCAB)
    row[history] = 3.0  # among the best, until penalised
    row[[100, 200, 300]] = torch.tensor([2.8, 2.6, 2.5])
    mine = SamplingParams(temperature=0.7, top_k=6, top_p=0.8, repetition_penalty=1.3)
    other = SamplingParams(temperature=0.0, repetition_penalty=1.0)
    logits = torch.stack([row, torch.randn(VOCAB)])
    seen = _seen([history, [1]])
    no_ban = torch.tensor([False, False])
    stop_mask = torch.zeros(VOCAB, dtype=torch.bool)
    generator = torch.Generator().manual_seed(2)

    draws = torch.stack(
        [
            choose_tokens(logits, [mine, other], seen, no_ban, stop_mask, generator)[0]
            for _ in range(3000)
        ]
    )

    expected = _hf_scores(row, history, mine, banned=False).softmax(dim=-1)[0]
    support = set(expected.nonzero()[:, 0].tolist())
    counts = torch.bincount(draws, minlength=VOCAB).float() / len(draws)
    assert set(draws.unique().tolist()) == support
    assert len(support) > 1
    assert (counts - expected).abs().max() < 0.03
