//! `--seccomp`: a riscv64 VM does everything a monitor is asked to do (disk, vsock agent with
//! a guest-initiated connection, console socket, pause/snapshot/resume, restore) under the
//! strict filters without a violation; and a monitor that makes a forbidden syscall after
//! its filters are in dies with status 159 and a line naming the thread kind and syscall.
//! Runs on every host (the riscv64 machine is software).

mod common;

use common::{VMM, Vm, ctl, ctl_args, random_bytes, riscv_tiny_args, sha256_hex, temp_dir};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Generous for an interpreted guest on a loaded 2-core host.
const TIMEOUT: Duration = Duration::from_secs(600);
const SECCOMP_EXIT: i32 = 159;

/// The console log at `path` with its rotated older half (`path.1`) before it.
fn console_log(path: &Path) -> String {
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    std::fs::read_to_string(old).unwrap_or_default()
        + &std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until the console log at `path` contains `needle`.
fn wait_in_file(path: &Path, needle: &str, vm: &mut Vm) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = console_log(path);
        if text.contains(needle) {
            return;
        }
        if Instant::now() > deadline || vm.try_exit().is_some() {
            vm.fail(&format!("no {needle:?} in {}:\n{text}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Types `line` on the console socket and reads until `needle` comes back.
fn console_round_trip(sock: &Path, line: &str, needle: &str) {
    let mut s = UnixStream::connect(sock).expect("connect to the console socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains(needle) {
                return;
            }
        }
    }
    panic!(
        "no {needle:?} on the console socket; got {:?}",
        String::from_utf8_lossy(&seen)
    );
}

#[test]
fn a_riscv_vm_with_disk_vsock_console_and_snapshots_runs_under_strict_filters() {
    let dir = temp_dir("seccomp-strict");
    let (uds, ctl_sock) = (dir.join("v.sock"), dir.join("ctl.sock"));
    let (con, log, disk) = (dir.join("con.sock"), dir.join("con.log"), dir.join("d.img"));
    let data = random_bytes(64 << 10);
    std::fs::write(&disk, &data).unwrap();
    let run = r#"vme.run="echo DISK=$(head -c 65536 /dev/vda | sha256sum); printf VME-SECCOMP-WROTE > /dev/vda; sync; while [ ! -e /tmp/vme-done ]; do sleep 1; done""#;
    let mut args = riscv_tiny_args("2", "256M", run);
    args.extend([
        "--seccomp".into(),
        "strict".into(),
        "--disk".into(),
        format!("path={}", disk.display()),
        "--vsock".into(),
        format!("cid=3,uds={}", uds.display()),
        "--control-socket".into(),
        ctl_sock.display().to_string(),
        "--serial".into(),
        // A small log, so it is rotated while the guest runs.
        format!(
            "socket:{},log={},log_size=4096",
            con.display(),
            log.display()
        ),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::start(&args);
    // The guest reports the hash of what it read from its disk.
    let want = format!("DISK={}", sha256_hex(&data));
    wait_in_file(&log, &want, &mut vm);

    // The guest's shell is busy with vme.run; its tty echoing the typed line back proves
    // the round trip (socket, console thread, serial, guest, hart, socket).
    console_round_trip(&con, "echo C$((40+2))", "echo C$((40+2))");

    let ctl_path = ctl_sock.to_str().unwrap();
    assert!(ctl(&ctl_sock, "pause").contains(r#""state":"paused""#));
    assert!(ctl(&ctl_sock, "status").contains(r#""state":"paused""#));
    // Every thread of the monitor runs under a filter (mode 2 in /proc).
    let tasks = std::fs::read_dir(format!("/proc/{}/task", vm.pid())).unwrap();
    for t in tasks {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        assert!(status.contains("Seccomp:\t2"), "{status}");
    }
    let snap = dir.join("snap");
    let out = ctl_args(&ctl_sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(out.contains(r#""ok":true"#), "{out}");
    assert!(ctl(&ctl_sock, "resume").contains(r#""state":"running""#));

    // Commands, files both ways and a guest-initiated connection; ends the guest's wait.
    common::agent::checks(&uds, ctl_path, TIMEOUT, false);
    wait_in_file(&log, "VME-RUN-EXIT status=0", &mut vm);
    let status = vm.wait_exit(TIMEOUT);
    let stderr = vm.stderr.lock().unwrap().clone();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
    let written = std::fs::read(&disk).unwrap();
    assert!(
        written.starts_with(b"VME-SECCOMP-WROTE"),
        "the guest's write"
    );

    // The snapshot restored, still strict, runs until stopped.
    let ctl2 = dir.join("ctl2.sock");
    let restore = [
        "--restore".to_string(),
        snap.display().to_string(),
        "--seccomp".into(),
        "strict".into(),
        "--vsock".into(),
        format!("uds={}", dir.join("v2.sock").display()),
        "--control-socket".into(),
        ctl2.display().to_string(),
    ];
    let restore: Vec<&str> = restore.iter().map(String::as_str).collect();
    let mut vm = Vm::start(&restore);
    let deadline = Instant::now() + TIMEOUT;
    while !ctl2.exists() && Instant::now() < deadline && vm.try_exit().is_none() {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(ctl(&ctl2, "status").contains(r#""state":"running""#));
    ctl(&ctl2, "stop");
    let status = vm.wait_exit(TIMEOUT);
    let stderr = vm.stderr.lock().unwrap().clone();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_seccomp_mode_is_refused_and_off_changes_nothing() {
    let out = Command::new(VMM)
        .args(["--seccomp", "on", "--kernel", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use off, audit or strict"));
    let out = Command::new(VMM)
        .args(["--kernel", "/k", "--seccomp", "strict", "--print-config"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("seccomp = \"strict\""));
    let out = Command::new(VMM)
        .args(["--kernel", "/k", "--print-config"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("seccomp"));
}

/// docs/seccomp.md is `vme-vmm --print-seccomp`, so it cannot drift from the filters.
#[test]
fn the_documented_allow_lists_are_the_filters() {
    let out = Command::new(VMM).arg("--print-seccomp").output().unwrap();
    let doc = std::fs::read_to_string(common::repo_dir().join("docs/seccomp.md")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        doc,
        "regenerate: target/release/vme-vmm --print-seccomp > docs/seccomp.md"
    );
}

/// Starts a riscv64 monitor with `mode` and VME_SECCOMP_DRILL=`drill`.
fn drilled(mode: &str, drill: &str, dir: &Path) -> std::process::Child {
    let mut args = riscv_tiny_args("1", "128M", "");
    args.extend([
        "--seccomp".into(),
        mode.into(),
        "--serial".into(),
        "none".into(),
        "--control-socket".into(),
        dir.join(format!("{}.sock", drill.replace(':', "-")))
            .display()
            .to_string(),
    ]);
    Command::new(VMM)
        .args(&args)
        .env("VME_SECCOMP_DRILL", drill)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The drill needs the test-only `seccomp-drill` feature, never in a release build:
/// `cargo test --release -p vme-vmm --features seccomp-drill --test seccomp`.
#[test]
#[cfg_attr(
    not(feature = "seccomp-drill"),
    ignore = "needs --features seccomp-drill"
)]
fn a_forbidden_syscall_after_the_filters_are_in_ends_the_monitor() {
    let dir = temp_dir("seccomp-drill");
    for (drill, nr) in [
        ("vcpu:execve", libc_nr::EXECVE),
        // api threads may open Unix sockets only: socket(0, ...) is refused by its argument.
        ("api:socket", libc_nr::SOCKET),
        ("main:mount", libc_nr::MOUNT),
    ] {
        let child = drilled("strict", drill, &dir);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let (kind, name) = drill.split_once(':').unwrap();
        let want = format!("vme-vmm: seccomp: thread {kind} made forbidden syscall {nr} ({name})");
        assert_eq!(out.status.code(), Some(SECCOMP_EXIT), "{drill}: {stderr}");
        assert!(stderr.contains(&want), "{drill}: want {want:?} in {stderr}");
    }
    // audit: the same syscall is only logged; the guest boots.
    let mut args = riscv_tiny_args("1", "128M", r#"vme.run="echo AUDITED""#);
    args.extend(["--seccomp".into(), "audit".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::start_wrapped(&["env", "VME_SECCOMP_DRILL=vcpu:mount"], &args);
    vm.wait_for("AUDITED", TIMEOUT);
    let status = vm.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", vm.stderr.lock().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

/// x86_64 syscall numbers of the drilled syscalls (the host the monitor runs on).
mod libc_nr {
    pub const EXECVE: i64 = 59;
    pub const SOCKET: i64 = 41;
    pub const MOUNT: i64 = 165;
}
