//! Live migration of the riscv64 software machine end to end, on loopback: the real
//! `vme-vmm` on both sides, the tiny image's shell on the console. One source guest is
//! booted and serves every case in turn: refusals (no key off loopback, wrong key), a
//! destination killed mid-migration (the source keeps running), then a migration with a
//! shell loop writing a counter into tmpfs all along (the counter is continuous at the
//! destination, a 4 MB file's checksum is unchanged, the source exits 0), and on from there,
//! paused and without a key, to a third monitor where it arrives paused.
//!
//! Markers are printed with shell arithmetic (`A$((1+1))=` prints `A2=`), so the echo of
//! the typed line never matches.

mod common;

use common::{Vm, ctl_words, riscv_tiny_args, run_to_end, temp_dir};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Generous for an interpreted guest on a loaded 2-core host.
const TIMEOUT: Duration = Duration::from_secs(300);

fn start(dir: &Path, tag: &str, mut args: Vec<String>) -> (Vm, PathBuf) {
    let sock = dir.join(format!("{tag}.sock"));
    args.extend([
        "--log-level".into(),
        "info".into(),
        "--control-socket".into(),
    ]);
    args.push(sock.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Vm::start_interactive(&args), sock)
}

/// Types `cmd`, which prints `TAG=value`, and returns the value.
fn ask(vm: &mut Vm, cmd: &str, tag: &str) -> String {
    vm.type_line(cmd);
    let line = vm.wait_for(&format!("{tag}="), TIMEOUT);
    line.split_once(&format!("{tag}="))
        .unwrap()
        .1
        .trim()
        .to_string()
}

