"""Helpers for `scripts/bench_decode.py` (artifact preparation, contenders, report)."""
