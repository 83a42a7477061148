"""Benchmarks of infini-bench: `python -m bench.bench --help`."""
