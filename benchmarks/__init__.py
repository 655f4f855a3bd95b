"""Benchmark results as data: the machine each figure came from (:mod:`benchmarks.machine`),
the stored runs (``benchmarks/results/``) and the tables rendered from them
(:mod:`benchmarks.report`, ``make bench-report``). The benchmarks themselves live beside what
they measure: ``bot/engine/bench.py`` (serving) and ``trainer/bench.py`` (training)."""
