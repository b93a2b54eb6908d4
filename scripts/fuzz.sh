#!/bin/bash
# make fuzz: runs every cargo fuzz target in fuzz/ for FUZZ_SECONDS (default 60) each.
# libFuzzer needs unstable compiler flags; RUSTC_BOOTSTRAP lets the stable toolchain
# accept them, so no nightly toolchain is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
VME_SCRIPT=fuzz
. scripts/lib.sh
ensure_pkgs g++
command -v cargo-fuzz >/dev/null || quiet cargo install cargo-fuzz --locked
seconds=${FUZZ_SECONDS:-60}
export RUSTC_BOOTSTRAP=1
mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
for t in "${targets[@]}"; do
	echo "fuzz: $t for ${seconds}s"
	cargo fuzz run --fuzz-dir fuzz "$t" -- -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=1024 \
		-print_final_stats=1 2>&1 | grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|==|SUMMARY|Done)' || true
	# A crash leaves an artifact and a non-zero status; say which target.
	if ls "fuzz/artifacts/$t"/crash-* >/dev/null 2>&1; then
		die "fuzz target $t found a crash: see fuzz/artifacts/$t (reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $t <file>)"
	fi
done
echo "fuzz: no target found a crash"
