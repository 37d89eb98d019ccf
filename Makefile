.PHONY: setup demo test bench bench-quick lint kernel-test

setup:
	sh scripts/setup.sh

demo:
	sh scripts/demo.sh

test:
	sh scripts/test.sh

# Every benchmark; writes benchmarks/results.json with the commit and date of this run.
bench:
	sh scripts/bench.sh

# The benchmarks that take seconds, failing when a same-run ratio leaves its band (CI).
bench-quick:
	sh scripts/bench.sh --quick

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

# The kernel WireGuard backend, in Debian's kernel under QEMU (slow: minutes).
kernel-test:
	sh scripts/kernel-test.sh
