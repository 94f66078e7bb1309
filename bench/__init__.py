"""Benchmarks, run as `python -m bench.<name>`; imported by nothing but their own tests."""
