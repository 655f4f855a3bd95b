"""Which part of a user's history goes into the prompt.

The prompt is the persona exchange + the exchange of facts the user told the bot (``pinned``,
:func:`bot.facts.facts_exchange`: kept right after the persona, so that it changes only when a
fact does and the engine's cached keys/values of the dialogue stay good) + as many of the latest
turns as fit the model's context window minus the reply budget, counted in **tokens**, dropping
whole turns from the oldest first + the old exchanges recalled for this message (``recalled``,
:mod:`bot.recall`: right before the message, after the window, so the window's cached
keys/values are still reused) + the current message. The current message is always kept; if it
alone is too long, it keeps its beginning (recalled exchanges give way first, then the facts).
This is what makes "maximum context length" errors impossible however long a dialogue grows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.db.repository import USER_ROLE, Turn
from dataset_tools.dialogue_format import render_prompt, render_segments

# Turns that try what could make a tokenizer merge across a segment's edge: punctuation and
# digits at the ends, Latin, an emoji, an empty utterance, spaces inside.
_PROBE_TURNS = ("Привет!", "", "Как дела, 2024?", "ok :)", "Всё 👍 хорошо", "a  b", "?")


def segments_add_up(count_tokens: Callable[[str], int]) -> bool:
    """Whether this tokenizer never counts a rendered prompt above the sum of its segments.

    True for GPT-2's byte-level BPE (RuGPT-3, the tiny test models): each segment starts with
    a space before a word or a tag, where its pre-tokenizer splits anyway (the engine's
    incremental encoding of a cached prompt relies on the same), and where it does not (an
    empty utterance), merging the edge saves a token. Then a sum within the budget is a prompt
    within it. Tried on a probe rather than assumed, so that another tokenizer is counted for
    real.
    """
    segments = render_segments(list(_PROBE_TURNS), "Я бот.", open_reply=True)
    whole = count_tokens("".join(s.text for s in segments))
    return whole <= sum(count_tokens(s.text) for s in segments)


def alternate(turns: Sequence[Turn]) -> list[str]:
    """Turn stored messages into the strictly alternating user/bot list the format needs.

    A user message without a reply (the bot crashed, or the reply failed to send) is merged with
    the next user message, so nothing the user said is lost and the roles still alternate. The
    list starts with a user turn.
    """
    merged: list[Turn] = []
    for turn in turns:
        if merged and merged[-1].role == turn.role:
            merged[-1] = Turn(turn.role, f"{merged[-1].text} {turn.text}")
        else:
            merged.append(turn)
    while merged and merged[0].role != USER_ROLE:
        merged.pop(0)
    return [t.text for t in merged]


def build_prompt_turns(
    history: Sequence[Turn],
    count_tokens: Callable[[str], int],
    budget: int,
    persona: str | None,
    trim_step: int = 1,
    pinned: Sequence[str] = (),
    recalled: Sequence[str] = (),
    segments_add_up: bool = False,
) -> list[str]:
    """The turns to render, ending with the current user message, within ``budget`` tokens.

    ``history`` ends with the current user message (it is stored before generation starts).
    Older turns are dropped two at a time (an exchange), so the prompt still starts with a user
    turn; the current message is cut to fit if even it alone is too long.

    With ``trim_step`` > 1 the number of dropped exchanges is rounded up to a multiple of it.
    Why: the engine reuses a dialogue's cached keys/values only while the prompt starts the same
    way. Dropping the fewest exchanges shifts the start on every turn once a dialogue is long, so
    every turn would re-encode the whole context; dropping several at once keeps the start stable
    for several turns, at the price of a few exchanges of memory.
    """
    return fit_turns(
        alternate(history),
        count_tokens,
        budget,
        persona,
        trim_step,
        pinned,
        recalled,
        segments_add_up,
    )


def fit_turns(
    turns: list[str],
    count_tokens: Callable[[str], int],
    budget: int,
    persona: str | None,
    trim_step: int = 1,
    pinned: Sequence[str] = (),
    recalled: Sequence[str] = (),
    segments_add_up: bool = False,
) -> list[str]:
    """:func:`build_prompt_turns` for turns that already alternate (user first and last).

    Also what a remote backend calls when the server says the prompt is still too long for it
    (another tokenizer or a shorter context there): the same turns, a smaller budget.

    ``segments_add_up``: the tokenizer is known to count a prompt at most as the sum of its
    segments (:func:`segments_add_up`), so the chosen prompt is not tokenized again to check.
    """
    if not turns or len(turns) % 2 == 0:
        raise ValueError("history must end with the user's message")
    if len(pinned) % 2 or len(recalled) % 2:
        raise ValueError("pinned and recalled turns must be whole exchanges")

    def estimate(prompt_turns: list[str]) -> int:
        # The prompt's tokens as the sum of its segments' (speaker tags, utterances), each
        # counted once and then cached by the caller's counter: a segment starts at a space,
        # where a BPE pre-tokenizer splits anyway, so the sum is the whole text's count (checked
        # on the real text below). Re-tokenizing the whole prompt for each try of the search
        # cost more than everything else in building it (the window slides by one exchange a
        # message, so nearly every segment was counted for the message before).
        segments = render_segments(prompt_turns, persona, open_reply=True)
        return sum(count_tokens(segment.text) for segment in segments)

    # The message itself comes first, then the facts, then what was recalled.
    if recalled and estimate([*pinned, *recalled, turns[-1]]) > budget:
        recalled = ()
    if pinned and estimate([*pinned, turns[-1]]) > budget:
        pinned = ()
    pinned, recalled = list(pinned), list(recalled)

    def with_memory(window: list[str]) -> list[str]:
        return pinned + window[:-1] + recalled + window[-1:]

    def fits(start: int) -> bool:
        return estimate(with_memory(turns[start:])) <= budget

    # Fewest exchanges dropped such that the rest fits. Dropping more never adds tokens, so a
    # binary search over exchanges counts ~log2(n) prompts instead of one per dropped exchange
    # (this runs on the event loop for every message).
    exchanges = len(turns) // 2  # dropping all of them leaves the message alone
    low, high = 0, exchanges
    while low < high:
        middle = (low + high) // 2
        if fits(2 * middle):
            high = middle
        else:
            low = middle + 1
    if low:
        low = min(-(-low // trim_step) * trim_step, exchanges)
    if segments_add_up:
        return with_memory(turns[2 * low :])
    # One real count of the chosen prompt: where a tokenizer merged across a segment's edge,
    # the sum was short, and more exchanges go until it fits.
    while low < exchanges:
        if count_tokens(render_prompt(with_memory(turns[2 * low :]), persona)) <= budget:
            return with_memory(turns[2 * low :])
        low = min(low + trim_step, exchanges)
    kept = turns[2 * low :]
    if count_tokens(render_prompt(with_memory(kept), persona)) <= budget:
        return with_memory(kept)
    # Only the current message is left and it is still too long: keep its beginning.
    message = kept[-1]
    low, high = 0, len(message)
    while low < high:  # longest prefix that fits, by binary search on characters
        middle = (low + high + 1) // 2
        if count_tokens(render_prompt([message[:middle]], persona)) <= budget:
            low = middle
        else:
            high = middle - 1
    return [message[:low]]
