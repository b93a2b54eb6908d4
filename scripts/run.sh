#!/usr/bin/env bash
# `make run`: the environment's main job. Starts the daemon (vmed) on a state dir under the
# build tree, launches two VMs for two tenants side by side (an x86_64 one on KVM and a riscv64
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
if ! vme list >/dev/null 2>&1; then
	echo "Starting vmed (state in $run/state, API on $sock, log in $run/vmed.log)" >&2
	setsid "$bin/vmed" --socket "$sock" --state-dir "$run/state" --stop-timeout 10 \
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

# name arch kernel initrd: two tenants' VMs, each on its own machine kind.
vms=(
	"acme-web x86_64 $target/images/tiny/vmlinux $target/images/tiny/initramfs.cpio"
	"globex-db riscv64 $target/images/tiny-riscv64/Image $target/images/tiny-riscv64/initramfs.cpio"
)
for vm in "${vms[@]}"; do
	read -r name arch kernel initrd <<<"$vm"
	state=$(vme info "$name" 2>/dev/null | sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p' | head -1 || true)
	case "$state" in
	"") vme launch "$name" --arch "$arch" --kernel "$kernel" --initrd "$initrd" \
		--vcpus 2 --memory 256M --cmdline "console=ttyS0 quiet panic=-1" ;;
	running | starting | paused) ;;
	*) vme start "$name" ;;
	esac
done
echo
vme list
echo

# Each guest prints VME-GUEST-READY once its user space is up (x86_64 guests boot in minutes
# on hosts whose KVM is PVM; riscv64 in seconds).
for vm in "${vms[@]}"; do
	read -r name _ <<<"$vm"
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
		read -r name _ <<<"$vm"
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
  $bin/vme --socket $sock launch --help
The daemon's log is $run/vmed.log; 'make run' again finds it and the VMs where they are.
EOF
