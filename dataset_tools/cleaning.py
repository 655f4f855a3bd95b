"""Cleaning rules for dialogue turns, each one named so that `stats.json` can count it.

Two kinds of rule:

* *edits* remove noise from a turn and keep the turn (HTML, markup, URLs, dates and times,
  chat-log speaker prefixes, mentions, extra whitespace);
* *rejections* say a turn is unusable (empty after the edits, too short, too long).

A dialogue is cut at its first rejected turn: the turns before it are kept when they still make a
dialogue (a user turn and a reply), because a dialogue that goes bad midway usually began well.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from dataset_tools.dialogue_format import sanitize_utterance

# Order matters: markup and tags go first so their contents (e.g. an [img] URL) go with them,
# URLs before dates (a URL may hold digits that look like a date), mentions before prefixes.
_MARKUP = re.compile(
    r"\[img\].*?\[/img\]"  # BB-code images with their URL
    r"|\[/?(?:img|b|i|u|s|url|quote|code|color|size|center)(?:=[^\]]*)?\]"  # other BB-code tags
    r"|mso-[\w-]+\s*:[^;\"}]*;?"  # MS Office styles pasted from Word
    r"|\{[^{}]*(?:float|margin|font|color|style|display|width|height)\s*:[^{}]*\}",  # CSS blocks
    re.IGNORECASE | re.DOTALL,
)
_HTML_TAG = re.compile(r"</?[a-zA-Z][^<>]{0,200}>")
_HTML_ENTITY = re.compile(r"&(?:#\d{1,6}|#x[0-9a-fA-F]{1,6}|[a-zA-Z]{2,8});")
_URL = re.compile(
    r"(?:https?://|ftp://|www\.)\S+"
    r"|\b[\w-]+(?:\.[\w-]+)*\.(?:ru|com|net|org|рф|su|ua|by|kz|io|me|info|tv)(?:/\S*)?\b",
    re.IGNORECASE,
)
_DATE_TIME = re.compile(
    r"\b\d{4}-\d{1,2}-\d{1,2}(?:[T ]\d{1,2}:\d{2}(?::\d{2})?)?\b"  # 2024-01-01, 2024-01-01T10:00
    r"|\b\d{1,2}[./]\d{1,2}[./]\d{2,4}\b"  # 12.05.2023, 1/2/24
    r"|\b(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d)?\b",  # 15:40, 9:05:30
)
_VK_MENTION = re.compile(r"\[(?:id|club|public)\d+\|[^\]]*\]")
_AT_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{3,32}\b")
# A chat-log speaker prefix at the start of a turn: "Иван:", "Мария Петровна:", "Admin123:",
# "user_42:". One or two capitalised words, or a nickname (Latin, or with digits/underscores).
# Measured on real jokes, a colon after a capitalised word is as often speech ("Кричит: ...",
# "Пишите: ...", "Ничего: ..."), so Cyrillic words with verb or pronoun endings are not names,
# and a colon followed by a quote or a dash introduces quoted speech, not a chat log.
# Words that often open a sentence with a colon but are never a speaker.
_NOT_NAMES = (
    "Вопрос|Ответ|Погода|Внимание|Примечание|Итак|Итог|Вывод|Совет|Цитата|Теперь|Послушай|"
    "Правильно|Сенсация|Объявление|Новость|Новости|Задача|Решение|Пример|Итого|Главное"
)
_CYR_NAME = (
    rf"(?!(?:{_NOT_NAMES})\b)[А-ЯЁ][а-яё]{{1,20}}"
    r"(?<!ит)(?<!ет)(?<!ат)(?<!ят)(?<!ут)(?<!ют)(?<!и)(?<!те)(?<!ть)(?<!го)(?<!ое)(?<!ее)"
)
_SPEAKER_PREFIX = re.compile(
    rf"^\s*(?:{_CYR_NAME}(?:\s{_CYR_NAME})?"
    r"|[A-Za-z][A-Za-z0-9_.-]{0,30}"
    r"|[A-Za-zА-Яа-яЁё][\wА-Яа-яЁё]{0,20}[\d_][\wА-Яа-яЁё]{0,20})\s?:\s+(?![\"«„'\-—–])"
)
_WHITESPACE = re.compile(r"\s+")
_LEADING_PUNCT = re.compile(r"^[\s,;:.!?—–-]+(?=\w|$)")
_ORPHAN_PUNCT = re.compile(r"\s*([,;:])(?:\s*[,;:])+|\s+([,;:.!?])(?=\s|$)")


def _keep_one_mark(match: re.Match[str]) -> str:
    return match.group(1) or match.group(2)


@dataclass(frozen=True)
class CleaningConfig:
    """Bounds for a usable turn, in characters after cleaning."""

    min_chars: int = 2
    max_chars: int = 500

    def __post_init__(self) -> None:
        if self.min_chars < 1 or self.max_chars < self.min_chars:
            raise ValueError(
                f"need 1 <= min_chars <= max_chars, got {self.min_chars} and {self.max_chars}"
            )


#: Rules that edit a turn, in the order they run; the names are the keys in stats.json.
EDIT_RULES = (
    "markup",
    "html_tags",
    "html_entities",
    "urls",
    "dates_times",
    "vk_mentions",
    "at_mentions",
    "speaker_prefix",
    "speaker_tags",
    "whitespace",
)
#: Rules that reject a turn.
REJECT_RULES = ("empty_turn", "too_short", "too_long")


def _sub(pattern: re.Pattern[str], text: str, repl: str = " ") -> tuple[str, bool]:
    new = pattern.sub(repl, text)
    return new, new != text


def clean_turn(text: str, config: CleaningConfig, edits: Counter[str]) -> tuple[str, str | None]:
    """Clean one turn; count each edit in ``edits``; return (text, rejection rule or None)."""
    text, hit = _sub(_MARKUP, text)
    edits["markup"] += hit
    text, hit = _sub(_HTML_TAG, text)
    edits["html_tags"] += hit
    if _HTML_ENTITY.search(text):
        # Unescape twice: scraped text is often double-escaped (&amp;quot;).
        text = html.unescape(html.unescape(text)).replace("\xa0", " ")
        edits["html_entities"] += 1
        text, hit = _sub(_HTML_TAG, text)  # entities may have hidden tags (&lt;br&gt;)
        edits["html_tags"] += hit
    text, hit = _sub(_URL, text)
    edits["urls"] += hit
    text, hit = _sub(_DATE_TIME, text)
    edits["dates_times"] += hit
    text, vk_hit = _sub(_VK_MENTION, text)
    edits["vk_mentions"] += vk_hit
    text, at_hit = _sub(_AT_MENTION, text)
    edits["at_mentions"] += at_hit
    text, prefix_hit = _sub(_SPEAKER_PREFIX, text, "")
    edits["speaker_prefix"] += prefix_hit
    collapsed = _WHITESPACE.sub(" ", text).strip()
    edits["whitespace"] += collapsed != text
    sanitized = sanitize_utterance(text)  # no speaker tags, EOS text or control characters
    edits["speaker_tags"] += sanitized != collapsed
    text = sanitized
    if vk_hit or at_hit or prefix_hit:  # "[id1|Маша], привет" must not become ", привет"
        text = _ORPHAN_PUNCT.sub(_keep_one_mark, _LEADING_PUNCT.sub("", text))
    if not text:
        return "", "empty_turn"
    if len(text) < config.min_chars:
        return text, "too_short"
    if len(text) > config.max_chars:
        return text, "too_long"
    return text, None


@dataclass(frozen=True)
class CleanedDialogue:
    """The usable turns of a dialogue and, when it was cut or dropped, the rule that did it."""

    turns: list[str]
    rejected_by: str | None

    @property
    def kept(self) -> bool:
        return len(self.turns) >= 2


def clean_dialogue(
    turns: Sequence[str], config: CleaningConfig, edits: Counter[str]
) -> CleanedDialogue:
    """Clean every turn and cut the dialogue at its first rejected turn.

    The turns before the bad one survive when there are at least two of them (a user turn and a
    reply); ``rejected_by`` then says why the rest was cut. A dialogue that ends on a user turn is
    kept as it is: with the loss on all tokens its last turn is still good text, and the trainer
    masks it when the loss is restricted to replies.
    """
    kept: list[str] = []
    for turn in turns:
        text, rejected_by = clean_turn(turn, config, edits)
        if rejected_by:
            return CleanedDialogue(kept, rejected_by)
        kept.append(text)
    return CleanedDialogue(kept, None if len(kept) >= 2 else "too_few_turns")


_NORMALISE_DROP = re.compile(r"[^\w\s]|_")


def normalised_key(turns: Sequence[str]) -> str:
    """Text that equal dialogues share even when case, punctuation, ё/е or spacing differ."""
    joined = "\n".join(turns).lower().replace("ё", "е")
    joined = _NORMALISE_DROP.sub(" ", joined)
    return _WHITESPACE.sub(" ", joined).strip()
