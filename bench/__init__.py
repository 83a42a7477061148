"""Benchmarks of infini-bench (issue 6): `python -m bench.bench --help`."""
