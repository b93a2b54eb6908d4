//! Linux guests on the x86_64 machine: our minimal kernel (bzImage and PVH) and Debian's stock
//! cloud kernel, through the real binary, asserting on what the guest reports.
//!
//! On PVM hosts (no VMX; see shared/PVM.md) our minimal kernel's PVH boot takes about two
//! minutes and runs in every `make test`; the other boots (bzImage, Debian's stock kernel,
//! 4 GiB, other endings) take longer and run only with `VME_SLOW_TESTS=1`, saying so otherwise.
//! On VT-x/AMD-V hosts they all take seconds. The monitor's own behaviour on KVM is covered
//! quickly by `x86_probe.rs`.

mod common;

use common::{Vm, image, kvm_available, temp_dir};
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

struct Boot<'a> {
    image: &'a str,
    kernel: &'a str,
    vcpus: u32,
    memory_mib: u64,
}

impl Boot<'_> {
    fn start(&self, run: &str, extra: &[&str]) -> Vm {
        let k = image(self.image, self.kernel);
        let i = image(self.image, "initramfs.cpio");
        let cmdline = format!("console=ttyS0 quiet panic=-1 {run}");
        let (vcpus, memory) = (self.vcpus.to_string(), format!("{}M", self.memory_mib));
        let mut args = vec![
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--vcpus",
            &vcpus,
            "--memory",
            &memory,
            "--cmdline",
            &cmdline,
        ];
        args.extend_from_slice(extra);
        Vm::start(&args)
    }

    /// Boots, checks what the guest reports of its CPUs, memory and clock, and that
    /// `poweroff` ends the monitor with status 0.
    fn check(&self) {
        let dir = temp_dir("x86linux");
        let sock = dir.join("ctl.sock");
        let sock = sock.to_str().unwrap();
        let run =
            r#"vme.run="echo NPROC=$(nproc); grep MemTotal /proc/meminfo; echo DATE=$(date +%s)""#;
        let mut vm = self.start(run, &["--control-socket", sock]);
        vm.wait_for("VME-GUEST-READY", BOOT);
        assert_eq!(
            vm.wait_for("NPROC=", BOOT).trim(),
            format!("NPROC={}", self.vcpus)
        );
        let total: u64 = vm
            .wait_for("MemTotal:", BOOT)
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap();
        let want = self.memory_mib * 1024;
        assert!(
            total * 10 >= want * 9 && total <= want,
            "MemTotal {total} KiB vs {want} KiB"
        );
        let date: u64 = vm.wait_for("DATE=", BOOT).trim()[5..].parse().unwrap();
        assert!(
            date.abs_diff(host_unix_time()) < 120,
            "guest date {date} is not the host's"
        );
        // The guest is still up (it powers off after the command): ask the monitor what it
        // did. On PVM hosts the kernel's int3 self-test needs the monitor's emulator.
        let reply = std::process::Command::new(common::VMM)
            .args(["ctl", "--control-socket", sock, "status"])
            .output()
            .expect("run vme-vmm ctl");
        let text = String::from_utf8_lossy(&reply.stdout);
        eprintln!("status near the end of the boot: {text}");
        assert!(
            text.contains(&format!(r#""vcpus":{},"#, self.vcpus))
                && text.contains("emulated_instructions"),
            "{text}"
        );
        vm.wait_for("VME-RUN-EXIT status=0", BOOT);
        assert_eq!(
            vm.wait_exit(BOOT).code(),
            Some(0),
            "{}",
            vm.stderr.lock().unwrap()
        );
    }
}

const MINIMAL_PVH: Boot = Boot {
    image: "tiny",
    kernel: "vmlinux",
    vcpus: 2,
    memory_mib: 256,
};

/// Runs on every host: guest user space on KVM, through our minimal kernel's PVH entry.
#[test]
fn minimal_kernel_via_pvh_two_vcpus() {
    if kvm_available() {
        MINIMAL_PVH.check();
    }
}

#[test]
fn minimal_kernel_via_bzimage() {
    if slow_tests_enabled("the minimal kernel (bzImage)") {
        Boot {
            image: "tiny",
            kernel: "bzImage",
            vcpus: 1,
            memory_mib: 128,
        }
        .check();
    }
}

#[test]
fn minimal_kernel_with_four_vcpus_and_4g_across_the_pci_hole() {
    if slow_tests_enabled("the minimal kernel with 4 vCPUs and 4G") {
        Boot {
            vcpus: 4,
            memory_mib: 4096,
            ..MINIMAL_PVH
        }
        .check();
    }
}

#[test]
fn reboot_exits_zero_and_an_exiting_init_is_a_named_panic() {
    if !slow_tests_enabled("the reboot and init-exit endings") {
        return;
    }
    let one = Boot {
        vcpus: 1,
        memory_mib: 128,
        ..MINIMAL_PVH
    };
    let mut vm = one.start(r#"vme.run="reboot -f""#, &[]);
    assert_eq!(vm.wait_exit(BOOT).code(), Some(0));
    let mut vm = one.start("vme.init_exit=1", &[]);
    assert_eq!(vm.wait_exit(BOOT).code(), Some(3));
    let stderr = vm.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains("Attempted to kill init"),
        "the panic is named: {stderr}"
    );
}

#[test]
fn debian_stock_kernel_via_bzimage_and_pvh() {
    if slow_tests_enabled("Debian's stock cloud kernel") {
        for kernel in ["vmlinuz", "vmlinux"] {
            Boot {
                image: "tiny-stock",
                kernel,
                vcpus: 1,
                memory_mib: 256,
            }
            .check();
        }
    }
}
