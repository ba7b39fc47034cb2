"""Benchmarks: ``python -m bench`` (``just bench``) runs every ``bench/bench_*.py`` module's
``main(argv)``; ``python -m bench.bench_<name>`` runs one. Results go to bench/results/.

Kept import-free: the Freak side of the control benchmark imports ``bench.control.*`` from
Freak's own venv, which has none of runctl's dependencies.
"""
