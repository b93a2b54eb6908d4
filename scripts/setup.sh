#!/usr/bin/env bash
# Installs what building and testing vme needs on a Debian 12 host, when it is missing.
# Idempotent and quiet when everything is present. Guest images install their own build
# dependencies (images/build.sh).
set -euo pipefail
VME_SCRIPT=scripts/setup.sh
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v cargo >/dev/null || die "no Rust toolchain: install rustup's stable toolchain (cargo, rustfmt, clippy)"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"

# iproute2: vmed makes project networks (namespaces, bridges, taps) with ip; the net tests too.
ensure_pkgs build-essential pkg-config cpio xz-utils zstd python3 shellcheck iproute2
# qemu-utils: qemu-img and qemu-io make the qcow2 images vme-image's import is tested against.
if ! is_installed qemu-system-x86 || ! is_installed qemu-system-misc || ! is_installed qemu-utils; then
	ensure_backports
	if qemu_from_backports; then
		ensure_pkgs -t bookworm-backports qemu-system-x86 qemu-system-misc qemu-utils
	else
		ensure_pkgs qemu-system-x86 qemu-system-misc qemu-utils
	fi
fi

if [ ! -e /dev/kvm ]; then
	echo "setup: note: /dev/kvm is missing: x86_64 VMs cannot run here (load kvm_intel or kvm_amd);" \
		"riscv64 VMs still run. Set VME_SKIP_KVM_TESTS=1 to skip KVM tests knowingly." >&2
fi
