//! Linux guests on the x86_64 machine: our minimal kernel (bzImage and PVH) and Debian's stock
//! cloud kernel, through the real binary, asserting on what the guest reports.
//!
//! On PVM hosts (no VMX; see shared/PVM.md) a Linux boot takes many minutes, so these run only
//! with `VME_SLOW_TESTS=1` and say so otherwise; on VT-x/AMD-V hosts they take seconds. The
//! monitor's own behaviour on KVM is covered quickly by `x86_probe.rs` on every host.

mod common;

use common::{Vm, image, kvm_available};
use std::time::Duration;

/// Generous for PVM hosts.
const BOOT: Duration = Duration::from_secs(40 * 60);

fn slow_tests_enabled(what: &str) -> bool {
    if std::env::var("VME_SLOW_TESTS").as_deref() == Ok("1") {
        return kvm_available();
    }
    eprintln!(
        "NOTE: not booting {what}: x86 Linux boots take many minutes on PVM hosts; set VME_SLOW_TESTS=1 to run it"
    );
    false
}

fn host_unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Boots `kernel` with the tiny initramfs and checks what the guest reports.
fn boot_and_check(image_name: &str, kernel: &str, initrd: &str, vcpus: u32, memory_mib: u64) {
    let k = image(image_name, kernel);
    let i = image(image_name, initrd);
    let cmdline = "console=ttyS0 quiet panic=-1 \
        vme.run=\"echo NPROC=$(nproc); grep MemTotal /proc/meminfo; echo DATE=$(date +%s)\"";
    let (vcpus_s, memory) = (vcpus.to_string(), format!("{memory_mib}M"));
    let mut vm = Vm::start(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        i.to_str().unwrap(),
        "--vcpus",
        &vcpus_s,
        "--memory",
        &memory,
        "--cmdline",
        cmdline,
    ]);
    vm.wait_for("VME-GUEST-READY", BOOT);
    assert_eq!(vm.wait_for("NPROC=", BOOT).trim(), format!("NPROC={vcpus}"));
    let total: u64 = vm
        .wait_for("MemTotal:", BOOT)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    let want = memory_mib * 1024;
    assert!(
        total * 10 >= want * 9 && total <= want,
        "MemTotal {total} KiB vs {want} KiB"
    );
    let date: u64 = vm.wait_for("DATE=", BOOT).trim()[5..].parse().unwrap();
    assert!(
        date.abs_diff(host_unix_time()) < 120,
        "guest date {date} is not the host's"
    );
    vm.wait_for("VME-RUN-EXIT status=0", BOOT);
    assert_eq!(
        vm.wait_exit(BOOT).code(),
        Some(0),
        "{}",
        vm.stderr.lock().unwrap()
    );
}

#[test]
fn minimal_kernel_via_pvh_two_vcpus() {
    if slow_tests_enabled("the minimal kernel (PVH)") {
        boot_and_check("tiny", "vmlinux", "initramfs.cpio", 2, 256);
    }
}

#[test]
fn minimal_kernel_via_bzimage() {
    if slow_tests_enabled("the minimal kernel (bzImage)") {
        boot_and_check("tiny", "bzImage", "initramfs.cpio", 1, 128);
    }
}

#[test]
fn debian_stock_kernel_via_bzimage_and_pvh() {
    if slow_tests_enabled("Debian's stock cloud kernel") {
        boot_and_check("tiny-stock", "vmlinuz", "initramfs.cpio", 1, 256);
        boot_and_check("tiny-stock", "vmlinux", "initramfs.cpio", 1, 256);
    }
}
