"""``make bench``'s command line (design variants, the background load it competes with) and
what it reports."""

import asyncio
import re

import pytest

from bot.engine.bench import BackgroundLoad, main, split_design, step_figures


def test_design_variants_become_the_child_options():
    assert split_design("engine") == ("engine", {})
    assert split_design("engine:int8:threads=2") == ("engine", {"quantize": "int8", "threads": "2"})
    assert split_design("engine:bfloat16:chunk=0") == (
        "engine",
        {"dtype": "bfloat16", "prefill-chunk": "0"},
    )
    assert split_design("engine:omp=active") == ("engine", {"omp": "ACTIVE"})
    with pytest.raises(ValueError, match="unknown variant 'int4'"):
        split_design("engine:int4")
    with pytest.raises(ValueError, match="unknown design 'fast'"):
        split_design("fast")


def test_a_bad_design_or_load_is_refused_before_any_work(capsys):
    for argv in (["--designs", "engine:threads=0"], ["--background-load", "999"]):
        with pytest.raises(SystemExit) as refused:
            main(argv)
        assert refused.value.code == 2
    assert "twice the cores" in capsys.readouterr().err


def test_background_load_runs_busy_processes_and_leaves_none_behind():
    load = BackgroundLoad(2)
    with load:
        children = list(load._children)
        assert len(children) == 2
        assert all(child.poll() is None for child in children)  # spinning
    assert all(child.poll() is not None for child in children)  # stopped and reaped


def test_steps_that_encode_a_prompt_are_reported_apart_from_decoding_ones():
    log = [  # (decoding rows, prompt tokens, positions attended, seconds), as the engine has them
        (0, 60, 0, 0.2),  # a prompt encoded whole while nothing decodes
        (8, 0, 800, 0.036),
        (8, 0, 808, 0.034),
        (8, 20, 816, 0.15),  # a joining prompt's chunk rides along
        (7, 0, 700, 0.030),
        (8, 0, 1000, 0.040),
    ]
    assert step_figures(log) == {
        "decode_rows": 8,
        "decode_steps": 3,
        "decode_step_p50_ms": 36.0,
        "decode_step_p90_ms": 40.0,
        "decode_positions_mean": 869,
        "mixed_steps": 1,
        "mixed_step_mean_ms": 150.0,
    }


def test_the_bench_reports_the_engines_decoding_steps(capsys):
    assert main(["--shape", "tiny", "--users", "2", "--turns", "2", "--designs", "engine"]) == 0
    out = capsys.readouterr().out
    assert "engine worker: " in out
    assert "engine steps decoding 2 rows and nothing else: " in out


def test_memory_placements_keep_or_move_the_prompts_start():
    """The bot's placement keeps the window right after the facts (the cached start holds from
    turn to turn); the start placement puts the changing recalled exchange first."""
    from bot.engine.bench import FACTS_EXCHANGE, split_design, with_memory

    assert split_design("engine:memory=end") == ("engine", {"memory": "end"})
    turns, recalled = ["a", "b", "c"], ["old", "reply"]
    assert with_memory(turns, recalled, "end") == [*FACTS_EXCHANGE, "a", "b", "old", "reply", "c"]
    assert with_memory(turns, recalled, "start") == [*FACTS_EXCHANGE, "old", "reply", "a", "b", "c"]
    assert with_memory(turns, recalled, None) == turns
    # the next turn: the exchange recalled for "c" stays before it, the prompt only grew
    kept = ["a", "b", "old", "reply", "c", "d"]
    later = with_memory([*turns, "d", "e"], ["older", "reply2"], "end", kept)
    assert later[: len(FACTS_EXCHANGE) + 5] == with_memory(turns, recalled, "end")
    assert later[-3:] == ["older", "reply2", "e"]


async def test_memory_recalls_on_every_nth_turn_only_when_told():
    """``--recall-every N``: the recalled exchange goes into every N-th turn's prompt (and stays
    before its message in the later ones); the other turns carry the facts alone."""
    from bot.engine.bench import FACTS_EXCHANGE, Tally, converse

    class Recording:
        def __init__(self) -> None:
            self.prompts: list[list[str]] = []

        async def generate(self, turns, params, key=None, stats=None):
            self.prompts.append(list(turns))
            return f"reply {len(self.prompts)}"

    messages = [[f"u{user} m{turn}" for turn in range(4)] for user in range(2)]
    backend = Recording()
    await converse(backend, messages, None, Tally(4), "end", recall_every=2)
    recalled = [
        [t for t in prompt[len(FACTS_EXCHANGE) :] if t == "Да, ты мне это рассказывал."]
        for prompt in backend.prompts
    ]
    assert sorted(len(r) for r in recalled) == [0, 0, 1, 1, 1, 1, 2, 2]


def test_repeated_designs_run_in_turn_and_keep_their_median_run(capsys, tmp_path):
    report = tmp_path / "bench.json"
    argv = ["--shape", "tiny", "--users", "1", "--turns", "1", "--designs", "engine,engine:chunk=0"]
    assert main([*argv, "--repeat", "2", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    order = re.findall(r"^(\S+): 1 users x 1 turns", out, re.MULTILINE)
    assert order == ["engine", "engine:chunk=0"] * 2
    import json

    designs = json.loads(report.read_text())["designs"]
    for figures in designs.values():
        speeds = figures["tokens_per_s_runs"]
        assert len(speeds) == 2 and figures["tokens_per_s"] == min(speeds)  # the lower median


async def test_timed_turns_continue_a_conversation_already_held_when_told():
    """``--history N``: each user's conversation holds N earlier exchanges when the clock
    starts; their last message is answered first (the dialogue's cache then holds it all),
    untimed, and every timed prompt continues that conversation, memory after the facts."""
    from bot.engine.bench import FACTS_EXCHANGE, Tally, converse

    class Recording:
        def __init__(self) -> None:
            self.prompts: list[list[str]] = []

        async def generate(self, turns, params, key=None, stats=None):
            self.prompts.append(list(turns))
            await asyncio.sleep(0.3 if len(self.prompts) <= 2 else 0.02)  # warm-ups are slow
            return f"reply {key} {len(self.prompts)}"

    messages = [[f"u{user} m{turn}" for turn in range(2)] for user in range(2)]
    histories = [[f"u{user} old", f"u{user} old reply"] * 2 for user in range(2)]
    backend, tally = Recording(), Tally(2)
    at_clock: list[int] = []
    wall = await converse(
        backend,
        messages,
        None,
        tally,
        "end",
        1,
        histories,
        lambda: at_clock.append(len(backend.prompts)),
    )
    assert at_clock == [2]  # once, when both users' conversations were warm
    assert len(tally.latencies) == 4  # the warm-up answers are not timed
    assert all(0.02 <= took < 0.3 for took in tally.latencies), tally.latencies
    assert 0.04 <= wall < 0.3  # two timed turns each, the warm-up left out
    warm = backend.prompts[:2]
    assert sorted(p[len(FACTS_EXCHANGE) :] for p in warm) == [histories[0][:-1], histories[1][:-1]]
    for prompt in backend.prompts[2:]:
        user = prompt[-1].split()[0]
        earlier = prompt[len(FACTS_EXCHANGE) : len(FACTS_EXCHANGE) + 4]
        assert earlier[:3] == [f"{user} old", f"{user} old reply", f"{user} old"]
        assert earlier[3].startswith(f"reply {int(user[1:])} ")  # the reply written warm
