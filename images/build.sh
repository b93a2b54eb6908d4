#!/usr/bin/env bash
# Builds vme's guest images from Debian packages. See images/README.md.
#
#   images/build.sh tiny | tiny-stock | tiny-riscv64 | debian | all
#   images/build.sh verify-reproducible <image>   build the initramfs (root disk) twice, compare
#   images/build.sh boot-test <image>              boot it under QEMU (TCG), check /init
#   images/build.sh kernel-config <image>          only generate + verify the kernel .config
#
# Outputs land in target/images/<image>/. Kernels, the cross-built busybox and the
# Debian root disk are cached in ${VME_CACHE_DIR:-/var/cache/vme}, keyed by a hash
# of their inputs, so each is built once per machine. Quiet on success; on failure
# says what broke.
set -Eeuo pipefail
# Under pipefail a pipe into "grep -q" may fail when grep exits early (SIGPIPE upstream):
# pipes here end in "grep ... >/dev/null", which reads everything.
# No silent failures: name the command that failed when no die() did.
# die() exits with status 3 after its own message; do not repeat it per caller.
on_err() {
	[ "$1" = 3 ] || echo "images/build.sh: error: line $2: command failed (status $1): $3" >&2
}
trap 'on_err $? $LINENO "$BASH_COMMAND"' ERR

IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$IMAGES_DIR")
OUT_DIR=$REPO_DIR/target/images
CACHE_DIR=${VME_CACHE_DIR:-/var/cache/vme}
# Bump when the build steps change in a way the hashed inputs do not show.
RECIPE=4
# Every timestamp that ends up in an image: reproducible builds.
export SOURCE_DATE_EPOCH=0
export KBUILD_BUILD_TIMESTAMP='Thu Jan  1 00:00:00 UTC 1970'
export KBUILD_BUILD_USER=vme KBUILD_BUILD_HOST=vme KBUILD_BUILD_VERSION=1
export LC_ALL=C TZ=UTC
JOBS=${VME_BUILD_JOBS:-2}

VME_SCRIPT=images/build.sh VME_DIE_STATUS=3
# shellcheck source=scripts/lib.sh
. "$REPO_DIR/scripts/lib.sh"

pkg_version() {
	dpkg-query -W -f='${Version}' "$1"
}

# ------------------------------------------------------------ cache helpers

# Serializes work on one cache entry between concurrent builds (parallel make).
with_lock() {
	local name=$1
	shift
	mkdir -p "$CACHE_DIR"
	(
		flock 9
		"$@"
	) 9>"$CACHE_DIR/.lock-$name"
}

# Copies a file unless the destination already has the same bytes, so a
# rebuild that changes nothing keeps mtimes (and make) quiet.
install_file() {
	local src=$1 dst=$2
	mkdir -p "$(dirname "$dst")"
	if ! cmp -s "$src" "$dst"; then
		cp -f "$src" "$dst.tmp.$$"
		mv -f "$dst.tmp.$$" "$dst"
	fi
}

toolchain_id() {
	local cross=$1
	"${cross}gcc" --version | head -n1
	"${cross}ld" --version | head -n1
}

# --------------------------------------------------------- kernel source

LINUX_PKG=linux-source-6.1

# Our patches to the kernel source (images/kernel/patches/<arch>-*.patch, applied in
# name order). Each touches its architecture's code only, so one patched tree serves
# all, and a kernel's cache key covers only its own architecture's patches.
# kernel_patches [x86|riscv]
kernel_patches() {
	find "$IMAGES_DIR/kernel/patches" -name "${1:-*}-*.patch" 2>/dev/null | LC_ALL=C sort
}

# Extracts Debian's kernel source, with our patches, once per package version and
# patch set; prints its path.
linux_src() {
	local ver dir patches
	ver=$(pkg_version "$LINUX_PKG")
	patches=$(kernel_patches | xargs -r cat | sha256sum | cut -c1-8)
	dir=$CACHE_DIR/src/$LINUX_PKG-$ver-p$patches
	if [ ! -f "$dir/.vme-extracted" ]; then
		with_lock src-linux extract_linux "$dir" >&2
	fi
	echo "$dir"
}

extract_linux() {
	local dir=$1 tmp
	[ -f "$dir/.vme-extracted" ] && return 0
	tmp=$dir.tmp
	rm -rf "$tmp"
	mkdir -p "$tmp"
	tar -xJf "/usr/src/$LINUX_PKG.tar.xz" -C "$tmp" --strip-components=1 ||
		die "cannot extract /usr/src/$LINUX_PKG.tar.xz (reinstall $LINUX_PKG)"
	local p
	for p in $(kernel_patches); do
		patch -d "$tmp" -p1 --forward --quiet <"$p" ||
			die "patch $p does not apply to $LINUX_PKG $(pkg_version "$LINUX_PKG"); refresh it"
	done
	touch "$tmp/.vme-extracted"
	rm -rf "$dir"
	mv "$tmp" "$dir"
}

# Fails loudly when an option of the fragment did not survive olddefconfig
# (a missing dependency, a typo, an option that does not exist in 6.1).
verify_config() {
	local fragment=$1 config=$2 bad=0 line opt want
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*)
			opt=${line%%=*}
			if ! grep -qxF "$line" "$config"; then
				echo "  wanted $line, got: $(grep -E "^(# )?${opt}[= ]" "$config" || echo 'absent (no such option or unmet dependency)')" >&2
				bad=1
			fi
			;;
		"# CONFIG_"*" is not set")
			want=${line#\# }
			opt=${want%% *}
			if grep -qE "^$opt=" "$config"; then
				echo "  wanted $opt off, got: $(grep -E "^$opt=" "$config")" >&2
				bad=1
			fi
			;;
		esac
	done <"$fragment"
	[ "$bad" = 0 ] || die "kernel config $config does not match $fragment (see above); fix the fragment's dependencies"
}

