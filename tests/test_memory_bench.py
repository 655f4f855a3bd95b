"""The memory benchmark's set and scorer (benchmarks.memory_set, benchmarks.memory_score)."""

from benchmarks.memory_score import score
from benchmarks.memory_set import build, filler_exchanges


def test_ordinary_messages_come_after_a_long_real_dialogue_and_ask_nothing_back():
    pairs = filler_exchanges(None, 0)  # the bundled sample: no ../shared needed
    items = [item for item in build(pairs, 0, 3) if item["category"] == "ordinary"]
    assert len(items) == 3
    users = {user for user, _ in pairs}
    for item in items:
        assert len(item["turns"]) >= 1000 and len(item["turns"]) % 2 == 0
        assert item["probe"] in users and not item["answers"]


def test_the_scorer_counts_how_often_an_ordinary_message_got_memory():
    items = [
        {"id": f"o{i}", "category": "ordinary", "probe": "ну и?", "answers": [], "wrong": []}
        for i in range(4)
    ]
    results = [
        {
            "id": f"o{i}",
            "prompt": "... ну и?",
            "prompt_tokens": 90,
            "memory_tokens": tokens,
            "latency_ms": 1.0,
        }
        for i, tokens in enumerate([0, 0, 30, 10])
    ]
    figures = score(items, results)
    assert figures["ordinary"] == {"n": 4, "with_memory": 2, "memory_tokens_mean": 10.0}
    assert figures["never"] == {"n": 0, "with_memory": 0, "memory_tokens_mean": 0}
