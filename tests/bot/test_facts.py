"""Facts users state about themselves: found in first-person statements, normalised, and
never taken from questions, negations, other people or quotes."""

import pytest

from bot.facts import Fact, extract_facts, facts_exchange


@pytest.mark.parametrize(
    ("text", "facts"),
    [
        ("Привет! Меня зовут Аня, я из Казани.", [("name", "Аня"), ("city", "Казань")]),
        ("мне 27 лет, я работаю программистом", [("age", "27"), ("job", "программист")]),
        ("Зовут меня Дима.", [("name", "Дима")]),
        ("Я живу в Нижнем Новгороде", [("city", "Нижний Новгород")]),
        ("я сейчас живу в Омске", [("city", "Омск")]),
        ("я из Санкт-Петербурга", [("city", "Санкт-Петербург")]),
        ("Я переехала в Тверь", [("city", "Тверь")]),
        ("У меня есть кошка по кличке Мурка", [("pet", "кошка Мурка")]),
        ("Я очень люблю горные лыжи", [("likes", "горные лыжи")]),
        ("Мой день рождения 12 марта", [("birthday", "12 марта")]),
        ("я родилась 5 мая", [("birthday", "5 мая")]),
    ],
)
def test_a_first_person_statement_is_a_fact_in_its_normal_form(text, facts):
    assert extract_facts(text) == [Fact(kind, value) for kind, value in facts]


@pytest.mark.parametrize(
    "text",
    [
        "Как меня зовут?",  # a question
        "А ты где живёшь?",
        "Ты знаешь, сколько мне лет?",
        "Я не живу в Москве.",  # a negation
        "Меня не зовут Вася",
        "мне не 30 лет",
        "у меня нет собаки",
        "я не люблю кашу",
        "Мою сестру зовут Оля.",  # someone else's
        "Его зовут Петя, он из Омска",
        "Он сказал: «меня зовут Петя»",  # a quote
        'Она написала "я живу в Париже"',
        "Мне 500 лет",  # not an age
    ],
)
def test_questions_negations_other_people_and_quotes_are_not_facts(text):
    assert extract_facts(text) == []


def test_the_later_statement_in_a_message_wins():
    assert extract_facts("Я жила в Казани. Теперь я живу в Твери.") == [Fact("city", "Тверь")]


def test_the_facts_read_as_one_exchange_of_the_dialogue():
    exchange = facts_exchange([Fact("name", "Аня"), Fact("age", "21"), Fact("city", "Казань")])
    assert exchange == (
        "Что ты обо мне помнишь?",
        "Тебя зовут Аня. Тебе 21 год. Ты живёшь в городе Казань.",
    )
    assert facts_exchange([]) is None


def test_memory_is_described_by_kind_with_a_note_when_off():
    from bot import texts
    from bot.facts import describe_memory

    shown = describe_memory(True, [(1, "name", "Аня"), (2, "city", "Казань")])
    assert "• имя: Аня\n• город: Казань" in shown and texts.MEMORY_OFF_NOTE not in shown
    assert describe_memory(False, [(1, "name", "Аня")]).endswith(texts.MEMORY_OFF_NOTE)
    assert describe_memory(True, []) == texts.MEMORY_EMPTY