# build_kernel <image> <ARCH> <CROSS_COMPILE> <make targets...> -- <fragments...>
# Leaves the artifacts in $KERNEL_DIR (cache), building them only when absent.
build_kernel() {
	local name=$1 arch=$2 cross=$3
	shift 3
	local targets=() fragments=() key src
	while [ $# -gt 0 ] && [ "$1" != -- ]; do
		targets+=("$1")
		shift
	done
	shift
	fragments=("$@")
	key=$({
		echo "recipe $RECIPE $name $arch ${targets[*]}"
		echo "$LINUX_PKG $(pkg_version "$LINUX_PKG")"
		toolchain_id "$cross"
		cat "${fragments[@]}"
		kernel_patches "${arch%_64}" | xargs -r cat
	} | sha256sum | cut -c1-16)
	KERNEL_DIR=$CACHE_DIR/kernels/$name-$key
	[ -f "$KERNEL_DIR/.vme-done" ] && return 0
	src=$(linux_src)
	with_lock "kernel-$name" compile_kernel "$name" "$arch" "$cross" "$src" "${targets[*]}" "${fragments[@]}"
}

# configure_kernel <source> <build dir> <ARCH> <CROSS_COMPILE> <fragments...>
# tinyconfig's own fragments plus ours, merged by merge_config.sh over
# allnoconfig: an option we do not ask for is off, not at its Kconfig default
# (olddefconfig over tinyconfig would switch on whole menus, e.g. IPv6 and VT,
# as soon as we enable their parent).
configure_kernel() {
	local src=$1 bld=$2 arch=$3 cross=$4
	shift 4
	local srcarch=$arch base
	[ "$arch" = x86_64 ] && srcarch=x86
	base=("$src/kernel/configs/tiny-base.config" "$src/kernel/configs/tiny.config")
	[ -f "$src/arch/$srcarch/configs/tiny.config" ] && base+=("$src/arch/$srcarch/configs/tiny.config")
	rm -rf "$bld"
	mkdir -p "$bld"
	cat "$@" >"$bld/vme.config"
	(cd "$src" && quiet env ARCH="$arch" CROSS_COMPILE="$cross" \
		scripts/kconfig/merge_config.sh -n -O "$bld" "${base[@]}" "$bld/vme.config")
	quiet make -C "$src" O="$bld" ARCH="$arch" CROSS_COMPILE="$cross" olddefconfig
	verify_config "$bld/vme.config" "$bld/.config"
}

compile_kernel() {
	local name=$1 arch=$2 cross=$3 src=$4 words=$5
	shift 5
	local bld t started targets
	read -r -a targets <<<"$words"
	[ -f "$KERNEL_DIR/.vme-done" ] && return 0
	started=$(date +%s)
	# The build directory is a direct subdirectory of the source tree, so kbuild
	# uses the relative srctree ".." and no absolute path enters the image.
	bld=$src/out-$name
	configure_kernel "$src" "$bld" "$arch" "$cross" "$@"
	local mk=(make -C "$src" O="$bld" ARCH="$arch" CROSS_COMPILE="$cross")
	quiet "${mk[@]}" -j"$JOBS" -s "${targets[@]}"
	rm -rf "$KERNEL_DIR.tmp"
	mkdir -p "$KERNEL_DIR.tmp"
	cp "$bld/.config" "$KERNEL_DIR.tmp/config"
	for t in "${targets[@]}"; do
		case "$t" in
		bzImage) cp "$bld/arch/x86/boot/bzImage" "$KERNEL_DIR.tmp/bzImage" ;;
		vmlinux) cp "$bld/vmlinux" "$KERNEL_DIR.tmp/vmlinux" ;;
		Image) cp "$bld/arch/riscv/boot/Image" "$KERNEL_DIR.tmp/Image" ;;
		*) die "internal: no rule to collect kernel target $t" ;;
		esac
	done
	echo "$(($(date +%s) - started))" >"$KERNEL_DIR.tmp/build-seconds"
	touch "$KERNEL_DIR.tmp/.vme-done"
	rm -rf "$KERNEL_DIR"
	mv "$KERNEL_DIR.tmp" "$KERNEL_DIR"
	# The objects are not needed again: the hashed key changes with any input.
	rm -rf "$bld"
}

# Checks that an ELF vmlinux carries the PVH entry note (Xen ELF note type 18,
# XEN_ELFNOTE_PHYS32_ENTRY), without which a monitor cannot boot it via PVH.
check_pvh_note() {
	readelf -nW "$1" | grep -E '^[[:space:]]*Xen[[:space:]].*(\(0x00000012\)|PHYS32_ENTRY)' >/dev/null ||
		die "$1 has no XEN_ELFNOTE_PHYS32_ENTRY note (PVH); the kernel config lacks CONFIG_PVH"
}

# ------------------------------------------------------------- initramfs

# make_initramfs <out.cpio> <busybox binary> <agent binary or ""> [<modules dir> <module list>]
# A directory tree with fixed modes, owners and mtimes, archived in sorted order:
# the same inputs give the same bytes.
make_initramfs() {
	local out=$1 busybox=$2 agent=$3 moddir=${4:-} modlist=${5:-} root
	root=$(mktemp -d /tmp/vme-initramfs.XXXXXX)
	# shellcheck disable=SC2064 # expand now: the trap must remove this very dir
	trap "rm -rf '$root' '$root.cpio'" RETURN
	(
		cd "$root"
		mkdir -p bin sbin usr/bin usr/sbin dev proc sys tmp root etc lib
		cp "$busybox" bin/busybox
		cp "$IMAGES_DIR/init/init" init
		chmod 0755 bin/busybox init
		if [ -n "$agent" ]; then
			cp "$agent" sbin/vme-agent
			chmod 0755 sbin/vme-agent
		fi
		# The kernel opens /dev/console for init before anything is mounted.
		if [ "$(id -u)" = 0 ]; then
			mknod -m 0600 dev/console c 5 1
			mknod -m 0666 dev/null c 1 3
		fi
		if [ -n "$moddir" ]; then
			mkdir -p lib/modules
			cp -R "$moddir/." lib/modules/
			cp "$modlist" etc/vme-modules
		fi
		find . -type d -exec chmod 0755 {} +
		chmod 1777 tmp
		chmod 0700 root
		find . -type f ! -perm -0100 -exec chmod 0644 {} +
		find . -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
		find . -mindepth 1 -printf '%P\n' | sort |
			cpio -o -H newc --reproducible -R 0:0 --quiet
	) >"$root.cpio"
	# Same bytes as before: leave the file (and its mtime) alone.
	install_file "$root.cpio" "$out"
	rm -f "$root.cpio"
}

