//! The riscv64 software machine end to end: real Linux, real busybox, through `vme-vmm`.
//! These run on every host (no KVM needed), so they carry the monitor's end-to-end checks
//! on hosts whose KVM cannot run Linux user space (see shared/PVM.md).

mod common;

use common::{Vm, kvm_available, riscv_tiny_args, temp_dir, x86_probe};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(120);

fn start(args: &[String]) -> Vm {
    Vm::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Value of `MemTotal` in the guest's /proc/meminfo, in KiB.
fn mem_total_kib(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemTotal line")
}

#[test]
fn boots_with_one_and_two_harts_and_runs_user_programs() {
    for (harts, memory, mib) in [("1", "128M", 128u64), ("2", "256M", 256)] {
        let mut vm = start(&riscv_tiny_args(
            harts,
            memory,
            r#"vme.run="echo NPROC=$(nproc); grep MemTotal /proc/meminfo; ls /proc | grep -c . ; cat /proc/cpuinfo""#,
        ));
        let ready = vm.wait_for("VME-GUEST-READY uptime=", BOOT);
        let uptime: f64 = ready.rsplit('=').next().unwrap().trim().parse().unwrap();
        assert!(uptime > 0.0, "{ready}");
        assert_eq!(vm.wait_for("NPROC=", BOOT).trim(), format!("NPROC={harts}"));
        let total = mem_total_kib(&vm.wait_for("MemTotal:", BOOT));
        let want = mib * 1024;
        assert!(
            total * 10 >= want * 9 && total <= want,
            "MemTotal {total} KiB is not within 10% of {want} KiB"
        );
        vm.wait_for("isa", BOOT);
        vm.wait_for("VME-RUN-EXIT status=0", BOOT);
        let status = vm.wait_exit(BOOT);
        assert_eq!(status.code(), Some(0), "{}", vm.stderr.lock().unwrap());
        let console = vm.console_text();
        assert!(
            console.contains("rv64imafdc"),
            "cpuinfo names the ISA:\n{console}"
        );
        assert_eq!(
            console.matches("processor").count(),
            harts.parse::<usize>().unwrap()
        );
    }
}

#[test]
fn panic_reboot_and_exit_statuses() {
    let mut vm = start(&riscv_tiny_args(
        "1",
        "128M",
        "vme.init_exit=1 vme.run=true",
    ));
    let status = vm.wait_exit(BOOT);
    let stderr = vm.stderr.lock().unwrap().clone();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("guest kernel panicked: Kernel panic - not syncing"),
        "{stderr}"
    );

    let mut vm = start(&riscv_tiny_args("1", "128M", r#"vme.run="reboot -f""#));
    assert_eq!(vm.wait_exit(BOOT).code(), Some(0));

    let mut vm = start(&riscv_tiny_args("1", "128M", r#"vme.run="poweroff -f""#));
    assert_eq!(vm.wait_exit(BOOT).code(), Some(0));
    assert!(
        !vm.console_text().contains("VME-RUN-EXIT"),
        "poweroff -f never returns"
    );
}

#[test]
fn pause_stops_the_guest_and_its_cpu_use_and_resume_continues() {
    let dir = temp_dir("rvpause");
    let sock = dir.join("ctl.sock");
    let mut args = riscv_tiny_args(
        "2",
        "128M",
        r#"vme.run="i=0; while true; do echo tick $i; i=$((i+1)); usleep 100000; done""#,
    );
    args.extend(["--control-socket".into(), sock.to_str().unwrap().into()]);
    let mut vm = start(&args);
    vm.wait_for("tick 5", BOOT);

    // A second VM may not take over a live control socket.
    let (status, stderr) = common::run_to_end(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another running VM"), "{stderr}");

    let ctl = |cmd: &str| common::ctl(&sock, cmd);
    assert!(ctl("pause").contains(r#""state":"paused""#));
    // Output already in flight drains; after that, nothing.
    std::thread::sleep(Duration::from_millis(300));
    vm.take_lines();
    let cpu_before = vm.cpu_time();
    std::thread::sleep(Duration::from_secs(2));
    let during = vm.take_lines();
    let cpu_used = vm.cpu_time() - cpu_before;
    assert!(during.is_empty(), "a paused guest printed {during:?}");
    assert!(
        cpu_used < Duration::from_millis(100),
        "paused monitor used {cpu_used:?} of CPU in 2 s"
    );
    let status = ctl("status");
    assert!(status.contains(r#""state":"paused""#) && status.contains("instructions_retired"));

    let last: u64 = vm
        .console_text()
        .lines()
        .filter_map(|l| l.strip_prefix("tick ").and_then(|n| n.trim().parse().ok()))
        .max()
        .unwrap();
    assert!(ctl("resume").contains(r#""state":"running""#));
    let next = vm.wait_for(&format!("tick {}", last + 3), Duration::from_secs(30));
    assert!(next.starts_with("tick"));
    assert!(ctl("stop").contains("stopping"));
    assert_eq!(vm.wait_exit(BOOT).code(), Some(0));
    assert!(!sock.exists(), "the monitor removes its control socket");
}

/// Two riscv64 machines and, where KVM is available, one x86_64 machine run side by side;
/// each finds exactly the memory it was given and prints only its own command's output.
#[test]
fn two_machines_at_once_each_see_only_their_own() {
    let probe = kvm_available().then(|| x86_probe().to_str().unwrap().to_string());
    let mut x86 = probe
        .as_deref()
        .map(|p| Vm::start(&["--kernel", p, "--memory", "80M", "--cmdline", "m"]));
    let mut a = start(&riscv_tiny_args(
        "1",
        "96M",
        r#"vme.run="echo A-SAYS; grep MemTotal /proc/meminfo""#,
    ));
    let mut b = start(&riscv_tiny_args(
        "2",
        "192M",
        r#"vme.run="echo B-SAYS; grep MemTotal /proc/meminfo""#,
    ));
    let a_total = mem_total_kib(&a.wait_for("MemTotal:", BOOT));
    let b_total = mem_total_kib(&b.wait_for("MemTotal:", BOOT));
    assert!(a_total <= 96 * 1024 && a_total > 80 * 1024, "{a_total}");
    assert!(b_total <= 192 * 1024 && b_total > 170 * 1024, "{b_total}");
    assert_eq!(a.wait_exit(BOOT).code(), Some(0));
    assert_eq!(b.wait_exit(BOOT).code(), Some(0));
    assert!(a.console_text().contains("A-SAYS") && !a.console_text().contains("B-SAYS"));
    assert!(b.console_text().contains("B-SAYS") && !b.console_text().contains("A-SAYS"));
    if let Some(x86) = x86.as_mut() {
        // 80 MiB = 0x50: the first MiB past its RAM reads back nothing it wrote.
        x86.wait_for("PROBE-RAM-MIB 00000050", BOOT);
        assert_eq!(x86.wait_exit(BOOT).code(), Some(0));
    }
}
