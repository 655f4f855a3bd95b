"""Each cleaning rule: a row that triggers it, and one that must survive it untouched."""

from collections import Counter

import pytest

from dataset_tools.cleaning import CleaningConfig, clean_dialogue, clean_turn, normalised_key

CONFIG = CleaningConfig(min_chars=2, max_chars=200)


def _clean(text: str) -> tuple[str, str | None, Counter]:
    edits: Counter = Counter()
    cleaned, rejected = clean_turn(text, CONFIG, edits)
    return cleaned, rejected, edits


@pytest.mark.parametrize(
    ("rule", "dirty", "expected"),
    [
        ("html_tags", "<p>Привет, <b>как</b> дела?</p>", "Привет, как дела?"),
        ("html_entities", "Это &laquo;ёлка&raquo; &amp; шары", "Это «ёлка» & шары"),
        ("markup", "mso-style-name:Обычный; Доброе утро", "Доброе утро"),
        ("markup", "Привет {float:left;margin:0} мир", "Привет мир"),
        ("markup", "Смотри [img]http://x.ru/a.png[/img] смешно", "Смотри смешно"),
        ("urls", "Читай https://example.com/a?b=1 тут", "Читай тут"),
        ("urls", "Зайди на www.example.org сегодня", "Зайди на сегодня"),
        ("dates_times", "Встретимся 12.05.2023 в 15:40", "Встретимся в"),
        ("dates_times", "Срок 2024-01-01 уже прошёл", "Срок уже прошёл"),
        ("speaker_prefix", "Иван: Привет, ты где?", "Привет, ты где?"),
        ("speaker_prefix", "Admin123: Я на работе.", "Я на работе."),
        ("vk_mentions", "[id12345|Маша], привет!", "привет!"),
        ("at_mentions", "Привет, @super_user, как ты?", "Привет, как ты?"),
        ("whitespace", "Сколько   пробелов\n\nздесь", "Сколько пробелов здесь"),
        ("speaker_tags", "@@ВТОРОЙ@@ Я сам себе отвечу", "@ВТОРОЙ@ Я сам себе отвечу"),
    ],
)
def test_edit_rule_removes_noise_and_is_counted(rule, dirty, expected):
    cleaned, rejected, edits = _clean(dirty)
    assert cleaned == expected
    assert rejected is None
    assert edits[rule] >= 1


@pytest.mark.parametrize(
    "clean",
    [
        "Привет, как дела?",
        "Сколько будет 2+2? Ответ: 4.",
        "Встретимся в 5 часов, у дома 12.",
        'Кричит: "Лучше стоя, чем на коленях!"',
        "Вопрос: как ты?",
        "Пишите: всё хорошо.",
        "Пиши мне на почту a@b",
        "Цена 3.5 рубля, счёт 1:0.",
        "!",
        "Ну...",
        "Привет 😊 как ты?",
    ],
)
def test_clean_text_survives_every_rule(clean):
    cleaned, _, edits = _clean(clean)
    assert cleaned == clean
    assert sum(edits.values()) == 0


def test_rejections():
    assert _clean("   ")[1] == "empty_turn"
    assert _clean("https://example.com")[1] == "empty_turn"
    assert _clean("а")[1] == "too_short"
    assert _clean("а" * 201)[1] == "too_long"
    assert _clean("а" * 200)[1] is None


def test_dialogue_is_cut_at_its_first_bad_turn_keeping_a_usable_prefix():
    edits: Counter = Counter()
    result = clean_dialogue(["Как дела?", "Хорошо.", "а" * 500, "Почему?"], CONFIG, edits)
    assert result.turns == ["Как дела?", "Хорошо."]
    assert result.rejected_by == "too_long"
    assert result.kept


def test_dialogue_without_a_usable_prefix_is_dropped():
    edits: Counter = Counter()
    result = clean_dialogue(["Ну?", "", "Что?"], CONFIG, edits)
    assert not result.kept
    assert result.rejected_by == "empty_turn"


def test_single_turn_is_too_few():
    result = clean_dialogue(["Только вопрос"], CONFIG, Counter())
    assert not result.kept and result.rejected_by == "too_few_turns"


def test_normalised_key_ignores_case_punctuation_spacing_and_yo():
    assert normalised_key(["Привет!", "Ещё  раз."]) == normalised_key(["привет", "еще раз"])
    assert normalised_key(["Привет!"]) != normalised_key(["Пока!"])


def test_bounds_are_validated():
    with pytest.raises(ValueError):
        CleaningConfig(min_chars=10, max_chars=5)
