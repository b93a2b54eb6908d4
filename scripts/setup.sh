#!/usr/bin/env bash
# Installs what building and testing vme needs on a Debian 12 host, when it is missing.
# Idempotent and quiet when everything is present. Guest images install their own build
# dependencies (images/build.sh).
set -euo pipefail

die() {
	echo "scripts/setup.sh: error: $*" >&2
	exit 1
}

command -v cargo >/dev/null || die "no Rust toolchain: install rustup's stable toolchain (cargo, rustfmt, clippy)"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"

is_installed() {
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# apt_install [-t RELEASE] PACKAGE...
apt_install() {
	local release=() missing=() p
	if [ "${1:-}" = -t ]; then
		release=(-t "$2")
		shift 2
	fi
	for p in "$@"; do
		is_installed "$p" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}: run as root or apt-get install them"
	echo "setup: installing ${missing[*]}" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${release[@]}" "${missing[@]}" >/dev/null 2>&1 || {
		apt-get update -q >/dev/null
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${release[@]}" "${missing[@]}" >/dev/null
	}
}

# The machine's qemu-utils comes from bookworm-backports, and bookworm's own qemu-system
# packages conflict with it: the QEMU peers used by the benchmarks and image checks must
# come from backports too. The mirror is the one the host already uses.
ensure_backports() {
	grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
	local uri
	uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
	[ -n "$uri" ] || uri=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
	[ -n "$uri" ] || die "cannot find the Debian mirror in /etc/apt/sources.list*: add bookworm-backports yourself"
	printf 'Types: deb deb-src\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
		"$uri" >/etc/apt/sources.list.d/vme-backports.sources
	apt-get update -q >/dev/null
}

apt_install build-essential pkg-config cpio xz-utils zstd python3
if ! is_installed qemu-system-x86 || ! is_installed qemu-system-misc; then
	ensure_backports
	if apt-cache policy qemu-utils | grep -q 'Installed:.*bpo'; then
		apt_install -t bookworm-backports qemu-system-x86 qemu-system-misc
	else
		apt_install qemu-system-x86 qemu-system-misc
	fi
fi

if [ ! -e /dev/kvm ]; then
	echo "setup: note: /dev/kvm is missing: x86_64 VMs cannot run here (load kvm_intel or kvm_amd);" \
		"riscv64 VMs still run. Set VME_SKIP_KVM_TESTS=1 to skip KVM tests knowingly." >&2
fi
