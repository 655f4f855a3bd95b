"""Facts a user states about themselves, found by rules in their own messages.

Why rules and not the model: a 355M dialogue model cannot summarise, and the bots that ask a
large model to summarise are the ones whose users report lost or invented facts. A rule either
finds "меня зовут Аня" or it does not; what it found is shown to the user (``/memory``), who can
delete it.

What counts: a first-person statement in the user's own message (the caller never passes the
bot's replies) of a kind the bot can use later: name, age, city, job, pets, what they love,
birthday. What never counts: a question, a negated statement ("я не живу в Москве"), someone
else's fact ("мою сестру зовут Оля"), and anything quoted. A newer statement of the same kind
supersedes the older one ("я переехала в Тверь"): the caller stores one value per kind.

Values are normalised with ``pymorphy3`` (its dictionary ships as a package: nothing is
downloaded at run time): "живу в Казани" → Казань, "работаю программистом" → программист.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bot.morphology import analyser

#: What each kind is called where the user sees it (``/memory``), and in the prompt.
KINDS = {
    "name": "имя",
    "age": "возраст",
    "city": "город",
    "job": "работа",
    "pet": "питомец",
    "likes": "любит",
    "birthday": "день рождения",
}

_WORD = r"[А-ЯЁа-яё][а-яё]+(?:-[А-ЯЁа-яё][а-яё]+)*"
_CAPITAL = r"[А-ЯЁ][а-яё]+(?:-[А-ЯЁа-яё][а-яё]+)*"
_QUOTED = re.compile(r"«[^»]*»|\"[^\"]*\"|„[^“]*“|'[^']*'")
_SENTENCE = re.compile(r"[^.!?;\n]+[.!?;]?")
_CLAUSE_MARKS = (",", ":", "—", " - ", "?")
_QUESTION_START = re.compile(
    r"^\s*(?:а\s+|и\s+)?(?:как|где|кто|что|чем|сколько|когда|почему|зачем|откуда|куда|какой|"
    r"какая|какое|какие|чей|чья|ли)\b",
    re.IGNORECASE,
)
_MONTHS = "января|февраля|марта|апреля|мая|июня|июля|августа|сентября|октября|ноября|декабря"
_PETS = (
    "кот|кошка|кошку|котик|котика|собака|собаку|пёс|пес|пса|щенок|щенка|попугай|попугая|"
    "хомяк|хомяка|черепаха|черепаху|рыбки|кролик|кролика|морская свинка|морскую свинку"
)
_FILLER = r"(?:\s+(?:уже|сейчас|теперь|давно|тоже|вообще|ещё|еще))*"
#: Where a statement may start (the start of the sentence, or after a space, comma or dash),
#: a negation right before its verb, a city of one or two words, a day and month.
_START = r"(?:^|[\s,—-])"
_NOT = r"(?P<not>\s+не)?"
_PLACE = rf"(?P<v>{_CAPITAL}(?:\s+{_CAPITAL})?)"
_THING = rf"(?P<v>{_WORD}(?:\s+{_WORD})?)"
_DATE = rf"(?P<v>\d{{1,2}}\s+(?:{_MONTHS}))"

#: Each rule: a kind and a pattern over one sentence; group ``not`` marks a negation, group
#: ``v`` (and ``v2``) the value. Patterns start at a first-person word, so that another
#: person's fact ("его зовут Петя") never matches.
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(_START + pattern, re.IGNORECASE))
    for kind, pattern in (
        ("name", rf"меня{_NOT}\s+зовут\s+(?P<v>{_CAPITAL})"),
        ("name", rf"зовут{_NOT}\s+меня\s+(?P<v>{_CAPITAL})"),
        ("name", rf"(?:моё|мое)\s+имя{_NOT}\s*[—-]?\s*(?P<v>{_CAPITAL})"),
        ("name", rf"зови(?:те)?{_NOT}\s+меня\s+(?P<v>{_CAPITAL})"),
        ("age", rf"мне{_NOT}\s+(?:уже\s+|всего\s+|почти\s+)?(?P<v>\d{{1,3}})\s*(?:год|года|лет)\b"),
        ("city", rf"я{_FILLER}{_NOT}\s+(?:живу|проживаю)\s+во?\s+(?:городе\s+)?{_PLACE}"),
        ("city", rf"я{_NOT}\s+(?:сам|сама|родом)?\s*из\s+(?:города\s+)?{_PLACE}"),
        ("city", rf"я{_NOT}\s+(?:недавно\s+|уже\s+)?переехал[аи]?\s+во?\s+(?:город\s+)?{_PLACE}"),
        ("job", rf"я{_FILLER}{_NOT}\s+работаю\s+(?P<v>{_WORD}(?:ом|ем|ём|ой|ей|цей))\b"),
        ("job", rf"я{_NOT}\s+по\s+профессии\s+(?P<v>{_WORD})"),
        (
            "pet",
            rf"у\s+меня(?P<not>\s+нет)?\s+(?:есть\s+)?(?P<v>{_PETS})"
            rf"(?:\s*,?\s*(?:по\s+кличке|по\s+имени|зовут)?\s*(?P<v2>{_CAPITAL}))?",
        ),
        (
            "likes",
            rf"я(?:\s+очень)?{_NOT}\s+(?:очень\s+)?(?:люблю|обожаю)\s+(?P<v>{_WORD}(?:\s+{_WORD})?)",
        ),
        ("birthday", rf"(?:мой|у\s+меня)\s+день\s+рождения{_NOT}\s+[—-]?\s*{_DATE}"),
        ("birthday", rf"я{_NOT}\s+родил(?:ся|ась)\s+{_DATE}"),
    )
)


@dataclass(frozen=True)
class Fact:
    """One thing the user said about themselves: its kind (a key of :data:`KINDS`) and the
    normalised value."""

    kind: str
    value: str


def _nominative(word: str, *, place: bool = False, name: bool = False) -> str:
    """``word`` in the nominative singular, as the dictionary knows it; the word as written
    when the dictionary does not (a rare name, a made-up city)."""
    parses = analyser().parse(word)
    if place:
        parses = [p for p in parses if "Geox" in p.tag] or parses
    elif name:
        parses = [p for p in parses if "Name" in p.tag] or parses
    best = parses[0]
    if best.tag.POS not in {"NOUN", "ADJF"} or best.score < 0.05:
        return word
    inflected = best.inflect({"nomn"})
    return inflected.word if inflected is not None else word


def _capitalised(text: str) -> str:
    return "-".join(part[:1].upper() + part[1:] for part in text.split("-"))


def _place(words: str) -> str:
    """A city in the nominative: "Нижнем Новгороде" → Нижний Новгород."""
    parts = words.split()
    last = analyser().parse(parts[-1])
    noun = next((p for p in last if "Geox" in p.tag), last[0])
    result = []
    for word in parts[:-1]:
        adjective = next((p for p in analyser().parse(word) if p.tag.POS == "ADJF"), None)
        if adjective is not None and noun.tag.gender is not None:
            form = adjective.inflect({"nomn", "sing", noun.tag.gender})
            result.append(form.word if form else word)
        else:
            result.append(_nominative(word, place=True))
    result.append(_nominative(parts[-1], place=True))
    return " ".join(_capitalised(w) for w in result)


def _normalised(kind: str, match: re.Match[str]) -> str | None:
    value = match.group("v")
    if kind == "name":
        return _capitalised(_nominative(value, name=True))
    if kind == "age":
        age = int(value)
        return str(age) if 3 <= age <= 120 else None
    if kind == "city":
        return _place(value)
    if kind == "job":
        return _nominative(value.lower())
    if kind == "pet":
        animal = _nominative(value.lower().split()[-1] if " " not in value else value.lower())
        name = match.groupdict().get("v2")
        return f"{animal} {_capitalised(name)}" if name else animal
    if kind == "likes":
        return value.lower()
    if kind == "birthday":
        return " ".join(value.split()).lower()
    return value


def _is_question(sentence: str) -> bool:
    return sentence.rstrip().endswith("?") or bool(_QUESTION_START.match(sentence))


def _clause(sentence: str, match: re.Match[str]) -> str:
    """The part of ``sentence`` between the punctuation around ``match``: "Мне 63 года,
    представляешь?" is a statement with a question after it, not a question."""
    start = max(sentence.rfind(mark, 0, match.start("v")) for mark in _CLAUSE_MARKS) + 1
    ends = [sentence.find(mark, match.end("v")) for mark in _CLAUSE_MARKS]
    end = min((e for e in ends if e >= 0), default=len(sentence))
    return sentence[start : end + 1 if end < len(sentence) and sentence[end] == "?" else end]


