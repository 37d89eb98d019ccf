"""Test harnesses shared by the tests, the benchmarks and the demo (not shipped)."""
