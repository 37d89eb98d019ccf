"""Benchmarks of wiregate: each module has ``run() -> dict[str, float]`` and a ``__main__``."""
