"""Russian morphology for memory: one ``pymorphy3`` analyser, and a text's content words.

The dictionary ships as a package (``pymorphy3-dicts-ru``): nothing is downloaded at run time.
Loading it takes ~0.1 s and ~15 MB, once per process.
"""

from __future__ import annotations

import functools
import re

import pymorphy3

_TOKEN = re.compile(r"[А-ЯЁа-яёA-Za-z]+(?:-[А-ЯЁа-яёA-Za-z]+)*|\d{2,}")
#: Parts of speech that carry what a message is about (pymorphy3's OpenCorpora tags).
_CONTENT = frozenset({"NOUN", "ADJF", "ADJS", "VERB", "INFN", "PRTF", "PRTS", "NUMR"})
#: Verbs in nearly every message: matching on them recalls everything and nothing.
_COMMON = frozenset(
    {
        "быть",
        "мочь",
        "хотеть",
        "делать",
        "сделать",
        "знать",
        "говорить",
        "сказать",
        "думать",
        "ты",
        "вы",
        "это",
        "весь",
        "такой",
        "который",
        "свой",
        "самый",
        "очень",
        "нравиться",
    }
)


@functools.cache
def analyser() -> pymorphy3.MorphAnalyzer:
    return pymorphy3.MorphAnalyzer()


@functools.lru_cache(maxsize=65536)
def _lemma(word: str) -> str | None:
    if word.isdigit():
        return word
    parse = analyser().parse(word)[0]
    if "LATN" in parse.tag:
        return word if len(word) > 2 else None
    if parse.tag.POS not in _CONTENT or "Apro" in parse.tag or len(parse.normal_form) < 3:
        return None
    lemma = parse.normal_form.replace("ё", "е")
    return None if lemma in _COMMON else lemma


def content_lemmas(text: str) -> set[str]:
    """The dictionary forms of ``text``'s content words (nouns, adjectives, verbs, numbers of
    two digits or more; no pronouns, prepositions, particles or the commonest verbs): what a
    message is about, whatever the inflection ("в банке" and "банк" share "банк")."""
    lemmas = (_lemma(token.lower()) for token in _TOKEN.findall(text))
    return {lemma for lemma in lemmas if lemma}
