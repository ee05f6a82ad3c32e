# zrelay: the front door.
#   make demo   primary + replica on loopback with a sample workload (Ctrl-C to stop)
#   make test   everything CI runs: fmt, clippy, unit and integration tests
#   make bench  side-by-side benchmark (direct ZEO vs through zrelay), replication lag/catch-up, clone vs catch-up, doors
#   make docker-check  build the docker/ runtime image with podman and check it (needs root; not in make test)
SHELL := /bin/bash
CARGO ?= cargo
# Integration tests each start runzeo and zrelay processes; on a 2-core
# machine a few at a time keeps them fast and far from their deadlines.
TEST_THREADS ?= 4

.PHONY: all build release venv tools test lint demo bench clean docker-check

all: build

# protoc (etcd-client's build script) comes from scripts/ensure-tools.sh.
build: tools
	$(CARGO) build

release: tools
	$(CARGO) build --release

venv:
	@scripts/ensure-venv.sh

tools:
	@scripts/ensure-tools.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

test: venv tools lint
	$(CARGO) test --all-targets -- --test-threads=$(TEST_THREADS)

demo: venv release
	@scripts/demo.sh

bench: venv release
	.venv/bin/python bench/bench.py --zrelay target/release/zrelay
	.venv/bin/python bench/repl_bench.py --zrelay target/release/zrelay
	.venv/bin/python bench/door_bench.py --zrelay target/release/zrelay
	.venv/bin/python bench/clone_bench.py --zrelay target/release/zrelay

# The runtime image from a debootstrap base and the host-built binary,
# checked by chroot (podman run does not work in every sandbox). Minutes, so
# not part of `make test`; run before each release. See docker/README.md.
docker-check: release
	scripts/docker-check.sh

clean:
	$(CARGO) clean
	rm -rf .venv