/// A destination listening on a free loopback port; returns it and its address.
fn listen(dir: &Path, tag: &str, key: Option<&Path>) -> (Vm, String) {
    let mut args = vec!["--migrate-listen".to_string(), "127.0.0.1:0".into()];
    if let Some(k) = key {
        args.extend(["--migrate-key".into(), k.display().to_string()]);
    }
    let (vm, _) = start(dir, tag, args);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let err = vm.stderr.lock().unwrap().clone();
        if let Some(rest) = err.split("incoming migration on ").nth(1) {
            if let Some(addr) = rest.split_whitespace().next() {
                return (vm, addr.to_string());
            }
        }
        assert!(
            Instant::now() < deadline,
            "the destination never listened: {err}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn exit_code(vm: &mut Vm) -> Option<i32> {
    vm.wait_exit(TIMEOUT).code()
}

/// `CNTn=lines:last:distinct` of a copy of the counter file (the loop goes on appending
/// to the original): continuous, 1 to last without a gap or a repeat, when all three are
/// equal.
fn counter(vm: &mut Vm, n: u32) -> (u64, u64, u64) {
    let cmd = format!(
        "cp /tmp/c /tmp/s; echo CNT$(({n}+0))=$(wc -l < /tmp/s):$(tail -n1 /tmp/s):$(sort -u \
         /tmp/s | wc -l)"
    );
    let v = ask(vm, &cmd, &format!("CNT{n}"));
    let f: Vec<u64> = v.split(':').map(|x| x.trim().parse().unwrap()).collect();
    (f[0], f[1], f[2])
}

fn sha(vm: &mut Vm, n: u32) -> String {
    let cmd = format!("echo SHA$(({n}+0))=$(sha256sum /tmp/f | cut -c1-64)");
    ask(vm, &cmd, &format!("SHA{n}"))
}

#[test]
fn a_running_guest_migrates_and_failures_leave_it_running_at_the_source() {
    let dir = temp_dir("migrate");
    let (key, other) = (dir.join("key"), dir.join("other.key"));
    std::fs::write(&key, common::random_bytes(32)).unwrap();
    std::fs::write(&other, common::random_bytes(32)).unwrap();
    let key_s = key.display().to_string();

    // Refusals that need no guest: a destination off loopback without a key, a short key.
    let (status, err) = run_to_end(&["--migrate-listen", "0.0.0.0:0"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("pre-shared key") && err.contains("/dev/urandom"),
        "{err}"
    );

    let (mut src, sock) = start(&dir, "src", riscv_tiny_args("1", "256M", ""));
    src.wait_for("VME-GUEST-READY", TIMEOUT);
    let sha1 = ask(
        &mut src,
        "head -c 4000000 /dev/urandom > /tmp/f; echo SHA$((0+1))=$(sha256sum /tmp/f | cut -c1-64)",
        "SHA1",
    );
    // The memory-writing loop: appends 1, 2, 3, ... to a tmpfs file, all along.
    src.type_line("(i=0; while true; do i=$((i+1)); echo $i >> /tmp/c; done) &");
    let (n1, last1, uniq1) = counter(&mut src, 1);
    assert!(n1 > 0 && n1 == last1 && n1 == uniq1, "{n1}:{last1}:{uniq1}");

    // Off loopback without a key: refused before connecting; the guest runs on.
    let (ok, out) = ctl_words(&sock, &["migrate-send", "192.0.2.1:7000"]);
    assert!(!ok && out.contains("pre-shared key"), "{out}");

    // Wrong key: both sides refuse, the destination exits 1.
    let (mut dst, addr) = listen(&dir, "dst-wrong", Some(&other));
    let (ok, out) = ctl_words(&sock, &["migrate-send", &addr, "--key", &key_s]);
    assert!(
        !ok && out.contains("keys differ") && out.contains("keeps running"),
        "{out}"
    );
    assert_eq!(exit_code(&mut dst), Some(1));
    let err = dst.stderr.lock().unwrap().clone();
    assert!(err.contains("keys differ"), "{err}");

    // A destination killed mid-migration (a slow, capped copy): the source runs on.
    let (dst, addr) = listen(&dir, "dst-killed", Some(&key));
    let pid = dst.pid().to_string();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        let killed = Command::new("kill").args(["-9", &pid]).status().unwrap();
        assert!(killed.success());
        dst
    });
    let sock2 = sock.clone();
    let words = ["migrate-send", &addr, "--key", &key_s, "--bandwidth", "4"];
    let (ok, out) = ctl_words(&sock2, &words);
    drop(killer.join().unwrap());
    assert!(!ok && out.contains("keeps running"), "{out}");
    assert!(
        out.contains("connection") || out.contains("closed"),
        "the error names the broken connection: {out}"
    );
    let (n2, last2, uniq2) = counter(&mut src, 2);
    assert!(
        n2 > n1 && n2 == last2 && n2 == uniq2,
        "{n2}:{last2}:{uniq2}"
    );
    assert_eq!(sha(&mut src, 2), sha1);

    // The migration itself, authenticated, with the loop running.
    let (mut dst, addr) = listen(&dir, "dst", Some(&key));
    let dst_sock = dir.join("dst.sock");
    let (ok, out) = ctl_words(&sock, &["migrate-send", &addr, "--key", &key_s]);
    assert!(ok, "{out}");
    let reply: vme_api::control::Reply = serde_json::from_str(out.trim()).unwrap();
    let m = reply
        .migration
        .expect("a migration reply carries its figures");
    assert!(
        m.authenticated && m.rounds >= 1 && m.bytes_sent > 4_000_000,
        "{m:?}"
    );
    eprintln!(
        "migration of a 256M guest with a writing loop: total {} ms, downtime {} ms, {} \
         rounds, {:.1} MiB sent, {} pages in the final copy",
        m.total_ms,
        m.downtime_ms,
        m.rounds,
        m.bytes_sent as f64 / (1 << 20) as f64,
        m.final_pages
    );
    assert_eq!(
        exit_code(&mut src),
        Some(0),
        "the source exits 0 after commit"
    );
    let err = dst.stderr.lock().unwrap().clone();
    assert!(err.contains("committed"), "{err}");
    assert_eq!(
        sha(&mut dst, 3),
        sha1,
        "the 4 MB file in tmpfs arrived intact"
    );
    let (n3, last3, uniq3) = counter(&mut dst, 3);
    assert!(
        n3 > n2 && n3 == last3 && n3 == uniq3,
        "{n3}:{last3}:{uniq3}"
    );
    // The loop goes on at the destination.
    let (n4, last4, uniq4) = counter(&mut dst, 4);
    assert!(
        n4 > n3 && n4 == last4 && n4 == uniq4,
        "{n4}:{last4}:{uniq4}"
    );

    // Onwards, paused, without a key (loopback): it arrives paused, and runs on resume.
    let (ok, out) = ctl_words(&dst_sock, &["pause"]);
    assert!(ok, "{out}");
    let (mut dst2, addr) = listen(&dir, "dst2", None);
    let (ok, out) = ctl_words(&dst_sock, &["migrate-send", &addr]);
    assert!(ok && out.contains("\"authenticated\":false"), "{out}");
    assert_eq!(exit_code(&mut dst), Some(0));
    // Paused for real: its harts retire nothing.
    let retired = || {
        let (ok, out) = ctl_words(&dir.join("dst2.sock"), &["status"]);
        let r: vme_api::control::Reply = serde_json::from_str(out.trim()).unwrap();
        let s = r.status.unwrap();
        assert!(ok && s.state == vme_api::control::RunState::Paused, "{out}");
        s.instructions_retired.unwrap()
    };
    let before = retired();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(retired(), before, "a paused guest runs no instructions");
    let (ok, out) = ctl_words(&dir.join("dst2.sock"), &["resume"]);
    assert!(ok, "{out}");
    assert_eq!(sha(&mut dst2, 5), sha1);
    let (n5, last5, uniq5) = counter(&mut dst2, 5);
    assert!(
        n5 > n4 && n5 == last5 && n5 == uniq5,
        "{n5}:{last5}:{uniq5}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