# -------------------------------------------------------- busybox (riscv64)

# Cross-builds a static riscv64 busybox from Debian's source package, with
# Debian's own busybox-static configuration (the same applets as on x86_64).
build_busybox_riscv64() {
	local srcver key
	ensure_pkgs busybox-static dpkg-dev
	# The source version of the x86_64 busybox we ship: both images match.
	srcver=$(dpkg-query -W -f='${source:Version}' busybox-static)
	key=$({
		echo "recipe $RECIPE busybox $srcver"
		toolchain_id riscv64-linux-gnu-
	} | sha256sum | cut -c1-16)
	BUSYBOX_RISCV64=$CACHE_DIR/busybox/riscv64-$key/busybox
	[ -f "$BUSYBOX_RISCV64" ] && return 0
	with_lock busybox-riscv64 compile_busybox_riscv64 "$srcver"
}

compile_busybox_riscv64() {
	local srcver=$1 dir work src
	dir=$(dirname "$BUSYBOX_RISCV64")
	[ -f "$BUSYBOX_RISCV64" ] && return 0
	if ! apt-cache showsrc "busybox=$srcver" 2>/dev/null | grep '^Package: busybox' >/dev/null; then
		ensure_apt_source vme-bookworm-src deb-src 'bookworm bookworm-updates'
	fi
	# No ":" (the epoch) in the path: make cannot handle it.
	work=$CACHE_DIR/src/busybox-${srcver#*:}
	rm -rf "$work"
	mkdir -p "$work"
	(cd "$work" && quiet apt-get source -q "busybox=$srcver") ||
		die "cannot fetch Debian's busybox source $srcver (is a deb-src line for bookworm configured?)"
	src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'busybox-*' | head -n1)
	[ -n "$src" ] || die "apt-get source busybox=$srcver left no source tree in $work"
	[ -f "$src/debian/config/pkg/static" ] || die "Debian busybox $srcver has no debian/config/pkg/static"
	cp "$src/debian/config/pkg/static" "$src/.config"
	# Debian's static config, with the host compiler swapped for the cross one.
	local mk=(make -C "$src" ARCH=riscv CROSS_COMPILE=riscv64-linux-gnu- CONFIG_EXTRA_CFLAGS=)
	quiet sh -c "yes '' | $(printf '%q ' "${mk[@]}") oldconfig"
	grep -q '^CONFIG_STATIC=y' "$src/.config" || die "busybox config is not static"
	quiet "${mk[@]}" -j"$JOBS" busybox
	file "$src/busybox" | grep 'RISC-V.*statically linked' >/dev/null ||
		die "$src/busybox is not a static RISC-V binary: $(file -b "$src/busybox")"
	mkdir -p "$dir"
	cp "$src/busybox" "$BUSYBOX_RISCV64.tmp"
	mv "$BUSYBOX_RISCV64.tmp" "$BUSYBOX_RISCV64"
	rm -rf "$work"
}

# ---------------------------------------------------------------- images

# The kernel of each image we compile: ARCH, CROSS_COMPILE, targets, fragments.
kernel_recipe() {
	K_FRAGMENTS=("$IMAGES_DIR/kernel/common.config")
	case "$1" in
	tiny)
		K_ARCH=x86_64 K_CROSS=
		K_TARGETS=(bzImage vmlinux)
		K_FRAGMENTS+=("$IMAGES_DIR/kernel/x86_64.config")
		;;
	tiny-riscv64)
		K_ARCH=riscv K_CROSS=riscv64-linux-gnu-
		K_TARGETS=(Image)
		K_FRAGMENTS+=("$IMAGES_DIR/kernel/riscv64.config")
		;;
	*) die "no kernel recipe for '$1' (tiny, tiny-riscv64)" ;;
	esac
}

# Generates and verifies an image's kernel .config without building (seconds,
# not minutes): for editing the fragments. Prints the .config's path.
kernel_config() {
	local src bld
	ensure_pkgs "${KERNEL_BUILD_PKGS[@]}" gcc-riscv64-linux-gnu
	kernel_recipe "$1"
	src=$(linux_src)
	bld=$src/config-$1
	configure_kernel "$src" "$bld" "$K_ARCH" "$K_CROSS" "${K_FRAGMENTS[@]}"
	echo "$bld/.config"
}

KERNEL_BUILD_PKGS=(build-essential bc bison flex libelf-dev libssl-dev cpio kmod file patch "$LINUX_PKG")

image_tiny_riscv64() {
	local out=$OUT_DIR/tiny-riscv64
	ensure_pkgs "${KERNEL_BUILD_PKGS[@]}" gcc-riscv64-linux-gnu libc6-dev-riscv64-cross
	kernel_recipe tiny-riscv64
	build_kernel tiny-riscv64 "$K_ARCH" "$K_CROSS" "${K_TARGETS[@]}" -- "${K_FRAGMENTS[@]}"
	install_file "$KERNEL_DIR/Image" "$out/Image"
	build_busybox_riscv64
	initramfs_tiny_riscv64 "$out/initramfs.cpio"
}

initramfs_tiny_riscv64() {
	build_busybox_riscv64
	build_agent riscv64gc-unknown-linux-gnu
	mkdir -p "$(dirname "$1")"
	make_initramfs "$1" "$BUSYBOX_RISCV64" "$AGENT"
}

