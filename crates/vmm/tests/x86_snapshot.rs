//! x86_64 snapshots with our probe guest (`guests/x86-probe.S`, command `s`), in seconds:
//! the probe counts once per RTC second in a register and in RAM, and prints those with
//! what it set in a debug register, the local APIC, the IOAPIC, the PIC and an MSR, and a
//! checksum of 64 KiB of RAM. A snapshot taken while it runs, restored by a new monitor,
//! must go on counting from where it was with everything else unchanged. Linux guests
//! snapshot in `x86_linux.rs`.
//!
//! The monitors run with the strict seccomp filters (as under the daemon): snapshots,
//! restores and migration make only the KVM ioctls their threads' filters list.
//!
//! Every test here boots an x86 guest: run them under `flock /tmp/vme-x86-boot.lock` on
//! shared hosts.

mod common;

use common::{VMM, Vm, ctl, kvm_available, temp_dir, x86_probe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// One line of the probe: "tick N mem=N dr0=… tpr=… ioapic=… pic=… msr=… sum=…".
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tick {
    n: u32,
    fields: Vec<(String, u32)>,
}

fn parse(line: &str) -> Option<Tick> {
    let mut words = line.strip_prefix("tick ")?.split(' ');
    let n = u32::from_str_radix(words.next()?, 16).ok()?;
    let fields = words
        .map(|w| {
            let (k, v) = w.split_once('=')?;
            Some((k.to_string(), u32::from_str_radix(v, 16).ok()?))
        })
        .collect::<Option<Vec<_>>>()?;
    (fields.len() == 7).then_some(Tick { n, fields })
}

fn ticks(vm: &Vm) -> Vec<Tick> {
    vm.console_text().lines().filter_map(parse).collect()
}

/// Checks a run of ticks: consecutive, each counter equal to the tick number, the rest
/// what the probe set (and the same checksum throughout).
fn check(ticks: &[Tick], what: &str) {
    assert!(!ticks.is_empty(), "{what}: no ticks");
    let sum = ticks[0].fields[6].1;
    for w in ticks.windows(2) {
        assert_eq!(
            w[1].n,
            w[0].n + 1,
            "{what}: ticks skip or repeat: {ticks:?}"
        );
    }
    for t in ticks {
        let want: Vec<(String, u32)> = [
            ("mem", t.n),
            ("dr0", 0x00ab_cdef),
            ("tpr", 0x20),
            ("ioapic", 0x0001_0035),
            ("pic", 0xfa),
            ("msr", 0x1234_5678),
            ("sum", sum),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        assert_eq!(t.fields, want, "{what}: tick {}", t.n);
    }
}

fn wait_ticks(vm: &mut Vm, n: usize) -> Vec<Tick> {
    let start = std::time::Instant::now();
    while ticks(vm).len() < n {
        if start.elapsed() > T {
            vm.fail(&format!("fewer than {n} ticks within {T:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ticks(vm)
}

fn boot(dir: &Path, tag: &str) -> (Vm, PathBuf) {
    boot_with(dir, tag, "strict")
}

fn boot_with(dir: &Path, tag: &str, seccomp: &str) -> (Vm, PathBuf) {
    let sock = dir.join(format!("{tag}.sock"));
    let p = x86_probe().to_str().unwrap();
    let vm = Vm::start(&[
        "--seccomp",
        seccomp,
        "--kernel",
        p,
        "--memory",
        "64M",
        "--vcpus",
        "2",
        "--cmdline",
        "s",
        "--control-socket",
        sock.to_str().unwrap(),
    ]);
    (vm, sock)
}

fn restore(snap: &Path, sock: &Path) -> Vm {
    Vm::start(&[
        common::STRICT[0],
        common::STRICT[1],
        "--restore",
        snap.to_str().unwrap(),
        "--control-socket",
        sock.to_str().unwrap(),
        "--log-level",
        "info",
    ])
}

fn snapshot(sock: &Path, snap: &Path) -> String {
    common::ctl_args(sock, &["snapshot", snap.to_str().unwrap()])
}

fn stop(mut vm: Vm, sock: &Path) {
    let (ok, text) = common::ctl_words(sock, &["stop"]);
    if !ok || !text.contains("stopping") {
        vm.fail(&format!("stop: {text}"));
    }
    assert_eq!(vm.wait_exit(T).code(), Some(0));
    vm.assert_no_seccomp_violation();
}

/// "restored snapshot DIR in N ms" from the monitor's log.
fn restore_ms(vm: &Vm) -> Option<f64> {
    let err = vm.stderr.lock().unwrap().clone();
    let rest = err.split("restored snapshot ").nth(1)?;
    rest.split(" in ").nth(1)?.split(' ').next()?.parse().ok()
}

#[test]
fn a_restored_probe_counts_on_with_its_cpu_interrupt_controllers_and_ram_intact() {
    if !kvm_available() {
        return;
    }
    let dir = temp_dir("x86snap");
    let snap = dir.join("snap");
    let (mut a, a_sock) = boot(&dir, "a");
    let before = wait_ticks(&mut a, 2);
    check(&before, "before the snapshot");
    let reply = snapshot(&a_sock, &snap);
    assert!(reply.contains(r#""state":"running""#), "{reply}");
    eprintln!("snapshot of the probe (64M, 2 vCPUs): {reply}");
    let seen = ticks(&a).last().unwrap().n;
    // The original runs on after its snapshot.
    let after = wait_ticks(&mut a, seen as usize + 2);
    check(&after, "the original after its snapshot");
    let last_a = after.last().unwrap().n;
    stop(a, &a_sock);

    let b_sock = dir.join("b.sock");
    let mut b = restore(&snap, &b_sock);
    let got = wait_ticks(&mut b, 3);
    check(&got, "the restored probe");
    let first = got[0].n;
    assert!(
        first > before.last().unwrap().n && first <= last_a + 1,
        "the restored probe goes on from the snapshot: it printed {} before, the original \
         reached {last_a}, the restored one starts at {first}",
        before.last().unwrap().n
    );
    assert_eq!(got[0].fields[6], before[0].fields[6], "the RAM checksum");
    let status = ctl(&b_sock, "status");
    assert!(status.contains(r#""vcpus":2"#), "{status}");
    eprintln!(
        "restore: monitor's own account {:?} ms",
        restore_ms(&b).expect("the monitor logs its restore")
    );
    // A restored VM snapshots again, into the directory its memory is mapped from, and
    // that snapshot restores too.
    let reply = snapshot(&b_sock, &snap);
    assert!(reply.contains(r#""state":"running""#), "{reply}");
    let n = ticks(&b).len();
    wait_ticks(&mut b, n + 1);
    stop(b, &b_sock);
    let c_sock = dir.join("c.sock");
    let mut c = restore(&snap, &c_sock);
    check(&wait_ticks(&mut c, 2), "the second restore");
    stop(c, &c_sock);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_paused_vm_stays_paused_through_its_snapshot() {
    if !kvm_available() {
        return;
    }
    let dir = temp_dir("x86snappause");
    let snap = dir.join("snap");
    let (mut vm, sock) = boot(&dir, "p");
    wait_ticks(&mut vm, 1);
    assert!(ctl(&sock, "pause").contains(r#""state":"paused""#));
    let reply = snapshot(&sock, &snap);
    assert!(reply.contains(r#""state":"paused""#), "{reply}");
    let frozen = ticks(&vm).len();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(ticks(&vm).len(), frozen, "a paused guest printed");
    assert!(ctl(&sock, "status").contains(r#""state":"paused""#));
    assert!(ctl(&sock, "resume").contains(r#""state":"running""#));
    check(&wait_ticks(&mut vm, frozen + 2), "after resume");
    stop(vm, &sock);
    // The snapshot of the paused VM restores, running.
    let r_sock = dir.join("r.sock");
    let mut r = restore(&snap, &r_sock);
    check(&wait_ticks(&mut r, 2), "restored from the paused VM");
    stop(r, &r_sock);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `vme-vmm --restore snap extra...` expecting a refusal; returns stderr.
fn refused(snap: &Path, extra: &[&str]) -> String {
    let out = Command::new(VMM)
        .arg("--restore")
        .arg(snap)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run vme-vmm");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "not refused: {err}");
    err
}

/// CRC-32C (Castagnoli), bit by bit: what the state file's checksums are.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The state file with its header's architecture and CPU model replaced (checksum kept
/// valid, as an edit by someone who knows the format would).
fn with_header(state: &[u8], arch: &str, cpu: &str) -> Vec<u8> {
    let at = 8 + 4 + 1 + state[12] as usize;
    let len = u32::from_le_bytes(state[at..at + 4].try_into().unwrap()) as usize;
    let head = &state[at + 8..at + 8 + len];
    // postcard: arch and CPU model as length-prefixed strings (short: one length byte),
    // then memory size and section count.
    let arch_len = head[0] as usize;
    let cpu_at = 1 + arch_len;
    let rest = &head[cpu_at + 1 + head[cpu_at] as usize..];
    let mut new = vec![arch.len() as u8];
    new.extend_from_slice(arch.as_bytes());
    new.push(cpu.len() as u8);
    new.extend_from_slice(cpu.as_bytes());
    new.extend_from_slice(rest);
    let mut out = state[..at].to_vec();
    out.extend_from_slice(&(new.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c(&new).to_le_bytes());
    out.extend_from_slice(&new);
    out.extend_from_slice(&state[at + 8 + len..]);
    out
}

fn header_cpu(state: &[u8]) -> String {
    let at = 8 + 4 + 1 + state[12] as usize + 8;
    let arch_len = state[at] as usize;
    let cpu_at = at + 1 + arch_len;
    String::from_utf8_lossy(&state[cpu_at + 1..cpu_at + 1 + state[cpu_at] as usize]).into()
}

#[test]
fn snapshots_of_another_machine_or_edited_ones_are_refused() {
    if !kvm_available() {
        return;
    }
    let dir = temp_dir("x86snaprefuse");
    let snap = dir.join("snap");
    let (mut vm, sock) = boot(&dir, "x");
    wait_ticks(&mut vm, 1);
    snapshot(&sock, &snap);
    stop(vm, &sock);
    let state_path = snap.join("state");
    let good = std::fs::read(&state_path).unwrap();
    let put = |bytes: &[u8]| std::fs::write(&state_path, bytes).unwrap();
    let cpu = header_cpu(&good);
    let (template, vendor) = cpu.split_once(' ').expect("template and vendor");
    eprintln!("the snapshot's CPU model: {cpu:?}");

    // Restoring with machine flags (an architecture among them) is refused outright.
    let err = refused(&snap, &["--arch", "riscv64"]);
    assert!(err.contains("--arch cannot go with --restore"), "{err}");
    // A header that says riscv64 over an x86_64 machine file.
    put(&with_header(&good, "riscv64", &cpu));
    let err = refused(&snap, &[]);
    assert!(
        err.contains("the machine is x86_64 but the header says riscv64"),
        "{err}"
    );
    // Another CPU vendor, another template.
    let other = if vendor == "GenuineIntel" {
        "AuthenticAMD"
    } else {
        "GenuineIntel"
    };
    for edited in [
        format!("{template} {other}"),
        format!(
            "{} {vendor}",
            if template == "host" { "pvm" } else { "host" }
        ),
    ] {
        put(&with_header(&good, "x86_64", &edited));
        let err = refused(&snap, &[]);
        assert!(
            err.contains("CPU model") && err.contains(&edited) && err.contains("restore it on"),
            "{err}"
        );
    }
    // A flipped bit in a vCPU's section, a truncated state file, a short memory file.
    let needle = b"\x06vcpu.0";
    let at = good.windows(7).position(|w| w == needle).unwrap() + 7 + 8;
    let mut bad = good.clone();
    bad[at + 3] ^= 0x10;
    put(&bad);
    let err = refused(&snap, &[]);
    assert!(err.contains("section vcpu.0 fails its CRC-32C"), "{err}");
    put(&good[..good.len() - 3]);
    let err = refused(&snap, &[]);
    assert!(err.contains("truncated"), "{err}");
    put(&good);
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory"))
        .unwrap();
    mem.set_len(32 << 20).unwrap();
    let err = refused(&snap, &[]);
    assert!(err.contains("belongs to another snapshot"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Device backends may be given again at restore, by position, as on riscv64.
#[test]
fn a_restore_takes_new_disk_backends_by_position() {
    if !kvm_available() {
        return;
    }
    let dir = temp_dir("x86snapdisk");
    let snap = dir.join("snap");
    let (a, b) = (dir.join("a.raw"), dir.join("b.raw"));
    for p in [&a, &b] {
        std::fs::write(p, vec![0u8; 1 << 20]).unwrap();
    }
    let sock = dir.join("d.sock");
    let disk = format!("path={}", a.display());
    let mut vm = Vm::start(&[
        common::STRICT[0],
        common::STRICT[1],
        "--kernel",
        x86_probe().to_str().unwrap(),
        "--memory",
        "64M",
        "--cmdline",
        "s",
        "--disk",
        &disk,
        "--control-socket",
        sock.to_str().unwrap(),
    ]);
    wait_ticks(&mut vm, 1);
    snapshot(&sock, &snap);
    stop(vm, &sock);
    let moved = format!("path={}", b.display());
    let err = refused(&snap, &["--disk", &moved, "--disk", &moved]);
    assert!(err.contains("2 --disk given"), "{err}");
    let r_sock = dir.join("r.sock");
    let mut r = Vm::start(&[
        common::STRICT[0],
        common::STRICT[1],
        "--restore",
        snap.to_str().unwrap(),
        "--disk",
        &moved,
        "--control-socket",
        r_sock.to_str().unwrap(),
    ]);
    check(&wait_ticks(&mut r, 2), "restored with the disk moved");
    let status = ctl(&r_sock, "status");
    assert!(status.contains(r#""state":"running""#), "{status}");
    stop(r, &r_sock);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `memory_data_bytes` of a snapshot reply.
fn data_bytes(reply: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(reply.trim()).expect("a JSON reply");
    v["snapshot"]["memory_data_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no memory_data_bytes in {reply}"))
}

fn sha256_file(path: &Path) -> String {
    common::sha256_hex(&std::fs::read(path).expect("read a memory file"))
}

/// Diff snapshots on x86_64 (KVM's dirty-page log plus the monitor's own writes): a diff
/// taken on top of a full snapshot, merged, holds exactly the memory of a full snapshot
/// taken at the same (paused) moment, and the chain restores into a probe that counts on.
#[test]
fn a_diff_chain_restores_the_same_memory_as_a_full_snapshot() {
    if !kvm_available() {
        return;
    }
    let dir = temp_dir("x86diff");
    let (base, d1, full, merged) = (
        dir.join("base"),
        dir.join("d1"),
        dir.join("full"),
        dir.join("merged"),
    );
    let (mut a, sock) = boot(&dir, "a");
    wait_ticks(&mut a, 1);
    let (ok, text) = common::ctl_words(&sock, &["snapshot", d1.to_str().unwrap(), "--diff"]);
    assert!(
        !ok && text.contains("no snapshot to diff against yet"),
        "{text}"
    );
    let base_reply = snapshot(&sock, &base);
    let n = ticks(&a).len();
    wait_ticks(&mut a, n + 2);
    assert!(ctl(&sock, "pause").contains(r#""state":"paused""#));
    let paused_at = ticks(&a).last().unwrap().n;
    let diff_reply = common::ctl_args(&sock, &["snapshot", d1.to_str().unwrap(), "--diff"]);
    assert!(
        diff_reply.contains(&format!(r#""parent":"{}""#, base.display())),
        "{diff_reply}"
    );
    let full_reply = snapshot(&sock, &full);
    eprintln!("full: {base_reply}diff: {diff_reply}full at the diff's moment: {full_reply}");
    assert!(
        data_bytes(&diff_reply) < data_bytes(&full_reply),
        "the diff holds fewer pages than a full snapshot"
    );
    stop(a, &sock);
    let out = Command::new(VMM)
        .arg("snapshot-merge")
        .arg(&d1)
        .arg(&merged)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        sha256_file(&merged.join("memory")),
        sha256_file(&full.join("memory")),
        "a merged diff holds exactly the memory of a full snapshot at that moment"
    );
    // The chain itself restores: the probe goes on from the paused tick.
    let r_sock = dir.join("r.sock");
    let mut r = restore(&d1, &r_sock);
    let got = wait_ticks(&mut r, 2);
    check(&got, "restored from the diff chain");
    assert_eq!(
        got[0].n,
        paused_at + 1,
        "the restored probe goes on from the diff"
    );
    stop(r, &r_sock);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A destination (`--migrate-listen` on a free loopback port) and its address.
fn listen(dir: &Path) -> (Vm, PathBuf, String) {
    let sock = dir.join("dst.sock");
    let vm = Vm::start(&[
        common::STRICT[0],
        common::STRICT[1],
        "--migrate-listen",
        "127.0.0.1:0",
        "--control-socket",
        sock.to_str().unwrap(),
        "--log-level",
        "info",
    ]);
    let deadline = std::time::Instant::now() + T;
    loop {
        let err = vm.stderr.lock().unwrap().clone();
        if let Some(rest) = err.split("incoming migration on ").nth(1) {
            if let Some(addr) = rest.split_whitespace().next() {
                return (vm, sock, addr.to_string());
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the destination never listened: {err}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live migration of an x86_64 VM on loopback (KVM's dirty log for the pre-copy): the
/// probe's counters go on at the destination from exactly where the source stopped, its
/// CPU, interrupt controllers and RAM intact, and the source exits 0.
#[test]
fn a_running_probe_migrates_and_counts_on_at_the_destination() {
    if !kvm_available() {
        return;
    }
    let dir = temp_dir("x86migrate");
    // Under strict filters the control thread may not open the TCP connection: the request
    // is refused with what to do, and the VM runs on.
    let (mut strict, strict_sock) = boot(&dir, "strict");
    wait_ticks(&mut strict, 1);
    let (ok, reply) = common::ctl_words(&strict_sock, &["migrate-send", "127.0.0.1:9"]);
    assert!(!ok && reply.contains("--seccomp audit or off"), "{reply}");
    wait_ticks(&mut strict, 1);
    stop(strict, &strict_sock);
    // The source in audit mode (the TCP socket is logged, not refused); the destination,
    // which receives before its filters are in, strict.
    let (mut src, src_sock) = boot_with(&dir, "src", "audit");
    let before = wait_ticks(&mut src, 2);
    check(&before, "the source before the migration");
    let (mut dst, dst_sock, addr) = listen(&dir);
    let (ok, reply) = common::ctl_words(&src_sock, &["migrate-send", &addr]);
    assert!(ok && reply.contains(r#""migration""#), "{reply}");
    eprintln!("x86_64 probe (64M, 2 vCPUs) migrated: {reply}");
    assert_eq!(src.wait_exit(T).code(), Some(0), "the source exits 0");
    src.assert_no_seccomp_violation();
    let last = ticks(&src).last().unwrap().clone();
    check(&ticks(&src), "the source");
    let got = wait_ticks(&mut dst, 2);
    check(&got, "the destination");
    assert_eq!(
        got[0].n,
        last.n + 1,
        "the destination goes on from the source's last tick, no skip, no repeat"
    );
    assert_eq!(got[0].fields[6], before[0].fields[6], "the RAM checksum");
    assert!(ctl(&dst_sock, "status").contains(r#""vcpus":2"#));
    stop(dst, &dst_sock);
    let _ = std::fs::remove_dir_all(&dir);
}
