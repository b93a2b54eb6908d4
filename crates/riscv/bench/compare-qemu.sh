#!/bin/sh
# Boots the tiny riscv64 image on vme's interpreter (examples/boot) and on
# qemu-system-riscv64 -M virt (TCG, OpenSBI) in the same run, for 1 and 2 harts, and runs a
# CPU-bound shell loop. Prints wall and CPU seconds; the guest prints its own uptime at the
# VME-GUEST-READY marker. Usage: bench/compare-qemu.sh [IMAGE_DIR] (needs a release build of
# the example: cargo build --release -p vme-riscv --example boot).
set -eu
dir=${1:-/work/main/target/images/tiny-riscv64}
boot=${CARGO_TARGET_DIR:-/work/main/target}/release/examples/boot
loop='i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done'
for harts in 1 2; do
	for what in boot loop; do
		if [ $what = boot ]; then run=true; else run=$loop; fi
		echo "== $harts hart(s), $what"
		/usr/bin/time -f "vme:  %e s wall, %U+%S s CPU" "$boot" "$dir/Image" "$dir/initramfs.cpio" \
			"console=ttyS0 quiet vme.run=\"$run\"" "$harts" 256 </dev/null 2>&1 |
			grep -E "VME-GUEST-READY|MIPS|wall" | grep -v "after"
		/usr/bin/time -f "qemu: %e s wall, %U+%S s CPU" qemu-system-riscv64 -M virt -smp "$harts" -m 256 \
			-nographic -kernel "$dir/Image" -initrd "$dir/initramfs.cpio" \
			-append "console=ttyS0 quiet vme.run=\"$run\"" </dev/null 2>&1 |
			grep -E "VME-GUEST-READY|wall"
	done
done
