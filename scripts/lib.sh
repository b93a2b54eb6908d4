# shellcheck shell=bash
# Shared by scripts/setup.sh and images/build.sh: errors, quiet commands, and installing
# Debian packages on demand from the mirror the host already uses. Source it after setting
# VME_SCRIPT (the name errors carry) and, optionally, VME_DIE_STATUS (default 1).

die() {
	echo "${VME_SCRIPT:-vme}: error: $*" >&2
	exit "${VME_DIE_STATUS:-1}"
}

# Runs a noisy command with its output in a log; shows the log only on failure.
quiet() {
	local log
	log=$(mktemp /tmp/vme-setup.XXXXXX.log)
	if ! "$@" >"$log" 2>&1; then
		tail -n 60 "$log" >&2
		die "command failed: $* (full log: $log)"
	fi
	rm -f "$log"
}

need_root_for() {
	[ "$(id -u)" = 0 ] || die "$1 needs root (run as root, or install it yourself: $2)"
}

APT_UPDATED=0
apt_update() {
	if [ "$APT_UPDATED" = 0 ]; then
		quiet apt-get update
		APT_UPDATED=1
	fi
}

is_installed() {
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# Installs the given Debian packages when missing. The first argument may be
# "-t <release>" to take them from that release (backports).
ensure_pkgs() {
	local release=() missing=() p
	if [ "${1:-}" = -t ]; then
		release=(-t "$2")
		shift 2
	fi
	for p in "$@"; do
		is_installed "$p" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	need_root_for "installing ${missing[*]}" "apt-get install ${missing[*]}"
	echo "${VME_SCRIPT:-vme}: installing ${missing[*]}" >&2
	# A fresh machine may have stale package lists: retry once after an update.
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${release[@]}" "${missing[@]}" >/dev/null 2>&1; then
		apt_update
		quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y "${release[@]}" "${missing[@]}"
	fi
}

# The URI of the main Debian archive, from the machine's own sources, so we
# use the same mirror (or snapshot) as the rest of the system.
debian_mirror() {
	local f uri
	for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		# deb822: the URIs of the first stanza whose Suites include "bookworm".
		uri=$(awk '
			/^[ \t]*$/ { if (suite && uri) { print uri; exit } suite = 0; uri = "" ; next }
			/^URIs:/ { uri = $2 }
			/^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") suite = 1 }
			END { if (suite && uri) print uri }' "$f" | head -n1)
		[ -n "$uri" ] && { echo "$uri"; return 0; }
	done
	if [ -f /etc/apt/sources.list ]; then
		uri=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)
		[ -n "$uri" ] && { echo "$uri"; return 0; }
	fi
	die "cannot find the Debian bookworm archive in /etc/apt/sources.list{,.d}: add a 'deb <your mirror> bookworm main' line"
}

# Adds a deb822 source file unless it is there already.
ensure_apt_source() {
	local types=$2 suites=$3 file=/etc/apt/sources.list.d/$1.sources
	[ -f "$file" ] && return 0
	need_root_for "adding $file" "add a '$types' source for $suites"
	printf 'Types: %s\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
		"$types" "$(debian_mirror)" "$suites" >"$file"
	APT_UPDATED=0
	apt_update
}

# The machine's qemu-utils comes from bookworm-backports, and bookworm's own QEMU packages
# conflict with it: QEMU and OpenSBI peers come from backports too.
ensure_backports() {
	# Not "apt-cache policy | grep -q": under pipefail, grep's early exit fails the pipe.
	local policy
	policy=$(apt-cache policy 2>/dev/null || true)
	grep -q 'a=bookworm-backports\|n=bookworm-backports' <<<"$policy" && return 0
	ensure_apt_source vme-backports 'deb deb-src' bookworm-backports
}

# True when the host's qemu-utils comes from backports: then every QEMU package must.
qemu_from_backports() {
	local policy
	policy=$(apt-cache policy qemu-utils 2>/dev/null || true)
	grep -q 'Installed:.*bpo' <<<"$policy"
}
