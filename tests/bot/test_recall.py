"""Which old messages a new one recalls: rare shared words count, common ones little, words
never used before against; nothing below half the message's weight."""

from bot.db.repository import TermHits
from bot.morphology import content_lemmas
from bot.recall import ranked


def test_inflected_words_share_their_dictionary_form():
    assert {"сестра", "работать", "банк"} <= content_lemmas("Моя сестра работает в банке")
    assert content_lemmas("Где работает сестра?") == {"работать", "сестра"}
    assert content_lemmas("я и ты, но он") == set()  # pronouns and particles carry nothing


def test_the_message_holding_the_rare_words_is_recalled_first():
    hits = TermHits(
        df={"сестра": 2, "работать": 40, "банк": 1},
        indexed=1000,
        hits={10: {"сестра", "работать", "банк"}, 20: {"работать"}, 30: {"сестра"}},
    )
    best = ranked({"сестра", "работать"}, hits)
    assert [message for message, _ in best] == [10, 30]  # 20 shares only a common word
    assert best[0][1] == 1.0


def test_a_question_about_something_never_said_recalls_nothing():
    """ "Как зовут мою собаку?" when no dog was ever mentioned: the one shared word ("звать",
    from "меня зовут Аня") is less than half of the question's weight."""
    hits = TermHits(df={"звать": 3}, indexed=1000, hits={5: {"звать"}})
    assert ranked({"звать", "собака"}, hits) == []
    assert ranked(set(), hits) == []
