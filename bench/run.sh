#!/usr/bin/env bash
# `make bench`: every benchmark, one JSON line per tool and measurement. Peers (QEMU, and
# Firecracker when FIRECRACKER_BIN names one) run in the same invocation as vme-vmm.
# Needs root (bench/io.py creates network namespaces and taps).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "# boot: x86_64 on KVM (BENCH_RUNS=${BENCH_RUNS:-10})" >&2
BENCH_ARCH=x86_64 python3 bench/boot.py
echo "# boot: riscv64 software machine vs QEMU TCG" >&2
BENCH_ARCH=riscv64 python3 bench/boot.py
echo "# riscv64: CPU-bound guest work vs QEMU TCG" >&2
python3 bench/riscv_cpu.py
echo "# disk and TCP: riscv64 vs QEMU TCG and the host; x86_64 once, QEMU's failure on PVM" >&2
python3 bench/io.py
echo "# snapshots: size, time, restore to running and to a guest that answers (riscv64 vs QEMU TCG; x86_64 probe)" >&2
python3 bench/snapshot.py
echo "# live migration: riscv64 1 GiB guest on loopback, idle and dirtying (total, downtime)" >&2
python3 bench/migrate.py
echo "# the daemon: create->running for 20 VMs at once vs monitors started by hand, list of 1,000, RSS" >&2
python3 bench/vmed.py
echo "# images: import throughput vs sha256sum + cp + sync of the same files; launch from an image vs from paths" >&2
python3 bench/images.py
echo "# qcow2 import: conversion of a 1 GiB disk (half data) vs qemu-img convert -O raw (+ sha256sum)" >&2
cargo build --release -q -p vme-image --examples
python3 bench/qcow2.py
echo "# thin clones: thin_clone vs cp of a 1 GiB image (time, disk); riscv64 guest I/O on an overlay vs a raw disk" >&2
python3 bench/thin.py
echo "# audit log: a recorded request vs the same request unrecorded (one durable append), 20 clients at once" >&2
python3 bench/audit.py
echo "# isolation: allowed syscalls per thread kind vs Firecracker's filters; riscv64 boot jailed vs not" >&2
python3 bench/isolation.py
