"""Helpers for `scripts/bench_overload.py` (processes, open-loop load, report)."""
