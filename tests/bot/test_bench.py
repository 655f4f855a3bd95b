"""``make bench``'s command line: design variants and the background load it competes with."""

import pytest

from bot.engine.bench import BackgroundLoad, main, split_design


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
