"""A dialogue's cached keys/values grow by the turn's own chunk; the rest is never copied again."""

import torch

from bot.engine.prefix_cache import MAX_CHUNKS, CachedDialogue, PrefixCache


def positions(start: int, end: int) -> torch.Tensor:
    """A ``[layers, 2, heads, n, head_dim]`` chunk whose values say which positions it holds."""
    return torch.arange(start, end, dtype=torch.float32).view(1, 1, 1, -1, 1).repeat(2, 2, 3, 1, 4)


def whole(entry: CachedDialogue) -> torch.Tensor:
    return torch.cat(entry.chunks, dim=3)


PERSONA = CachedDialogue("persona", list(range(5)), (positions(0, 5),), shared=1)


def test_a_turn_keeps_the_earlier_chunks_as_they_are_and_adds_only_its_own():
    first = PERSONA.prefix(5).extended("turn 1", list(range(12)), positions(5, 12))
    second = first.prefix(12).extended("turn 2", list(range(20)), positions(12, 20))
    assert second.chunks[0] is PERSONA.chunks[0] and second.chunks[1] is first.chunks[1]
    assert torch.equal(whole(second), positions(0, 20)) and second.computed == 20
    # The persona is the engine's: a dialogue's budget counts only its own positions.
    per_position = positions(0, 1).nbytes
    assert second.nbytes == 15 * per_position and PERSONA.nbytes == 0


def test_a_shorter_common_prefix_cuts_a_chunk_by_copying_it():
    first = PERSONA.prefix(5).extended("turn 1", list(range(12)), positions(5, 12))
    trimmed = first.prefix(8).extended("trimmed", list(range(10)), positions(8, 10))
    assert torch.equal(whole(trimmed), positions(0, 10))
    # The cut chunk is a copy of 3 positions, not a view that would keep all 7 alive.
    assert trimmed.chunks[1].untyped_storage().nbytes() == 3 * positions(0, 1).nbytes
    inside_persona = first.prefix(3).extended("cut", list(range(6)), positions(3, 6))
    assert inside_persona.shared == 0 and inside_persona.nbytes == 6 * positions(0, 1).nbytes


def test_many_turns_are_joined_into_one_chunk_after_the_persona():
    entry = PERSONA
    for turn in range(MAX_CHUNKS + 3):
        start = entry.computed
        entry = entry.prefix(start).extended(f"turn {turn}", [], positions(start, start + 2))
        assert len(entry.chunks) <= MAX_CHUNKS
    assert entry.chunks[0] is PERSONA.chunks[0]
    assert torch.equal(whole(entry), positions(0, entry.computed))


def test_the_budget_counts_each_dialogue_without_the_shared_persona():
    per_position = positions(0, 1).nbytes
    cache = PrefixCache(budget_bytes=20 * per_position)
    for key in range(3):  # each counts its own 8 positions, not 13: two fit, the third evicts
        cache.put(key, PERSONA.prefix(5).extended("t", [], positions(5, 13)))
    assert len(cache) == 2 and cache.used_bytes == 16 * per_position