def extract_facts(text: str) -> list[Fact]:
    """The facts ``text`` (one message of the user's) states about its author, in the order
    stated; a later statement of a kind in the same message wins over an earlier one."""
    found: dict[str, Fact] = {}
    unquoted = _QUOTED.sub(" ", text)
    for sentence in _SENTENCE.findall(unquoted):
        for kind, pattern in _RULES:
            for match in pattern.finditer(sentence):
                if match.group("not") or _is_question(_clause(sentence, match)):
                    continue
                value = _normalised(kind, match)
                if value:
                    found.pop(kind, None)
                    found[kind] = Fact(kind, value)
    return list(found.values())


def facts_exchange(facts: list[Fact]) -> tuple[str, str] | None:
    """The facts as one exchange in the dialogue's own format: the user asks what the bot
    knows of them, the bot answers with the facts. A dialogue model continues such a
    conversation naturally (it has no system role), and the exchange stays the same until a
    fact changes, so the engine's cached keys/values of the dialogue stay good."""
    if not facts:
        return None
    by_kind = {fact.kind: fact.value for fact in facts}
    said = []
    if "name" in by_kind:
        said.append(f"Тебя зовут {by_kind['name']}.")
    if "age" in by_kind:
        said.append(f"Тебе {by_kind['age']} {_years(int(by_kind['age']))}.")
    if "city" in by_kind:
        said.append(f"Ты живёшь в городе {by_kind['city']}.")
    if "job" in by_kind:
        said.append(f"Ты работаешь: {by_kind['job']}.")
    if "pet" in by_kind:
        said.append(f"У тебя есть {by_kind['pet']}.")
    if "likes" in by_kind:
        said.append(f"Ты любишь {by_kind['likes']}.")
    if "birthday" in by_kind:
        said.append(f"Твой день рождения {by_kind['birthday']}.")
    return "Что ты обо мне помнишь?", " ".join(said)


def _years(age: int) -> str:
    if age % 10 == 1 and age % 100 != 11:
        return "год"
    if 2 <= age % 10 <= 4 and not 12 <= age % 100 <= 14:
        return "года"
    return "лет"


def describe_memory(enabled: bool, facts: list[tuple[int, str, str]]) -> str:
    """What ``/memory`` says (in Telegram and the console): each fact (id, kind, value) by its
    kind's name, and a note when memory is off."""
    from bot import texts

    if not facts:
        text = texts.MEMORY_EMPTY
    else:
        lines = "\n".join(
            texts.MEMORY_FACT.format(kind=KINDS.get(kind, kind), value=value)
            for _, kind, value in facts
        )
        text = texts.MEMORY_LIST.format(facts=lines)
    return text if enabled else text + texts.MEMORY_OFF_NOTE