image_tiny() {
	local out=$OUT_DIR/tiny
	ensure_pkgs "${KERNEL_BUILD_PKGS[@]}" busybox-static
	kernel_recipe tiny
	build_kernel tiny "$K_ARCH" "$K_CROSS" "${K_TARGETS[@]}" -- "${K_FRAGMENTS[@]}"
	check_pvh_note "$KERNEL_DIR/vmlinux"
	install_file "$KERNEL_DIR/bzImage" "$out/bzImage"
	install_file "$KERNEL_DIR/vmlinux" "$out/vmlinux"
	initramfs_tiny "$out/initramfs.cpio"
}

initramfs_tiny() {
	ensure_pkgs busybox-static cpio
	build_agent
	mkdir -p "$(dirname "$1")"
	make_initramfs "$1" /bin/busybox "$AGENT"
}

# ------------------------------------------------------------- guest agent

# Builds vme-agent (crates/agent) as a static binary for <triple> (default
# x86_64) against glibc's libc.a; sets AGENT. Cargo rebuilds only when its
# sources changed. riscv64 uses Debian's cross gcc as the linker and rustup's
# standard library for that target (added when missing).
build_agent() {
	local triple=${1:-x86_64-unknown-linux-gnu} dir=$REPO_DIR/target/agent linker_var
	command -v cargo >/dev/null || die "no cargo on PATH: install Rust (see README) to build vme-agent"
	case $triple in
	x86_64-*) ensure_pkgs libc6-dev file ;;
	riscv64gc-*)
		ensure_pkgs gcc-riscv64-linux-gnu libc6-dev-riscv64-cross file
		linker_var=CARGO_TARGET_RISCV64GC_UNKNOWN_LINUX_GNU_LINKER
		export "$linker_var=riscv64-linux-gnu-gcc"
		if ! rustup target list --installed 2>/dev/null | grep -qx "$triple"; then
			command -v rustup >/dev/null || die "no rustup: install the Rust standard library for $triple another way to build the riscv64 vme-agent"
			quiet rustup target add "$triple"
		fi
		;;
	*) die "build_agent: no recipe for $triple" ;;
	esac
	# --target keeps the static flag off build scripts and proc macros.
	(cd "$REPO_DIR" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" quiet cargo build \
		--release -p vme-agent --target "$triple" --target-dir "$dir")
	AGENT=$dir/$triple/release/vme-agent
	file "$AGENT" | grep -q 'static' ||
		die "$AGENT is not statically linked: $(file -b "$AGENT")"
}

# ------------------------------------------------- Debian's stock kernel

STOCK_META=linux-image-cloud-amd64
# virtio transports and devices (and their dependencies, resolved by modprobe)
# that /init loads at boot; the stock kernel builds them as modules.
STOCK_MODULES=(virtio_pci virtio_mmio virtio_blk virtio_net virtio_console vsock
	vmw_vsock_virtio_transport virtio_rng virtio_balloon)

# Unpacks the .deb behind linux-image-cloud-amd64 into the cache (never onto
# the host), with the ELF vmlinux and the modules /init needs; sets STOCK_DIR.
fetch_stock_kernel() {
	local pkg ver key
	pkg=$(apt-cache depends "$STOCK_META" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
	if [ -z "$pkg" ]; then
		apt_update
		pkg=$(apt-cache depends "$STOCK_META" | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
	fi
	[ -n "$pkg" ] || die "apt does not know $STOCK_META (is the bookworm main archive in the apt sources?)"
	ver=$(apt-cache show --no-all-versions "$pkg" | awk '/^Version:/ { print $2; exit }')
	[ -n "$ver" ] || die "apt knows no version of $pkg"
	key=$({
		echo "recipe $RECIPE $pkg $ver ${STOCK_MODULES[*]}"
		echo "kmod $(pkg_version kmod)"
	} | sha256sum | cut -c1-16)
	STOCK_DIR=$CACHE_DIR/stock/$pkg-$ver-$key
	[ -f "$STOCK_DIR/.vme-done" ] && return 0
	with_lock stock prepare_stock_kernel "$pkg" "$ver"
}

prepare_stock_kernel() {
	local pkg=$1 ver=$2 tmp deb kver mods m line rel
	[ -f "$STOCK_DIR/.vme-done" ] && return 0
	tmp=$STOCK_DIR.tmp
	rm -rf "$tmp"
	mkdir -p "$tmp/deb" "$tmp/modules"
	# apt-get download writes to the working directory; _apt cannot write to
	# root's private dirs, so apt downloads unsandboxed (a harmless notice).
	(cd "$tmp" && quiet apt-get download -q "$pkg=$ver")
	deb=$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n1)
	[ -n "$deb" ] || die "apt-get download $pkg=$ver produced no .deb"
	dpkg-deb -x "$deb" "$tmp/deb"
	kver=$(find "$tmp/deb/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -n1)
	[ -f "$tmp/deb/boot/vmlinuz-$kver" ] || die "$deb has no /boot/vmlinuz-$kver"
	cp "$tmp/deb/boot/vmlinuz-$kver" "$tmp/vmlinuz"
	extract_vmlinux "$tmp/vmlinuz" "$tmp/vmlinux"
	check_pvh_note "$tmp/vmlinux"
	# The .deb ships no modules.dep (its postinst runs depmod); make one in the
	# cache copy and let modprobe list each module's dependencies in load order.
	quiet depmod -b "$tmp/deb" "$kver"
	mods=$tmp/modules.order
	: >"$mods"
	for m in "${STOCK_MODULES[@]}"; do
		modprobe -d "$tmp/deb" -S "$kver" --show-depends "$m" >"$tmp/deps" 2>&1 ||
			die "module $m is not in $pkg: $(cat "$tmp/deps")"
		while read -r line; do
			case "$line" in
			insmod\ *)
				rel=${line#insmod }
				rel=${rel%% *}
				rel=${rel#"$tmp/deb/lib/modules/$kver/"}
				grep -qxF "$rel" "$mods" || echo "$rel" >>"$mods"
				;;
			builtin\ *) ;;
			*) die "unexpected modprobe output for $m: $line" ;;
			esac
		done <"$tmp/deps"
	done
	# busybox insmod wants plain .ko files: decompress, and list the new names.
	: >"$tmp/vme-modules"
	while read -r rel; do
		mkdir -p "$tmp/modules/$(dirname "$rel")"
		case "$rel" in
		*.ko.xz) xz -dc "$tmp/deb/lib/modules/$kver/$rel" >"$tmp/modules/${rel%.xz}" ;;
		*.ko.zst) zstd -qdc "$tmp/deb/lib/modules/$kver/$rel" >"$tmp/modules/${rel%.zst}" ;;
		*.ko.gz) gzip -dc "$tmp/deb/lib/modules/$kver/$rel" >"$tmp/modules/${rel%.gz}" ;;
		*.ko) cp "$tmp/deb/lib/modules/$kver/$rel" "$tmp/modules/$rel" ;;
		*) die "unexpected module file $rel" ;;
		esac
		echo "${rel%.ko*}.ko" >>"$tmp/vme-modules"
	done <"$mods"
	echo "$kver" >"$tmp/kernel-release"
	rm -rf "$tmp/deb" "$tmp/deps" "$deb"
	touch "$tmp/.vme-done"
	rm -rf "$STOCK_DIR"
	mv "$tmp" "$STOCK_DIR"
}

