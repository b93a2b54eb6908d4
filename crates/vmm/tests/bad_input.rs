//! Every bad input gets a clear error and exit status 1: no panic, no core dump, no guest.

mod common;

use common::{kvm_available, run_to_end, temp_dir};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

/// Asserts a clean refusal: status 1 (not a signal, not a panic) and the message on stderr.
fn refused(args: &[&str], expect: &str) {
    let (status, stderr) = run_to_end(args);
    assert_eq!(
        status.signal(),
        None,
        "vme-vmm died by a signal for {args:?}: {stderr}"
    );
    assert_eq!(status.code(), Some(1), "exit status for {args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    assert!(
        stderr.contains(expect),
        "for {args:?} expected {expect:?} in: {stderr}"
    );
}

fn random_file(path: &Path, len: usize) {
    // xorshift: random-looking bytes, reproducible run to run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn flags_and_sizes() {
    let dir = temp_dir("badflags");
    let k = dir.join("kernel");
    std::fs::write(&k, b"x").unwrap();
    let k = k.to_str().unwrap();
    refused(&[], "no kernel given");
    refused(&["--kernel", "/nonexistent/bzImage"], "No such file");
    refused(&["--kernel", "/"], "not a regular file");
    refused(&["--kernel", k, "--vcpus", "0"], "at least 1 vCPU");
    refused(&["--kernel", k, "--vcpus", "100000"], "at most");
    refused(&["--kernel", k, "--memory", "lots"], "like 256M");
    refused(&["--kernel", k, "--memory", "1M"], "too small");
    refused(
        &["--kernel", k, "--memory", "64T"],
        "more than this host has",
    );
    refused(&["--kernel", k, "--serial", "tcp:1"], "file:PATH");
    refused(&["--kernel", k, "--cpu-template", "fastest"], "auto, host");
    refused(&["--kernel", k, "--arch", "arm"], "x86_64");
    refused(&["--bogus-flag"], "--bogus-flag");
    let toml = dir.join("m.toml");
    std::fs::write(&toml, format!("kernel = \"{k}\"\nmemroy = \"1G\"\n")).unwrap();
    refused(&["--config", toml.to_str().unwrap()], "memroy");
    refused(
        &["--config", "/nonexistent.toml"],
        "cannot read machine file",
    );
}

#[test]
fn random_kernels_are_rejected_on_both_machines() {
    let dir = temp_dir("randkernel");
    let k = dir.join("random.bin");
    random_file(&k, 1 << 20);
    let k = k.to_str().unwrap();
    refused(
        &["--arch", "riscv64", "--kernel", k, "--serial", "none"],
        "no RISC-V Image magic",
    );
    if kvm_available() {
        refused(&["--kernel", k, "--serial", "none"], "not a Linux kernel");
    }
    // Too short to hold any header at all.
    let tiny = dir.join("tiny.bin");
    std::fs::write(&tiny, b"MZ").unwrap();
    refused(
        &["--arch", "riscv64", "--kernel", tiny.to_str().unwrap()],
        "RISC-V Image",
    );
    if kvm_available() {
        refused(&["--kernel", tiny.to_str().unwrap()], "not a Linux kernel");
    }
}

#[test]
fn initrd_larger_than_memory() {
    let dir = temp_dir("biginitrd");
    let initrd = dir.join("initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();
    let initrd = initrd.to_str().unwrap();
    let rv = common::image("tiny-riscv64", "Image");
    refused(
        &[
            "--arch",
            "riscv64",
            "--kernel",
            rv.to_str().unwrap(),
            "--initrd",
            initrd,
            "--memory",
            "64M",
        ],
        "initrd",
    );
    if kvm_available() {
        let x86 = common::image("tiny", "bzImage");
        refused(
            &[
                "--kernel",
                x86.to_str().unwrap(),
                "--initrd",
                initrd,
                "--memory",
                "64M",
            ],
            "initrd",
        );
    }
}

#[test]
fn kvm_missing_or_forbidden_is_explained() {
    if !kvm_available() {
        return;
    }
    let x86 = common::image("tiny", "bzImage");
    let vmm = common::VMM;
    // A private mount namespace with an empty /dev: this process sees no /dev/kvm.
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {vmm} --kernel {} --serial none",
            x86.display()
        ))
        .output()
        .expect("run unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/dev/kvm"), "{stderr}");
    assert!(
        stderr.contains("kvm_intel") || stderr.contains("kvm_amd"),
        "{stderr}"
    );
    // An unprivileged user may not open root's /dev/kvm (mode 0600 here).
    let mode = std::fs::metadata("/dev/kvm").map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode()
    });
    if mode.map(|m| m & 0o006 == 0).unwrap_or(false) {
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                vmm,
                "--kernel",
            ])
            .arg(&x86)
            .args(["--serial", "none"])
            .output()
            .expect("run setpriv (util-linux)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("permission denied opening /dev/kvm") && stderr.contains("group kvm"),
            "{stderr}"
        );
    }
}
