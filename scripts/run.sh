#!/usr/bin/env bash
# `make run`: boots the tiny riscv64 guest on the software machine with an interactive shell on
# the console (type `poweroff` to end it). Set VME_RUN_ARCH=x86_64 for the KVM machine.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
vmm=$target/release/vme-vmm
arch=${VME_RUN_ARCH:-riscv64}
case "$arch" in
riscv64) kernel=$target/images/tiny-riscv64/Image initrd=$target/images/tiny-riscv64/initramfs.cpio ;;
x86_64) kernel=$target/images/tiny/vmlinux initrd=$target/images/tiny/initramfs.cpio ;;
*)
	echo "run.sh: VME_RUN_ARCH must be riscv64 or x86_64, not $arch" >&2
	exit 1
	;;
esac
echo "Booting the tiny $arch guest (2 vCPUs, 256M). In the guest: try 'nproc', 'cat /proc/cpuinfo'; 'poweroff' ends it." >&2
exec "$vmm" --arch "$arch" --kernel "$kernel" --initrd "$initrd" --vcpus 2 --memory 256M \
	--cmdline "console=ttyS0 quiet panic=-1"