le32() {
	od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '
}

# Extracts the ELF vmlinux from a bzImage: the setup header gives the offset
# and length of the compressed payload (boot protocol 2.08+), whose last four
# bytes are the decompressed size, not part of the stream.
extract_vmlinux() {
	local bz=$1 out=$2 setup_sects start len magic
	setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
	[ "$setup_sects" = 0 ] && setup_sects=4
	start=$(((setup_sects + 1) * 512 + $(le32 "$bz" $((0x248)))))
	len=$(le32 "$bz" $((0x24c)))
	dd if="$bz" of="$out.z" bs=1M iflag=skip_bytes,count_bytes skip="$start" count=$((len - 4)) status=none
	magic=$(od -An -tx1 -N4 "$out.z" | tr -d ' ')
	case "$magic" in
	fd377a58) xz -dc "$out.z" >"$out" ;;
	1f8b*) gzip -dc "$out.z" >"$out" ;;
	28b52ffd) ensure_pkgs zstd && zstd -qdc "$out.z" >"$out" ;;
	02214c18) ensure_pkgs lz4 && lz4 -qdc "$out.z" >"$out" ;;
	*) die "$bz: unknown kernel compression (payload magic $magic)" ;;
	esac
	rm -f "$out.z"
	[ "$(od -An -c -N4 "$out" | tr -d ' ')" = '177ELF' ] || die "$bz: payload is not an ELF vmlinux"
}

image_tiny_stock() {
	local out=$OUT_DIR/tiny-stock
	ensure_pkgs busybox-static cpio kmod xz-utils binutils
	fetch_stock_kernel
	install_file "$STOCK_DIR/vmlinuz" "$out/vmlinuz"
	install_file "$STOCK_DIR/vmlinux" "$out/vmlinux"
	initramfs_tiny_stock "$out/initramfs.cpio"
}

initramfs_tiny_stock() {
	ensure_pkgs busybox-static cpio kmod xz-utils binutils
	fetch_stock_kernel
	mkdir -p "$(dirname "$1")"
	build_agent
	make_initramfs "$1" /bin/busybox "$AGENT" "$STOCK_DIR/modules" "$STOCK_DIR/vme-modules"
}

# ------------------------------------------------------ Debian root disk

DEBIAN_SUITE=bookworm
# On top of debootstrap's minbase: busybox-static runs the shared init (a busybox
# script, /sbin/vme-init in this image); systemd-sysv is Debian's own init, the
# image's other way to boot.
DEBIAN_INCLUDE=(busybox-static systemd-sysv)
DEBIAN_HOSTNAME=vme-debian
# A fixed file system identity: the same tree gives the same image bytes.
DEBIAN_FS_UUID=5e1f0c6a-0d1b-4c5e-9a57-766d65646562
DEBIAN_FS_HASH_SEED=0e6a9d2b-3f41-4b8c-8d2e-766d65686173

# Unmounts whatever is mounted below a directory (debootstrap mounts proc and sys
# in its target and may leave them behind when it fails), deepest first.
umount_below() {
	local dir m
	dir=$(realpath -m "$1")
	awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
		umount -l "$m" || die "cannot unmount $m (left by an earlier build); unmount it, then retry"
	done
}

# Removes a build tree without crossing into a file system mounted below it.
remove_tree() {
	[ -e "$1" ] || return 0
	umount_below "$1"
	rm -rf --one-file-system "$1"
}

# debootstrap's minbase of DEBIAN_SUITE with DEBIAN_INCLUDE, from the machine's
# mirror, configured for a VM: a directory tree in the cache; sets DEBIAN_BASE.
# The download and unpacking take minutes, so this is done once per set of inputs:
# the packages are the mirror's when the entry was made (packages.txt lists them).
fetch_debian_base() {
	local mirror key
	need_root_for "building the Debian image (debootstrap)" "run images/build.sh debian as root"
	ensure_pkgs debootstrap
	mirror=$(debian_mirror)
	key=$({
		echo "recipe $RECIPE debian $DEBIAN_SUITE amd64 minbase ${DEBIAN_INCLUDE[*]}"
		echo "mirror $mirror"
		echo "debootstrap $(pkg_version debootstrap)"
		# The configuration steps are inputs too: changing them makes a new entry.
		declare -f configure_debian_base
	} | sha256sum | cut -c1-16)
	DEBIAN_BASE=$CACHE_DIR/debian/base-$key
	[ -f "$DEBIAN_BASE/.vme-done" ] && return 0
	with_lock debian-base make_debian_base "$mirror"
}

