# zrelay: the front door.
#   make demo   primary + replica on loopback with a sample workload (Ctrl-C to stop)
#   make demo-ha  etcd + three nodes with [coordinator]: the primary is killed, a replica takes over
#   make test   everything CI runs: fmt, clippy, unit and integration tests
#   make bench  side-by-side benchmarks (direct ZEO vs zrelay vs HAProxy), replication lag/catch-up, memory, clone vs catch-up, doors, failover
#   make bench-failover  only the failover benchmark (etcd + three nodes on loopback, ~2 min)
#   make docker-check  build the docker/ runtime image with podman and check it (needs root; not in make test)
#   make fuzz   coverage-guided fuzzing of every decoder, FUZZ_SECONDS each (not part of `make test`)
SHELL := /bin/bash
CARGO ?= cargo
# Integration tests each start runzeo and zrelay processes; on a 2-core
# machine a few at a time keeps them fast and far from their deadlines.
TEST_THREADS ?= 4

.PHONY: all build release venv tools bench-tools test lint demo demo-ha bench fuzz clean docker-check bench-failover

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

# HAProxy and cc, which the relay benchmark compares zrelay with.
bench-tools:
	@scripts/ensure-bench-tools.sh

# The last line keeps the fuzz crate (make fuzz) building against today's
# API (~2 min on a fresh machine); it went stale once unnoticed.
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) check --quiet --manifest-path fuzz/Cargo.toml --bins

test: venv tools lint
	$(CARGO) test --all-targets -- --test-threads=$(TEST_THREADS)

demo: venv release
	@scripts/demo.sh

# etcd comes from scripts/ensure-tools.sh (the release target runs it).
demo-ha: venv release
	@scripts/demo-ha.sh

bench: venv bench-tools release
	.venv/bin/python bench/bench.py --zrelay target/release/zrelay
	.venv/bin/python bench/repl_bench.py --zrelay target/release/zrelay
	.venv/bin/python bench/semisync_bench.py --zrelay target/release/zrelay
	.venv/bin/python bench/door_bench.py --zrelay target/release/zrelay
	.venv/bin/python bench/rt_profile.py --zrelay target/release/zrelay
	.venv/bin/python bench/clone_bench.py --zrelay target/release/zrelay
	.venv/bin/python bench/mem_bench.py --zrelay target/release/zrelay
	.venv/bin/python bench/failover_bench.py --zrelay target/release/zrelay

# Failover time (primary killed -> new primary writable through a door), etcd on loopback.
bench-failover: venv tools release
	.venv/bin/python bench/failover_bench.py --zrelay target/release/zrelay

# The runtime image from a debootstrap base and the host-built binary,
# checked by chroot (podman run does not work in every sandbox). Minutes, so
# not part of `make test`; run before each release. See docker/README.md.
docker-check: release
	scripts/docker-check.sh

# libFuzzer (libfuzzer-sys) on the stable toolchain: coverage comes from
# LLVM's sancov pass (stable -C flags, no sanitizer, so no nightly). The
# flags apply to the target only (--target), not to build scripts. Seeds:
# captured ZEO frames, stream messages, the example configs (fuzz/src/seed.rs).
# A crash leaves its input in fuzz/artifacts/TARGET/ and stops the run.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= zeo_frame zeo_message_pickle zeo_message_msgpack stream_message config_toml admin_duration admin_http cert_names pem_files
FUZZ_HOST := $(shell rustc -vV | sed -n 's/^host: //p')
FUZZ_RUSTFLAGS := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
	-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
	-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks

fuzz:
	cd fuzz && $(CARGO) build --release --bin seed
	cd fuzz && RUSTFLAGS="$(FUZZ_RUSTFLAGS)" $(CARGO) build --release --target $(FUZZ_HOST) \
		--target-dir target/instrumented $(addprefix --bin ,$(FUZZ_TARGETS))
	fuzz/target/release/seed fuzz/corpus
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/artifacts/$$t; \
		echo "== fuzz $$t for $(FUZZ_SECONDS)s"; \
		fuzz/target/instrumented/$(FUZZ_HOST)/release/$$t -max_total_time=$(FUZZ_SECONDS) \
			-rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
			-artifact_prefix=fuzz/artifacts/$$t/ fuzz/corpus/$$t 2>&1 | tail -n 12; \
		test $${PIPESTATUS[0]} -eq 0; \
	done

clean:
	$(CARGO) clean
	rm -rf .venv
