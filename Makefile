# zrelay: the front door.
#   make demo   primary + replica on loopback with a sample workload (Ctrl-C to stop)
#   make test   everything CI runs: fmt, clippy, unit and integration tests
#   make bench  side-by-side benchmark (direct ZEO vs zrelay vs HAProxy), replication lag/catch-up, memory
SHELL := /bin/bash
CARGO ?= cargo
# Integration tests each start runzeo and zrelay processes; on a 2-core
# machine a few at a time keeps them fast and far from their deadlines.
TEST_THREADS ?= 4

.PHONY: all build release venv tools bench-tools test lint demo bench clean

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

venv:
	@scripts/ensure-venv.sh

tools:
	@scripts/ensure-tools.sh

# HAProxy and cc, which the relay benchmark compares zrelay with.
bench-tools:
	@scripts/ensure-bench-tools.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

test: venv tools lint
	$(CARGO) test --all-targets -- --test-threads=$(TEST_THREADS)

demo: venv release
	@scripts/demo.sh

bench: venv bench-tools release
	.venv/bin/python bench/bench.py --zrelay target/release/zrelay
	.venv/bin/python bench/repl_bench.py --zrelay target/release/zrelay
	.venv/bin/python bench/mem_bench.py --zrelay target/release/zrelay

clean:
	$(CARGO) clean
	rm -rf .venv
