//! The x86_64 monitor on real KVM with a guest of our own (`guests/x86-probe.S`): exits,
//! power-off, resets, triple faults, unclaimed accesses, pause/resume and the control socket,
//! each in seconds. Linux guests (minutes on PVM hosts) are in `x86_linux.rs`.

mod common;

use common::{Vm, ctl, kvm_available, run_to_end, temp_dir, x86_probe};
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn args<'a>(probe: &'a str, command: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--kernel", probe, "--memory", "64M", "--cmdline", command];
    v.extend_from_slice(extra);
    v
}

#[test]
fn guest_endings_map_to_exit_statuses() {
    if !kvm_available() {
        return;
    }
    let p = x86_probe().to_str().unwrap();
    for (cmd, marker, code) in [
        ("p", "PROBE-POWEROFF", 0),
        ("r", "PROBE-RESET", 0),
        ("x", "PROBE-RESET", 0),
        ("t", "PROBE-TRIPLE", 2),
    ] {
        let mut vm = Vm::start(&args(p, cmd, &[]));
        vm.wait_for(marker, T);
        let status = vm.wait_exit(T);
        let stderr = vm.stderr.lock().unwrap().clone();
        assert_eq!(status.code(), Some(code), "command {cmd}: {stderr}");
        if code == 2 {
            // One line names the vCPU, the RIP and the reason.
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "exactly one line on stderr: {stderr}");
            let line = lines[0];
            assert!(line.starts_with("vme-vmm: VM crashed:"), "{line}");
            assert!(
                line.contains("vCPU 0") && line.contains("RIP 0x") && line.contains("triple fault"),
                "{line}"
            );
        } else {
            assert!(!stderr.contains("crashed"), "{stderr}");
        }
    }
}

#[test]
fn reboot_can_restart_the_vm() {
    if !kvm_available() {
        return;
    }
    let p = x86_probe().to_str().unwrap();
    // Strict filters: the main thread rebuilds the machine under its own filter (KVM setup
    // ioctls, the vCPU threads it starts then carry its filter too).
    let strict = [
        "--on-reboot",
        "restart",
        common::STRICT[0],
        common::STRICT[1],
    ];
    let mut vm = Vm::start(&args(p, "r", &strict));
    // The same guest boots again after each reset.
    for _ in 0..3 {
        vm.wait_for("PROBE-RESET", T);
    }
    vm.assert_no_seccomp_violation();
    assert!(vm.try_exit().is_none(), "{}", vm.stderr.lock().unwrap());
    drop(vm);
}

#[test]
fn unclaimed_ports_and_mmio_read_all_ones() {
    if !kvm_available() {
        return;
    }
    let p = x86_probe().to_str().unwrap();
    let mut vm = Vm::start(&args(p, "u", &[]));
    let line = vm.wait_for("PROBE-UNCLAIMED", T);
    assert_eq!(line.trim(), "PROBE-UNCLAIMED port=ffffffff mmio=ffffffff");
    assert_eq!(vm.wait_exit(T).code(), Some(0));
}

/// A disk given with `--disk` is PCI device 1 (virtio-blk, 1af4:1042) and the default rng
/// device 2 (1af4:1044), behind the host bridge at device 0; BAR 0 is 32 KiB. The probe
/// reads them through the type-1 ports and through ECAM.
#[test]
fn a_disk_is_a_virtio_pci_block_device_at_device_1() {
    if !kvm_available() {
        return;
    }
    let dir = temp_dir("x86virtio");
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let p = x86_probe().to_str().unwrap();
    let disk = format!("path={}", disk.display());
    let mut vm = Vm::start(&args(p, "v", &["--disk", &disk]));
    let line = vm.wait_for("PROBE-PCI", T);
    assert_eq!(
        line.trim(),
        "PROBE-PCI host=0d578086 dev1=10421af4 dev2=10441af4 bar0=ffff8000 ecam=10421af4"
    );
    assert_eq!(vm.wait_exit(T).code(), Some(0));
}

