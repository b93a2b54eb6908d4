# vme: `make run` and `make test` work on a fresh Debian 12 host as root; both install
# what is missing first. See README.md.

CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target
VMM := $(CARGO_TARGET_DIR)/release/vme-vmm
IMAGES := $(CARGO_TARGET_DIR)/images

.PHONY: all setup build images lint test unit run bench fuzz clean

all: build

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release --workspace --bins

# Guest kernels are cached in /var/cache/vme (keyed by their inputs): built once per machine.
images: setup
	images/build.sh all

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	shellcheck -x scripts/*.sh images/*.sh bench/*.sh .ci/run
	shellcheck --shell=dash images/init/init  # busybox ash, checked as its POSIX subset

# Every test: unit tests, instruction-level machine tests, and integration tests that boot
# real guests (they find the images under target/images). VME_TEST_RUN lets every test
# binary of this run share one booted guest (tests/common/booted.rs); older runs' go.
test: build images lint
	rm -rf $(CARGO_TARGET_DIR)/tmp/booted
	VME_TEST_RUN=$$(date +%s)-$$$$ $(CARGO) test --workspace --release
	# The seccomp escape drills need a monitor built with the test-only drill hooks: built
	# apart, so the monitor in target/release never has them.
	mkdir -p $(CARGO_TARGET_DIR)/drill && ln -sfn $(IMAGES) $(CARGO_TARGET_DIR)/drill/images
	CARGO_TARGET_DIR=$(CARGO_TARGET_DIR)/drill $(CARGO) test --release -p vme-vmm \
		--features seccomp-drill --test seccomp --test jail -- forbidden drill
	# The daemon reports a drilled monitor's seccomp kill as a security event (it runs
	# the drill monitor built just above).
	$(CARGO) test --release -p vmed --features seccomp-drill --test isolation

# Boots the tiny image and attaches its console (see README: "A first VM").
run: build images
	@scripts/run.sh

bench: build images
	bench/run.sh

# Each virtio device's queue handler under libFuzzer for FUZZ_SECONDS (60) each; not part of
# `make test` (random-input unit tests of the same harness are).
fuzz: setup
	scripts/fuzz.sh

clean:
	$(CARGO) clean
