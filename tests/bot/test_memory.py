"""Context trimming by tokens: oldest whole turns go first, the current message always stays."""

import itertools

import pytest

from bot.db.repository import Turn
from bot.memory import alternate, build_prompt_turns, segments_add_up
from dataset_tools.dialogue_format import render_prompt


def count_words(text: str) -> int:
    return len(text.split())


def _history(*texts: str) -> list[Turn]:
    return [Turn("user" if i % 2 == 0 else "bot", t) for i, t in enumerate(texts)]


def test_everything_fits_nothing_is_dropped():
    history = _history("привет", "здравствуй", "как дела?")
    assert build_prompt_turns(history, count_words, 100, None) == [
        "привет",
        "здравствуй",
        "как дела?",
    ]


def test_oldest_whole_exchanges_are_dropped_first():
    history = _history("один два три", "четыре пять", "шесть", "семь восемь", "девять десять")
    budget = count_words(render_prompt(["шесть", "семь восемь", "девять десять"], None))
    kept = build_prompt_turns(history, count_words, budget, None)
    assert kept == ["шесть", "семь восемь", "девять десять"]
    assert kept[0] == "шесть"  # still starts with a user turn


def test_persona_counts_against_the_budget():
    history = _history("а б", "в г", "д")
    persona = "я бот " * 10
    budget = count_words(render_prompt(["д"], persona))
    assert build_prompt_turns(history, count_words, budget, persona) == ["д"]


def test_a_current_message_too_long_alone_is_cut_to_its_beginning():
    long_message = " ".join(f"слово{i}" for i in range(100))
    kept = build_prompt_turns(_history("старое", "ответ", long_message), count_words, 20, None)
    assert len(kept) == 1 and long_message.startswith(kept[0]) and kept[0]
    assert count_words(render_prompt(kept, None)) <= 20


def test_unanswered_user_messages_are_merged_not_lost():
    history = [
        Turn("user", "первое"),
        Turn("user", "второе"),
        Turn("bot", "ответ"),
        Turn("user", "третье"),
    ]
    assert alternate(history) == ["первое второе", "ответ", "третье"]
    assert alternate([Turn("bot", "сирота"), Turn("user", "привет")]) == ["привет"]


def test_history_must_end_with_the_user():
    with pytest.raises(ValueError):
        build_prompt_turns(_history("привет", "ответ"), count_words, 100, None)


def test_trimming_in_steps_keeps_the_prompt_start_stable_across_turns():
    """With trim_step=3 the start of the prompt moves once every few turns, not on every turn,
    so the engine's cached prefix stays usable (and it never exceeds the budget)."""
    texts = [f"реплика{i} " + "слово " * 4 for i in range(40)]
    budget = 60
    starts = []
    for length in range(21, 41, 2):  # the dialogue grows by an exchange per turn
        history = _history(*texts[:length])
        kept = build_prompt_turns(history, count_words, budget, None, trim_step=3)
        assert count_words(render_prompt(kept, None)) <= budget
        assert kept[-1] == texts[length - 1]
        starts.append(kept[0])
        fewest = build_prompt_turns(history, count_words, budget, None)
        assert len(kept) <= len(fewest)
    changes = sum(1 for a, b in itertools.pairwise(starts) if a != b)
    assert changes <= len(starts) // 3 + 1  # with trim_step=1 the start moves every turn
    single = [
        build_prompt_turns(_history(*texts[:n]), count_words, budget, None)[0]
        for n in range(21, 41, 2)
    ]
    assert len(set(single)) == len(single)


def test_the_facts_exchange_stays_first_while_old_turns_go():
    history = _history("один два три", "четыре пять", "шесть", "семь восемь", "девять десять")
    pinned = ["что ты помнишь?", "тебя зовут аня"]
    budget = count_words(render_prompt([*pinned, "шесть", "семь восемь", "девять десять"], None))
    kept = build_prompt_turns(history, count_words, budget, None, pinned=pinned)
    assert kept == [*pinned, "шесть", "семь восемь", "девять десять"]


def test_the_message_itself_comes_before_the_facts():
    """When the message alone fills the budget, the facts give way (the message is kept)."""
    pinned = ["что ты помнишь?", "тебя зовут аня"]
    history = _history("раз два три четыре")
    budget = count_words(render_prompt(["раз два три четыре"], None))
    assert build_prompt_turns(history, count_words, budget, None, pinned=pinned) == [
        "раз два три четыре"
    ]


def test_a_tokenizer_whose_segments_do_not_add_up_is_counted_for_real():
    """The search sums the segments' counts; a tokenizer that counts the whole text above that
    sum is checked on the real text, and the prompt still fits (before the check, a prompt
    could leave the fit over the budget)."""

    def count_super(text: str) -> int:  # the whole text costs more than its parts
        return len(text.split()) ** 2

    assert segments_add_up(count_words) and not segments_add_up(count_super)
    history = _history(*(f"слово{i} ещё одно" for i in range(9)))
    for budget in (100, 300, 900):
        kept = build_prompt_turns(history, count_super, budget, None)
        assert count_super(render_prompt(kept)) <= budget
        assert kept[-1] == "слово8 ещё одно"
