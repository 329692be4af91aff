"""Benchmark helpers: artifact preparation and contenders of `bench_decode.py`, and the
environment facts and BENCHMARKS.md section writer (report.py) every benchmark script uses."""
