#!/usr/bin/env bash
# `make run`: the environment's main job. Starts the daemon (vmed) on a state dir under the
# build tree, imports the built-in catalogue (the images under target/images, signed with a
# publisher key made for this install; the daemon launches only images that key signed),
# launches two VMs from it for two tenants side by side (an x86_64 one on KVM and a riscv64
# one on the software machine), shows `vme list` and what each guest printed, and leaves them
# running for `vme console`. With --once (or RUN_ONCE=1) it stops them and the daemon at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
bin=$target/release
run=$target/run
sock=$run/vme.sock
once=${RUN_ONCE:-0}
for arg in "$@"; do
	case "$arg" in
	--once) once=1 ;;
	*)
		echo "run.sh: unknown argument $arg; the only one is --once" >&2
		exit 2
		;;
	esac
done
vme() { "$bin/vme" --socket "$sock" "$@"; }

mkdir -p "$run"
# This install's image publisher key: made once, kept secret in the build tree.
key=$run/publisher.key
if [ ! -f "$key" ]; then
	vme image keygen "$key" >"$run/publisher.pub" 2>/dev/null
fi
if ! vme list >/dev/null 2>&1; then
	echo "Starting vmed (state in $run/state, API on $sock, log in $run/vmed.log)" >&2
	setsid "$bin/vmed" --socket "$sock" --state-dir "$run/state" --stop-timeout 10 \
		--require-signed true --trusted-key "$(cat "$run/publisher.pub")" \
		>"$run/vmed.log" 2>&1 </dev/null &
	for _ in $(seq 100); do
		vme list >/dev/null 2>&1 && break
		sleep 0.1
	done
	vme list >/dev/null || {
		echo "run.sh: vmed did not start; its log:" >&2
		cat "$run/vmed.log" >&2
		exit 1
	}
fi

# Two tenants, each a project with one user of its own (tokens made once, kept in the build
# tree); root, on the socket, is the bootstrap admin and sees both.
for tenant in "acme alice" "globex bob"; do
	read -r project user <<<"$tenant"
	vme project list | grep -qw "$project" || vme project create "$project" --quota vms=4,vcpus=4,memory=2G
	if [ ! -s "$run/$user.token" ]; then
		vme user list | grep -qw "$user" || vme user add "$user" --project "$project" --role user
		vme token create "$user" >"$run/$user.token"
	fi
done

# The built-in catalogue, imported and signed once, public to every project.
img=$target/images
import() {
	local name=$1
	shift
	vme image info "$name" >/dev/null 2>&1 && return
	vme image import "$name" "$@" --os-version 12 --public
	vme image sign "$name" --key "$key"
}
import tiny --arch x86_64 --kernel "$img/tiny/vmlinux" --initrd "$img/tiny/initramfs.cpio" \
	--cmdline "console=ttyS0 quiet panic=-1" --vcpus 2 --memory 256M
import tiny-riscv64 --arch riscv64 --kernel "$img/tiny-riscv64/Image" \
	--initrd "$img/tiny-riscv64/initramfs.cpio" --cmdline "console=ttyS0 quiet panic=-1" \
	--vcpus 2 --memory 256M
# Debian's userland on an ext4 root: each VM gets a thin clone of it.
import debian --arch x86_64 --os debian --kernel "$img/tiny/vmlinux" \
	--disk "$img/debian/rootfs.ext4" --memory 512M \
	--cmdline "console=ttyS0 root=/dev/vda rw init=/sbin/vme-init quiet panic=-1"
echo
vme image list
echo

# name image project: two tenants' VMs, each on its own machine kind.
vms=(
	"acme-web tiny acme"
	"globex-db tiny-riscv64 globex"
)
for vm in "${vms[@]}"; do
	read -r name image project <<<"$vm"
	state=$(vme info "$name" 2>/dev/null | sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p' | head -1 || true)
	case "$state" in
	"") vme launch "$name" --image "$image" --project "$project" ;;
	running | starting | paused) ;;
	*) vme start "$name" ;;
	esac
done
echo
vme list
echo
# Each tenant sees only its own VM (the other one answers as if it did not exist).
for user in alice bob; do
	echo "As $user:"
	VME_TOKEN=$(cat "$run/$user.token") vme list
done
echo

# Each guest prints VME-GUEST-READY once its user space is up (x86_64 guests boot in minutes
# on hosts whose KVM is PVM; riscv64 in seconds).
for vm in "${vms[@]}"; do
	read -r name _ _ <<<"$vm"
	printf 'Waiting for %s to boot' "$name" >&2
	for _ in $(seq 600); do
		vme console "$name" --show-log | grep -q VME-GUEST-READY && break
		printf . >&2
		sleep 1
	done
	echo >&2
	echo "--- $name: console ---"
	vme console "$name" --show-log | tail -n 20
	echo "---"
done

if [ "$once" = 1 ]; then
	for vm in "${vms[@]}"; do
		read -r name _ _ <<<"$vm"
		vme stop "$name" --force
		vme rm "$name"
	done
	pkill -f "$bin/vmed --socket $sock" || true
	echo "Stopped both VMs and the daemon." >&2
	exit 0
fi
cat >&2 <<EOF
Both VMs keep running. Try:
  $bin/vme --socket $sock list
  $bin/vme --socket $sock console globex-db     # Ctrl-a q detaches
  $bin/vme --socket $sock stop acme-web
  $bin/vme --socket $sock launch web2 --image debian    # a thin clone of the Debian root
  $bin/vme --socket $sock image list
  VME_TOKEN=\$(cat $run/alice.token) $bin/vme --socket $sock list    # acme's view
  $bin/vme --socket $sock audit list                                  # who did what
The daemon's log is $run/vmed.log; 'make run' again finds it and the VMs where they are.
EOF