make_debian_base() {
	local mirror=$1 tmp started
	[ -f "$DEBIAN_BASE/.vme-done" ] && return 0
	started=$(date +%s)
	tmp=$DEBIAN_BASE.tmp
	remove_tree "$tmp"
	mkdir -p "$tmp"
	quiet debootstrap --variant=minbase --arch=amd64 \
		--include="$(IFS=,; echo "${DEBIAN_INCLUDE[*]}")" "$DEBIAN_SUITE" "$tmp/root" "$mirror"
	umount_below "$tmp"
	configure_debian_base "$tmp/root"
	# shellcheck disable=SC2016 # dpkg-query's format, not the shell's
	chroot "$tmp/root" dpkg-query -W -f='${Package} ${Version}\n' >"$tmp/packages.txt"
	echo "$(($(date +%s) - started))" >"$tmp/build-seconds"
	touch "$tmp/.vme-done"
	remove_tree "$DEBIAN_BASE"
	mv "$tmp" "$DEBIAN_BASE"
}

# Makes the debootstrapped tree a VM's root: its own name and no trace of the
# build host, no identity shared between copies of the disk, no way in with a
# password, no build caches or logs.
configure_debian_base() {
	local root=$1
	# debootstrap copies the build host's name and resolver configuration, modes included.
	echo "$DEBIAN_HOSTNAME" >"$root/etc/hostname"
	printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
		"$DEBIAN_HOSTNAME" >"$root/etc/hosts"
	rm -f "$root/etc/resolv.conf"
	# For systemd, which remounts the root as fstab says; vme-init leaves it as the kernel mounted it.
	printf '/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n' >"$root/etc/fstab"
	chmod 0644 "$root/etc/hostname" "$root/etc/hosts" "$root/etc/fstab"
	# Empty: systemd gives each boot an id of its own; no two copies of the disk share one.
	: >"$root/etc/machine-id"
	rm -f "$root/var/lib/dbus/machine-id"
	chroot "$root" passwd -q -l root
	# The password-change dates are the build day: empty them (no password aging).
	sed -i -E 's/^([^:]*:[^:]*:)[0-9]*:/\1:/' "$root/etc/shadow"
	if compgen -G "$root/etc/ssh/ssh_host_*" >/dev/null; then
		die "the Debian image has ssh host keys (an ssh server in DEBIAN_INCLUDE?); every copy would share them"
	fi
	chroot "$root" apt-get clean
	# Package lists are 50 MB and stale soon: "apt-get update" in the guest fetches them.
	find "$root/var/lib/apt/lists" -type f -delete
	rm -f "$root/var/log/bootstrap.log" "$root"/etc/*- "$root"/var/lib/dpkg/*-old \
		"$root"/var/cache/debconf/*-old "$root/var/cache/ldconfig/aux-cache"
	find "$root/var/log" -type f -exec truncate -s 0 {} +
}

# The root disk: the cached base plus vme-agent, the shared init as /sbin/vme-init
# and the agent's systemd unit, made into ext4 from the tree (mkfs.ext4 -d, no loop
# mount). Cached by its inputs; sets DEBIAN_ROOTFS.
build_debian_rootfs() {
	local key
	ensure_pkgs e2fsprogs
	fetch_debian_base
	build_agent
	key=$({
		echo "recipe $RECIPE ${DEBIAN_BASE##*/}"
		sha256sum "$AGENT" "$IMAGES_DIR/init/init" "$IMAGES_DIR/debian/vme-agent.service" | cut -d' ' -f1
		mke2fs -V 2>&1 | sed -n 1p
		declare -f make_debian_rootfs
	} | sha256sum | cut -c1-16)
	DEBIAN_ROOTFS=$CACHE_DIR/debian/rootfs-$key.ext4
	[ -f "$DEBIAN_ROOTFS" ] && return 0
	with_lock debian-rootfs make_debian_rootfs "$DEBIAN_ROOTFS"
	# Each agent build makes a new entry; one is remade in seconds, so old ones go.
	find "$CACHE_DIR/debian" -maxdepth 1 -name 'rootfs-*.ext4' -mtime +7 -delete
}

