#!/usr/bin/env bash
# Builds vme's guest images from Debian packages. See images/README.md.
#
#   images/build.sh tiny | tiny-stock | tiny-riscv64 | all
#   images/build.sh verify-reproducible <image>   build the initramfs twice, compare
#   images/build.sh boot-test <image>              boot it under QEMU (TCG), check /init
#   images/build.sh kernel-config <image>          only generate + verify the kernel .config
#
# Outputs land in target/images/<image>/. Kernels and the cross-built busybox are
# cached in ${VME_CACHE_DIR:-/var/cache/vme}, keyed by a hash of their inputs, so
# each is built once per machine. Quiet on success; on failure says what broke.
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

# ------------------------------------------------------ checks

# Builds an image's initramfs twice from scratch and compares the bytes (the
# kernels come from the cache, keyed by their inputs).
verify_reproducible() {
	local image=$1 fn a b
	case "$image" in
	tiny | tiny-stock | tiny-riscv64) fn=initramfs_${image//-/_} ;;
	*) die "verify-reproducible: unknown image '$image' (tiny, tiny-stock, tiny-riscv64)" ;;
	esac
	a=$(mktemp /tmp/vme-repro-a.XXXXXX)
	b=$(mktemp /tmp/vme-repro-b.XXXXXX)
	"$fn" "$a"
	sleep 1 # a build that leaked the wall clock into the archive differs now
	"$fn" "$b"
	if ! cmp -s "$a" "$b"; then
		die "$image: two initramfs builds differ ($a, $b); compare with: diff <(cpio -itv <$a) <(cpio -itv <$b)"
	fi
	if [ -f "$OUT_DIR/$image/initramfs.cpio" ] && ! cmp -s "$a" "$OUT_DIR/$image/initramfs.cpio"; then
		die "$image: $OUT_DIR/$image/initramfs.cpio differs from a fresh build (rebuild with images/build.sh $image)"
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
	tiny | tiny-stock)
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
	*) die "boot-test: unknown image '$image' (tiny, tiny-stock, tiny-riscv64)" ;;
	esac
	[ -f "$dir/initramfs.cpio" ] || die "$dir/initramfs.cpio is missing: run images/build.sh $image first"
	for k in "${kernels[@]}"; do
		boot_qemu "$image/$k" "${qemu_bin[@]}" -kernel "$dir/$k" -initrd "$dir/initramfs.cpio" \
			-drive "if=none,id=vd0,format=raw,file=$(boot_disk)" -device "$blk,drive=vd0"
	done
}

# A small blank disk for the virtio-blk check.
boot_disk() {
	local disk=/tmp/vme-boot-test-disk.img
	[ -f "$disk" ] || truncate -s 1M "$disk"
	echo "$disk"
}

# boot_qemu <label> <qemu command...>: runs it with our command line, checks the log.
boot_qemu() {
	local label=$1 log started elapsed want smp=2
	shift
	# Runs in the guest; the kernel command line cannot nest double quotes.
	# shellcheck disable=SC2016 # expanded by the guest's shell, not here
	local run='echo vme-nproc=$(nproc); echo vme-drivers: $(ls /sys/bus/virtio/drivers); echo vme-disk: $(ls /dev/vda); exit 3'
	log=$(mktemp /tmp/vme-boot.XXXXXX.log)
	started=$(date +%s.%N)
	if ! timeout "${VME_BOOT_TIMEOUT:-600}" "$@" -smp "$smp" -m 256M -nographic -no-reboot \
		-append "console=ttyS0 quiet vme.run=\"$run\"" </dev/null >"$log" 2>&1; then
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
	sed -n '2,10s/^# \{0,1\}//p' "$0"
	exit 2
}

main() {
	[ $# -ge 1 ] || usage
	case "$1" in
	tiny) image_tiny ;;
	tiny-stock) image_tiny_stock ;;
	tiny-riscv64) image_tiny_riscv64 ;;
	all)
		image_tiny_riscv64
		image_tiny
		image_tiny_stock
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
	*) die "unknown image or command '$1' (try: tiny, tiny-stock, tiny-riscv64, all, verify-reproducible <image>, boot-test <image>)" ;;
	esac
}

main "$@"
