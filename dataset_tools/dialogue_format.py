"""The one definition of how a dialogue becomes model text, and how model text becomes a reply.

The data tools, the trainer and the bot all import this module, so a model is always trained on
exactly the text it later sees at inference.

Format (the convention of tinkoff-ai/ruDialoGPT, prior art for Russian GPT-2 chat models)::

    @@ПЕРВЫЙ@@ Привет! @@ВТОРОЙ@@ Здравствуй. @@ПЕРВЫЙ@@ Как дела? @@ВТОРОЙ@@ Хорошо.<|endoftext|>

``@@ПЕРВЫЙ@@`` opens a turn of the user (the first speaker), ``@@ВТОРОЙ@@`` a turn of the bot.
Why these tags rather than the seed's ``Вопрос: ... Ответ: ...``: the words "Вопрос"/"Ответ" occur
in ordinary text (so a model cannot tell a tag from content, and users type them), the bot's turn
is not always an answer to a question, and a dialogue of many turns needs tags that name the
speaker, not the role of the text. ``@@`` never occurs in natural Russian, so the tags are cheap to
strip from user text: any run of two or more ``@`` in a user's text is collapsed to one ``@``,
which makes a tag impossible to type.

There is no system role in GPT-2 chat models: a persona is rendered as a synthetic first exchange
(the user asks who the bot is, the bot answers with the persona text) that is always kept at the
head of the prompt.

A reply is cut where the model starts the next speaker's turn (either tag) or emits the EOS text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

USER_TAG = "@@ПЕРВЫЙ@@"
BOT_TAG = "@@ВТОРОЙ@@"
SPEAKER_TAGS = (USER_TAG, BOT_TAG)
EOS_TEXT = "<|endoftext|>"


def missing_speaker_tags(vocabulary: Iterable[str]) -> list[str]:
    """The speaker tags that are not single tokens of this tokenizer's ``vocabulary``
    (``get_vocab()``): the trainer adds them; a model whose tokenizer lacks them was never
    fine-tuned on this format, and its replies will not stop where a turn ends."""
    known = set(vocabulary)
    return [tag for tag in SPEAKER_TAGS if tag not in known]


#: The user's half of the synthetic exchange that carries a persona.
PERSONA_QUESTION = "Расскажи о себе."

_AT_RUN = re.compile(r"@{2,}")
_EOS_LIKE = re.compile(re.escape(EOS_TEXT), re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
# Control and format characters (and U+FFFD, what a half-decoded byte sequence becomes) carry no
# meaning in a chat turn and can break terminals and logs.
_UNPRINTABLE = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200c\u200e\u200f\u2028-\u202e\u2060-\u2064\ufeff\ufffd]"
)
# Where a generated continuation ends: the next tag, a partial tag the model began, or EOS.
_REPLY_END = re.compile(r"@@|<\|endoftext\|>|<\|endoftext", re.IGNORECASE)


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text and whether it is the bot's reply (what a loss mask may keep)."""

    text: str
    is_reply: bool


def sanitize_utterance(text: str) -> str:
    """Make user-supplied text safe to place between tags.

    Speaker tags and the EOS marker are removed so that a user cannot end their own turn and
    speak for the bot (tag injection); control characters go; whitespace, including newlines,
    becomes single spaces, because the format has no meaning for line breaks and the tags are
    space-separated. Model replies pass through here too.
    """
    text = _EOS_LIKE.sub(" ", text)
    text = _AT_RUN.sub("@", text)
    text = _UNPRINTABLE.sub(" ", text)
    return _WHITESPACE.sub(" ", text).strip()


def render_segments(
    turns: Sequence[str],
    persona: str | None = None,
    *,
    open_reply: bool = False,
    add_eos: bool = False,
) -> list[Segment]:
    """Render turns (user first, alternating) into tagged segments.

    Each reply segment holds only the reply's own words; the tag before it belongs to the
    preceding non-reply segment, so a loss restricted to reply segments teaches the model what to
    say, not where turns start. With ``add_eos`` the EOS text is part of the last segment (a
    reply, when the dialogue ends on one), so the model also learns to stop. The trainer instead
    appends its tokenizer's own EOS id, since not every model spells EOS as ``<|endoftext|>``.

    ``open_reply`` ends the text with the bot's tag, the prompt the bot hands to the model; it
    requires the last turn to be the user's.
    """
    all_turns = [PERSONA_QUESTION, persona, *turns] if persona else list(turns)
    if open_reply and len(all_turns) % 2 == 0:
        raise ValueError("open_reply needs the last turn to be the user's (an odd count of turns)")
    segments: list[Segment] = []
    for index, turn in enumerate(all_turns):
        is_reply = index % 2 == 1
        tag = BOT_TAG if is_reply else USER_TAG
        prefix = " " if index else ""
        clean = sanitize_utterance(turn)
        if is_reply:
            segments.append(Segment(f"{prefix}{tag}", False))
            segments.append(Segment(f" {clean}", True))
        else:
            segments.append(Segment(f"{prefix}{tag} {clean}", False))
    if open_reply:
        segments.append(Segment(f" {BOT_TAG}", False))
    if add_eos and segments:
        last = segments[-1]
        segments[-1] = Segment(last.text + EOS_TEXT, last.is_reply)
    return segments


def render_dialogue(
    turns: Sequence[str], persona: str | None = None, *, add_eos: bool = True
) -> str:
    """A whole dialogue as training text, ending with EOS so the model learns to stop."""
    return "".join(s.text for s in render_segments(turns, persona, add_eos=add_eos))


def render_prompt(turns: Sequence[str], persona: str | None = None) -> str:
    """The text the bot feeds the model: history ending in the user's turn, then the bot's tag."""
    return "".join(s.text for s in render_segments(turns, persona, open_reply=True))


def parse_reply(continuation: str, eos_token: str | None = None) -> str:
    """Cut a generated continuation back into one clean reply.

    The reply ends at the first speaker tag (or a half-written one), the EOS text, or the model's
    own ``eos_token`` when it spells EOS differently (RuGPT-3 uses ``</s>``); what remains is
    passed through the same sanitizer as user text so a stored reply can never carry a tag.
    An empty string means the model produced nothing usable: the caller chooses a fallback.
    """
    match = _REPLY_END.search(continuation)
    if match:
        continuation = continuation[: match.start()]
    if eos_token and eos_token in continuation:
        continuation = continuation[: continuation.index(eos_token)]
    return sanitize_utterance(continuation)