make_debian_rootfs() {
	local out=$1 tree kib mib fake_time cleanup old
	[ -f "$out" ] && return 0
	# Under the lock any other tree is left from a build that was killed.
	for old in "$CACHE_DIR"/debian/tree.*; do
		remove_tree "$old"
	done
	tree=$(mktemp -d "$CACHE_DIR/debian/tree.XXXXXX")
	# On return, and on exit when a step dies.
	cleanup="remove_tree '$tree'; rm -f '$out.tmp' '$tree.debugfs' '$tree.debugfs.err'"
	# shellcheck disable=SC2064 # expand now: the traps must remove this very tree
	trap "$cleanup" EXIT
	# shellcheck disable=SC2064
	trap "$cleanup; trap - RETURN EXIT" RETURN
	# mkfs.ext4 -d gives the file system's root this directory's mode (mktemp's is 0700).
	chmod 0755 "$tree"
	cp -a "$DEBIAN_BASE/root/." "$tree/"
	install -m 0755 "$AGENT" "$tree/usr/sbin/vme-agent"
	install -m 0755 "$IMAGES_DIR/init/init" "$tree/usr/sbin/vme-init"
	install -m 0644 "$IMAGES_DIR/debian/vme-agent.service" "$tree/lib/systemd/system/vme-agent.service"
	# What "systemctl enable" does, without running systemctl in the tree.
	mkdir -p "$tree/etc/systemd/system/multi-user.target.wants"
	ln -s /lib/systemd/system/vme-agent.service "$tree/etc/systemd/system/multi-user.target.wants/"
	find "$tree" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
	# The content in 4 KiB blocks (counted, not asked of the host's file system, so
	# the size is the same everywhere), plus a quarter and 64 MiB: room to work in,
	# small to copy.
	kib=$(find "$tree" -printf '%y %s\n' |
		awk '$1 == "f" { k += int(($2 + 4095) / 4096) * 4 } $1 == "d" { k += 4 } END { print k }')
	mib=$(((kib * 5 / 4 / 1024) + 64))
	# mke2fs -d adds directory entries in sorted order; with a fixed UUID, hash seed
	# and clock the bytes are the same for the same tree. Its fake clock reads 0 as
	# unset. Inode tables are zeroed now, not by the guest kernel's lazy init at
	# first mount (slow on PVM hosts); on a file, zeroing leaves holes.
	rm -f "$out.tmp"
	fake_time=$((SOURCE_DATE_EPOCH > 0 ? SOURCE_DATE_EPOCH : 1))
	quiet env E2FSPROGS_FAKE_TIME=$fake_time \
		mkfs.ext4 -q -F -T default -b 4096 -L "$DEBIAN_HOSTNAME" -U "$DEBIAN_FS_UUID" \
		-E "hash_seed=$DEBIAN_FS_HASH_SEED,root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0" \
		-d "$tree" "$out.tmp" "${mib}M"
	# mke2fs -d copies each file's ctime, which is when the tree above was made (no
	# tool can set it), and atime, which its own reading may have moved on (relatime):
	# set both to the epoch, in place.
	used_inodes "$out.tmp" | awk -v t="@$SOURCE_DATE_EPOCH" \
		'{ print "set_inode_field <" $1 "> ctime " t; print "set_inode_field <" $1 "> atime " t }' \
		>"$tree.debugfs"
	E2FSPROGS_FAKE_TIME=$fake_time debugfs -w -f "$tree.debugfs" "$out.tmp" >/dev/null 2>"$tree.debugfs.err" || true
	rm -f "$tree.debugfs"
	if grep -v '^debugfs [0-9.]* (' "$tree.debugfs.err" >/dev/null; then
		cat "$tree.debugfs.err" >&2
		die "debugfs could not set the inode times of $out.tmp (see above)"
	fi
	rm -f "$tree.debugfs.err"
	quiet e2fsck -fn "$out.tmp"
	mv "$out.tmp" "$out"
}

# The inodes mke2fs -d filled: the root directory and every used inode from the
# first non-reserved one (11, lost+found) on, from the groups' free-inode lists.
used_inodes() {
	dumpe2fs "$1" 2>/dev/null | awk '
		/^Inodes per group:/ { ipg = $4 }
		/^Group [0-9]+:/ { g = $2; sub(":", "", g) }
		/^  Free inodes:/ {
			split("", free)
			n = split($0, f, /[ ,]+/)
			for (i = 4; i <= n; i++) {
				if (f[i] == "") continue
				if (split(f[i], r, "-") == 1) r[2] = r[1]
				for (j = r[1]; j <= r[2]; j++) free[j] = 1
			}
			for (j = g * ipg + 1; j <= (g + 1) * ipg; j++)
				if (!(j in free) && (j == 2 || j >= 11)) print j
		}'
}

# The root disk made afresh from the cached base into <out> (for verify-reproducible).
rootfs_debian() {
	build_debian_rootfs
	rm -f "$1"
	with_lock debian-rootfs make_debian_rootfs "$1"
}

image_debian() {
	local out=$OUT_DIR/debian
	build_debian_rootfs
	install_file "$DEBIAN_ROOTFS" "$out/rootfs.ext4"
	install_file "$DEBIAN_BASE/packages.txt" "$out/packages.txt"
}

# ------------------------------------------------------ checks

# Builds an image's initramfs twice from scratch and compares the bytes (the
# kernels come from the cache, keyed by their inputs).
verify_reproducible() {
	local image=$1 fn file=initramfs.cpio how a b
	# How to see the difference, with the two files for the two %s.
	how='diff <(cpio -itv <%s) <(cpio -itv <%s)'
	case "$image" in
	tiny | tiny-stock | tiny-riscv64) fn=initramfs_${image//-/_} ;;
	debian)
		fn=rootfs_debian file=rootfs.ext4
		how='diff <(dumpe2fs %s 2>&1) <(dumpe2fs %s 2>&1)'
		;;
	*) die "verify-reproducible: unknown image '$image' (tiny, tiny-stock, tiny-riscv64, debian)" ;;
	esac
	a=$(mktemp /tmp/vme-repro-a.XXXXXX)
	b=$(mktemp /tmp/vme-repro-b.XXXXXX)
	"$fn" "$a"
	sleep 1 # a build that leaked the wall clock into the archive differs now
	"$fn" "$b"
	if ! cmp -s "$a" "$b"; then
		# shellcheck disable=SC2059 # the format is ours
		die "$image: two builds of $file differ ($a, $b); compare with: $(printf "$how" "$a" "$b")"
	fi
	if [ -f "$OUT_DIR/$image/$file" ] && ! cmp -s "$a" "$OUT_DIR/$image/$file"; then
		die "$image: $OUT_DIR/$image/$file differs from a fresh build (rebuild with images/build.sh $image)"
	fi
	rm -f "$a" "$b"
}

