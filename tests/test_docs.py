"""The README and docs/ stay true to the project: short front door, every target and setting
documented, benchmark tables exactly what the stored results render to."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _documentation() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in [README, *DOCS])


def _make_targets() -> list[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return sorted({m.group(1) for m in re.finditer(r"^([a-z][a-z-]*):", text, flags=re.MULTILINE)})


def _settings() -> list[str]:
    """Every variable ``.env.example`` sets or shows commented out."""
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    return sorted(set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE)))


def test_the_readme_is_a_front_door():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_every_make_target_is_documented():
    docs = _documentation()
    targets = _make_targets()
    assert {"test", "run", "bench-report"} <= set(targets)
    assert [t for t in targets if f"make {t}" not in docs] == []


def test_every_setting_is_documented():
    docs = _documentation()
    settings = _settings()
    assert {"TELEGRAM_BOT_TOKEN", "DATABASE_URL", "MODEL_PATH"} <= set(settings)
    assert [s for s in settings if not re.search(rf"\b{s}\b", docs)] == []


def test_each_guide_is_linked_from_the_readme():
    readme = README.read_text(encoding="utf-8")
    assert [p.name for p in DOCS if f"docs/{p.name}" not in readme] == []


def test_the_benchmark_tables_are_what_the_stored_results_render():
    runs = report.load_results()
    assert report.DOC.read_text(encoding="utf-8") == report.render_doc(runs)
    readme = README.read_text(encoding="utf-8")
    assert readme == report.with_headline(readme, report.render_headline(runs))


def test_a_stored_run_shows_up_in_the_tables(tmp_path):
    """The renderer is no stamp: a run's machine and figures reach both tables."""
    import json

    machine = {
        "cpu": "Test CPU 9000",
        "cpu_flags": ["avx2"],
        "cpu_capability": "AVX2",
        "cores": 2,
        "memory_gib": 24.0,
        "accelerator": None,
        "torch": "2.13.0",
        "transformers": "5.23.0",
        "python": "3.11.7",
        "commit": "abc",
        "date": "2026-12-07T00:00:00+00:00",
    }
    run = {
        "benchmark": "serving",
        "machine": machine,
        "settings": {"shape": "medium", "users": 8, "turns": 4, "reply_tokens": 40},
        "designs": {
            "naive": {
                "tokens_per_s": 10.0,
                "p50_s": 20.0,
                "p95_s": 30.0,
                "first_token_p50_s": 5.0,
                "peak_rss_mb": 2000.0,
            },
            "engine": {
                "tokens_per_s": 55.5,
                "p50_s": 2.0,
                "p95_s": 3.0,
                "first_token_p50_s": 0.5,
                "peak_rss_mb": 2500.0,
                "decode_step_p50_ms": 31.1,
                "decode_rows": 8,
                "tokens_per_s_runs": [55.5, 60.25, 50.0],
                "decode_step_p50_ms_runs": [31.1, 29.0, 35.0],
            },
        },
    }
    (tmp_path / "run.json").write_text(json.dumps(run), encoding="utf-8")
    runs = report.load_results(tmp_path)
    doc, headline = report.render_doc(runs), report.render_headline(runs)
    assert "Test CPU 9000, 2 cores (AVX2)" in doc and "Test CPU 9000" in headline
    assert "| `engine` | 55.50 | 5.55× |" in doc and "5.55×" in headline
    assert "31.1 (8 rows)" in doc
    assert "`engine` 55.50, 60.25, 50.00 (decoding step p50 31.1, 29.0, 35.0 ms)" in doc


def test_fault_runs_are_counted_per_fault_into_their_table():
    """make test-chaos --json: each fault's runs summed, the runs that left an orphan
    counted apart, rendered as one row a fault."""
    from tests.load.chaos import by_fault

    results = [
        {"fault": "single_killed", "run": run, "messages": 32, "lost": 0, "shown_twice": 0}
        | {"out_of_order": 0, "orphans": orphans, "answered_twice": 0}
        for run, orphans in enumerate((0, 2, 0, 1, 0))
    ]
    faults = by_fault(results)
    assert faults["single_killed"] == {
        "runs": 5,
        "messages": 160,
        "lost": 0,
        "shown_twice": 0,
        "out_of_order": 0,
        "orphans": 3,
        "runs_with_orphans": 2,
    }
    table = report.chaos_table({"faults": faults})
    assert table[-1] == "| `single_killed` | 5 | 160 | 0 | 0 | 0 | 3 | 2 of 5 |"