fn ticks(vm: &Vm) -> Vec<u32> {
    vm.console_text()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("tick ")
                .and_then(|h| u32::from_str_radix(h.trim(), 16).ok())
        })
        .collect()
}

#[test]
fn pause_stops_vcpus_and_their_cpu_use_resume_continues_and_sigterm_stops() {
    if !kvm_available() {
        return;
    }
    let p = x86_probe().to_str().unwrap();
    let dir = temp_dir("x86pause");
    let sock = dir.join("ctl.sock");
    let sock = sock.to_str().unwrap();
    // Strict filters: pausing kicks the vCPUs (which finish their exit with KVM_RUN), the
    // power button raises its interrupt line from the control thread.
    let extra = [
        "--vcpus",
        "2",
        "--control-socket",
        sock,
        common::STRICT[0],
        common::STRICT[1],
    ];
    let mut vm = Vm::start(&args(p, "c", &extra));
    vm.wait_for("tick 00000002", T);

    assert!(ctl(Path::new(sock), "pause").contains(r#""state":"paused""#));
    std::thread::sleep(Duration::from_millis(200));
    let before_ticks = ticks(&vm);
    let cpu = vm.cpu_time();
    std::thread::sleep(Duration::from_secs(3));
    let used = vm.cpu_time() - cpu;
    assert_eq!(ticks(&vm), before_ticks, "a paused guest printed");
    assert!(
        used < Duration::from_millis(100),
        "paused monitor used {used:?} of CPU in 3 s"
    );

    let status = ctl(Path::new(sock), "status");
    assert!(
        status.contains(r#""state":"paused""#) && status.contains(r#""vcpus":2"#),
        "{status}"
    );
    assert!(ctl(Path::new(sock), "resume").contains(r#""state":"running""#));
    let last = *before_ticks.last().unwrap();
    vm.wait_for(&format!("tick {:08x}", last + 2), T);
    // The count goes on from where it stopped: nothing skipped, nothing repeated.
    let all = ticks(&vm);
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");

    // The power button needs a guest that listens (ACPI): this one does not, so the VM runs on.
    let pressed = ctl(Path::new(sock), "shutdown");
    assert!(pressed.contains(r#""ok":true"#), "{pressed}");
    vm.wait_for(&format!("tick {:08x}", last + 3), T);
    let status = ctl(Path::new(sock), "status");
    assert!(status.contains(r#""exits":"#), "{status}");

    // SIGTERM ends the VM in order, like `stop`.
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    assert_eq!(vm.wait_exit(T).code(), Some(0));
    vm.assert_no_seccomp_violation();
    assert!(!std::path::Path::new(sock).exists());
}

#[test]
fn two_vms_at_once_and_a_socket_in_use() {
    if !kvm_available() {
        return;
    }
    let p = x86_probe().to_str().unwrap();
    let dir = temp_dir("x86two");
    let sock = dir.join("a.sock");
    let sock = sock.to_str().unwrap();
    let mut a = Vm::start(&args(p, "c", &["--control-socket", sock]));
    let mut b = Vm::start(&["--kernel", p, "--memory", "96M", "--cmdline", "c"]);
    a.wait_for("tick 00000001", T);
    b.wait_for("tick 00000001", T);
    let (status, stderr) = run_to_end(&args(p, "c", &["--control-socket", sock]));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another running VM"), "{stderr}");
    let s = ctl(Path::new(sock), "status");
    assert!(s.contains(r#""memory_bytes":67108864"#), "{s}");
    assert!(ctl(Path::new(sock), "stop").contains("stopping"));
    assert_eq!(a.wait_exit(T).code(), Some(0));
    // B is unaffected by A's end.
    let n = ticks(&b).len();
    b.wait_for(&format!("tick {:08x}", n + 1), T);
}