# Boots an image under QEMU with software emulation (TCG; no KVM needed) and
# checks the /init contract: the ready marker, vme.run with quoting, nproc, the
# virtio drivers, a virtio disk, the exit status, and a clean power-off. The
# x86 images are booted twice: bzImage and the ELF vmlinux (PVH entry).
boot_test() {
	local image=$1 dir=$OUT_DIR/$1 kernels=() machine qemu_bin blk k
	case "$image" in
	tiny-riscv64)
		ensure_backports
		ensure_pkgs -t bookworm-backports qemu-system-misc opensbi
		ensure_pkgs bc
		qemu_bin=(qemu-system-riscv64 -M virt -bios default)
		blk=virtio-blk-device
		kernels=(Image)
		;;
	tiny | tiny-stock | debian)
		ensure_backports
		ensure_pkgs -t bookworm-backports qemu-system-x86
		ensure_pkgs bc
		# q35, not microvm: under TCG on a busy host the kernel's quick TSC
		# calibration against the PIT fails now and then, and microvm has no
		# HPET or PM timer to fall back on, so boot stalls (seen with both
		# kernels). Under KVM the TSC frequency comes from kvmclock instead.
		machine=${VME_QEMU_MACHINE:-q35} blk=virtio-blk-pci kernels=(bzImage vmlinux)
		[ "$image" = tiny-stock ] && kernels=(vmlinuz vmlinux)
		[ "$machine" = microvm ] && blk=virtio-blk-device
		qemu_bin=(qemu-system-x86_64 -M "$machine" -accel tcg -cpu max -nic none)
		;;
	*) die "boot-test: unknown image '$image' (tiny, tiny-stock, tiny-riscv64, debian)" ;;
	esac
	if [ "$image" = debian ]; then
		boot_test_debian "${qemu_bin[@]}" -device "$blk,drive=vd0"
		return
	fi
	[ -f "$dir/initramfs.cpio" ] || die "$dir/initramfs.cpio is missing: run images/build.sh $image first"
	for k in "${kernels[@]}"; do
		boot_qemu "$image/$k" "${qemu_bin[@]}" -kernel "$dir/$k" -initrd "$dir/initramfs.cpio" \
			-drive "if=none,id=vd0,format=raw,file=$(boot_disk)" -device "$blk,drive=vd0"
	done
}

# The Debian root disk with the tiny kernels (no initramfs), on a scratch copy:
# the /init contract from the disk, then the file system as the guest left it
# (power-off without unmounting: e2fsck replays the journal, then finds no error).
# boot_test_debian <qemu command...>
boot_test_debian() {
	local disk k status
	[ -f "$OUT_DIR/debian/rootfs.ext4" ] || die "$OUT_DIR/debian/rootfs.ext4 is missing: run images/build.sh debian first"
	[ -f "$OUT_DIR/tiny/vmlinux" ] || die "$OUT_DIR/tiny/vmlinux is missing: run images/build.sh tiny first (the Debian disk boots its kernel)"
	disk=$(mktemp /tmp/vme-boot-debian.XXXXXX.ext4)
	for k in bzImage vmlinux; do
		cp --sparse=always "$OUT_DIR/debian/rootfs.ext4" "$disk"
		BOOT_APPEND='root=/dev/vda rw init=/sbin/vme-init' boot_qemu "debian/$k" "$@" \
			-kernel "$OUT_DIR/tiny/$k" -drive "if=none,id=vd0,format=raw,file=$disk"
		status=0
		e2fsck -fp "$disk" >/dev/null 2>&1 || status=$?
		# 1: the journal was replayed (or something fixed); anything more is damage.
		[ "$status" -le 1 ] || die "debian/$k: e2fsck finds errors on the disk after the boot (status $status): $disk"
		e2fsck -fn "$disk" >/dev/null 2>&1 || die "debian/$k: the disk is not clean after e2fsck's repair: $disk"
	done
	rm -f "$disk"
}

# A small blank disk for the virtio-blk check.
boot_disk() {
	local disk=/tmp/vme-boot-test-disk.img
	[ -f "$disk" ] || truncate -s 1M "$disk"
	echo "$disk"
}

# boot_qemu <label> <qemu command...>: runs it with our command line (and
# $BOOT_APPEND before vme.run), checks the log.
boot_qemu() {
	local label=$1 log started elapsed want smp=2
	shift
	# Runs in the guest; the kernel command line cannot nest double quotes.
	# shellcheck disable=SC2016 # expanded by the guest's shell, not here
	local run='echo vme-nproc=$(nproc); echo vme-drivers: $(ls /sys/bus/virtio/drivers); echo vme-disk: $(ls /dev/vda); exit 3'
	log=$(mktemp /tmp/vme-boot.XXXXXX.log)
	started=$(date +%s.%N)
	if ! timeout "${VME_BOOT_TIMEOUT:-600}" "$@" -smp "$smp" -m 256M -nographic -no-reboot \
		-append "console=ttyS0 quiet ${BOOT_APPEND:+$BOOT_APPEND }vme.run=\"$run\"" </dev/null >"$log" 2>&1; then
		cat "$log" >&2
		die "$label: QEMU failed or did not power off within ${VME_BOOT_TIMEOUT:-600}s (log: $log)"
	fi
	elapsed=$(echo "$(date +%s.%N) - $started" | bc)
	for want in 'VME-GUEST-READY uptime=' "vme-nproc=$smp" 'vme-disk: /dev/vda' 'VME-RUN-EXIT status=3' \
		virtio_blk virtio_net virtio_rng virtio_balloon vmw_vsock_virtio_transport; do
		grep -qF "$want" "$log" || {
			cat "$log" >&2
			die "$label: boot log lacks '$want' (log: $log)"
		}
	done
	echo "$label: ok, $(grep -o 'VME-GUEST-READY uptime=[0-9.]*' "$log"), QEMU wall time ${elapsed%???????}s"
	rm -f "$log"
}

usage() {
	sed -n '2,12s/^# \{0,1\}//p' "$0"
	exit 2
}

main() {
	[ $# -ge 1 ] || usage
	case "$1" in
	tiny) image_tiny ;;
	tiny-stock) image_tiny_stock ;;
	tiny-riscv64) image_tiny_riscv64 ;;
	debian) image_debian ;;
	all)
		image_tiny_riscv64
		image_tiny
		image_tiny_stock
		image_debian
		;;
	kernel-config)
		[ $# -eq 2 ] || usage
		kernel_config "$2"
		;;
	verify-reproducible)
		[ $# -eq 2 ] || usage
		verify_reproducible "$2"
		;;
	boot-test)
		[ $# -eq 2 ] || usage
		boot_test "$2"
		;;
	-h | --help | help) usage ;;
	*) die "unknown image or command '$1' (try: tiny, tiny-stock, tiny-riscv64, debian, all, verify-reproducible <image>, boot-test <image>)" ;;
	esac
}

main "$@"
