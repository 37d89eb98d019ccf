.PHONY: setup demo test bench lint kernel-test

setup:
	sh scripts/setup.sh

demo:
	sh scripts/demo.sh

test:
	sh scripts/test.sh

bench:
	sh scripts/bench.sh

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

# The kernel WireGuard backend, in Debian's kernel under QEMU (slow: minutes).
kernel-test:
	sh scripts/kernel-test.sh
