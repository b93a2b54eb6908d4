//! Snapshots of the riscv64 software machine end to end: the real `vme-vmm` binary, the
//! tiny image's shell on the console, a snapshot over the control socket, the original
//! stopped, and a new monitor restored from the directory. These run on every host (no KVM).
//!
//! The test types commands into the guest's console (the monitor's stdin). Markers are
//! printed with shell arithmetic (`A$((1+1))=` prints `A2=`), so the echo of the typed line
//! never matches.

mod common;

use common::{VMM, image, temp_dir};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vme_api::control::{Reply, Request, RunState, SnapshotInfo, call};

/// Generous for an interpreted guest on a loaded 2-core host.
const TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

/// A monitor with the guest's console on our pipes.
struct Guest {
    child: Child,
    input: ChildStdin,
    lines: Receiver<String>,
    console: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    sock: PathBuf,
    started: Instant,
}

impl Guest {
    /// Boots the tiny image with `extra` flags and waits for its shell.
    fn boot(dir: &Path, memory: &str, extra: &[&str]) -> Guest {
        let (k, i) = (
            image("tiny-riscv64", "Image"),
            image("tiny-riscv64", "initramfs.cpio"),
        );
        let mut args: Vec<String> = ["--arch", "riscv64", "--memory", memory, "--vcpus", "1"]
            .map(String::from)
            .to_vec();
        args.extend(["--kernel".into(), k.display().to_string()]);
        args.extend(["--initrd".into(), i.display().to_string()]);
        args.extend(["--cmdline".into(), "console=ttyS0 quiet panic=-1".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut g = Guest::spawn(dir, "boot", &args);
        g.wait_for("VME-GUEST-READY");
        g
    }

    /// Restores the snapshot in `snap` with `extra` flags.
    fn restore(dir: &Path, snap: &Path, extra: &[&str]) -> Guest {
        let mut args = vec!["--restore".to_string(), snap.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Guest::spawn(dir, "restore", &args)
    }

    fn spawn(dir: &Path, tag: &str, args: &[String]) -> Guest {
        let sock = dir.join(format!("{tag}.sock"));
        let started = Instant::now();
        let mut child = Command::new(VMM)
            .args(args)
            .arg("--control-socket")
            .arg(&sock)
            .env("VME_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vme-vmm");
        let input = child.stdin.take().expect("piped stdin");
        let (tx, lines) = channel();
        let console = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let log = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                log.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Guest {
            child,
            input,
            lines,
            console,
            stderr,
            sock,
            started,
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        std::thread::sleep(Duration::from_millis(200));
        panic!(
            "{why}\n--- console ---\n{}\n--- stderr ---\n{}",
            self.console.lock().unwrap().join("\n"),
            self.stderr.lock().unwrap()
        );
    }

    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => self.fail(&format!(
                    "no console line with {needle:?} within {TIMEOUT:?}"
                )),
            }
        }
    }

    /// Types `cmd`, then waits for the line `TAG=` that it prints (with `$((1+1))`-style
    /// markers) and returns what follows.
    fn ask(&mut self, cmd: &str, tag: &str) -> String {
        self.input
            .write_all(format!("{cmd}\n").as_bytes())
            .expect("write to the guest console");
        let line = self.wait_for(&format!("{tag}="));
        line.split_once(&format!("{tag}="))
            .unwrap()
            .1
            .trim()
            .to_string()
    }

    fn request(&mut self, req: Request) -> Reply {
        match call(&self.sock, &req, TIMEOUT) {
            Ok(r) if r.ok => r,
            other => self.fail(&format!("{req:?}: {other:?}")),
        }
    }

    fn snapshot(&mut self, dir: &Path) -> SnapshotInfo {
        let r = self.request(Request::Snapshot {
            dir: dir.display().to_string(),
        });
        r.snapshot.expect("a snapshot reply says what was written")
    }

    fn stop(mut self) -> ExitStatus {
        self.request(Request::Stop);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                self.fail("the monitor did not exit after stop");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The monitor's own account of its restore ("restored snapshot DIR in N ms").
    fn restore_ms(&mut self) -> f64 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let err = self.stderr.lock().unwrap().clone();
            if let Some(rest) = err.split("restored snapshot ").nth(1) {
                let ms = rest.split(" in ").nth(1).and_then(|r| r.split(' ').next());
                return ms.and_then(|m| m.parse().ok()).unwrap();
            }
            if Instant::now() > deadline {
                self.fail("the monitor never said it restored");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sparse disk image of `size` bytes.
fn disk(dir: &Path, size: u64) -> String {
    let p = dir.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    format!("path={}", p.display())
}

const STATE: &str =
    "head -c 1000000 /dev/urandom > /tmp/f; echo SHA$((0+1))=$(sha256sum /tmp/f | cut -c1-64)";
const CHECK: &str = "echo SHA$((1+1))=$(sha256sum /tmp/f | cut -c1-64)";

fn uptime(g: &mut Guest, tag: &str) -> f64 {
    let n = tag.trim_start_matches('U');
    let v = g.ask(
        &format!("echo U$(({n}+0))=$(cut -d' ' -f1 /proc/uptime)"),
        tag,
    );
    v.parse().unwrap()
}

#[test]
fn a_restored_guest_keeps_its_memory_disk_and_clock() {
    let dir = temp_dir("snap-restore");
    let img = disk(&dir, 16 * MIB);
    let snap = dir.join("snap");
    let mut a = Guest::boot(&dir, "256M", &["--disk", &img]);
    let sha = a.ask(STATE, "SHA1");
    let up1 = uptime(&mut a, "U1");
    // A process that must survive, and what the guest sees of its machine.
    let facts = "echo F$((0+7))=$(nproc):$(grep MemTotal /proc/meminfo | tr -s ' ')";
    let pid = a.ask("sleep 100000 & echo P$((0+8))=$!", "P8");
    let machine = a.ask(facts, "F7");
    let info = a.snapshot(&snap);
    assert_eq!(info.memory_bytes, 256 * MIB);
    assert!(
        info.memory_data_bytes < 128 * MIB && info.memory_disk_bytes < 128 * MIB,
        "an idle guest's memory file is sparse: {info:?}"
    );
    eprintln!(
        "snapshot of an idle 256M guest: {} ms, state {} bytes, memory data {:.1} MiB \
         ({:.1} MiB on disk)",
        info.took_ms,
        info.state_bytes,
        info.memory_data_bytes as f64 / MIB as f64,
        info.memory_disk_bytes as f64 / MIB as f64
    );
    // The original runs on after its snapshot, then stops.
    assert_eq!(
        uptime(&mut a, "U2").partial_cmp(&up1),
        Some(std::cmp::Ordering::Greater)
    );
    assert_eq!(a.stop().code(), Some(0));

    let mut b = Guest::restore(&dir, &snap, &[]);
    assert_eq!(b.ask(CHECK, "SHA2"), sha, "the file in tmpfs survived");
    let up3 = uptime(&mut b, "U3");
    assert!(up3 > up1, "the guest's uptime continues: {up1} then {up3}");
    assert!(up3 < up1 + 60.0, "without a jump: {up1} then {up3}");
    assert_eq!(
        b.ask(facts, "F7"),
        machine,
        "nproc and MemTotal are unchanged"
    );
    let alive = format!("kill -0 {pid} && echo A$((0+9))=alive || echo A$((0+9))=gone");
    assert_eq!(
        b.ask(&alive, "A9"),
        "alive",
        "the background process survived"
    );
    let rw = "echo snapshot-disk | dd of=/dev/vda bs=512 conv=sync 2>/dev/null; sync; \
              echo 3 > /proc/sys/vm/drop_caches; \
              echo DISK$((2+2))=$(dd if=/dev/vda bs=13 count=1 2>/dev/null)";
    assert_eq!(
        b.ask(rw, "DISK4"),
        "snapshot-disk",
        "the disk reads and writes"
    );
    let rng = "echo RNG$((3+3))=$(head -c 32 /dev/hwrng | wc -c)";
    assert_eq!(b.ask(rng, "RNG6"), "32", "virtio-rng answers");
    // A restored VM snapshots again, into the directory its memory is mapped from.
    b.snapshot(&snap);
    assert_eq!(b.stop().code(), Some(0));
    let on_disk = std::fs::read(img.trim_start_matches("path=")).unwrap();
    assert_eq!(&on_disk[..13], b"snapshot-disk");

    let mut c = Guest::restore(&dir, &snap, &["--disk", &img]);
    assert_eq!(c.ask(CHECK, "SHA2"), sha);
    assert!(uptime(&mut c, "U5") >= up3);
    assert_eq!(c.stop().code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_paused_vm_stays_paused_and_a_running_one_runs_on() {
    let dir = temp_dir("snap-paused");
    let mut g = Guest::boot(&dir, "256M", &[]);
    let snap = dir.join("snap");
    let r = g.request(Request::Snapshot {
        dir: snap.display().to_string(),
    });
    assert_eq!(r.state, Some(RunState::Running));
    g.request(Request::Pause);
    let r = g.request(Request::Snapshot {
        dir: snap.display().to_string(),
    });
    assert_eq!(
        r.state,
        Some(RunState::Paused),
        "paused before, paused after"
    );
    let s = g.request(Request::Status).status.unwrap();
    assert_eq!(s.state, RunState::Paused);
    g.request(Request::Resume);
    assert_eq!(g.ask("echo OK$((2*3))=yes", "OK6"), "yes");
    assert_eq!(g.stop().code(), Some(0));
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

/// Offset of section `name`'s payload in a state file.
fn payload_at(state: &[u8], name: &str) -> usize {
    let needle = [&[name.len() as u8][..], name.as_bytes()].concat();
    let at = state
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("no section {name}"));
    at + needle.len() + 8
}

#[test]
fn edited_corrupted_and_mismatched_snapshots_are_refused() {
    let dir = temp_dir("snap-refused");
    let snap = dir.join("snap");
    let mut g = Guest::boot(&dir, "256M", &[]);
    g.snapshot(&snap);
    assert_eq!(g.stop().code(), Some(0));
    let state_path = snap.join("state");
    let good = std::fs::read(&state_path).unwrap();
    let put = |bytes: &[u8]| std::fs::write(&state_path, bytes).unwrap();

    let mut v = good.clone();
    v[8..12].copy_from_slice(&7u32.to_le_bytes());
    put(&v);
    let err = refused(&snap, &[]);
    assert!(err.contains("format version 7"), "{err}");
    assert!(
        err.contains("restore it with the vme-vmm that wrote it"),
        "{err}"
    );

    for section in ["hart.0", "plic", "virtio.0"] {
        let mut c = good.clone();
        c[payload_at(&good, section)] ^= 0x40;
        put(&c);
        let err = refused(&snap, &[]);
        assert!(
            err.contains(&format!("section {section} fails its CRC-32C")),
            "{err}"
        );
    }
    put(&good[..good.len() - 10]);
    let err = refused(&snap, &[]);
    assert!(err.contains("truncated in section"), "{err}");

    put(&good);
    let err = refused(&snap, &["--memory", "512M"]);
    assert!(err.contains("--memory cannot go with --restore"), "{err}");
    // The snapshot fixes the architecture too: a riscv64 snapshot is not an x86_64 VM.
    let err = refused(&snap, &["--arch", "x86_64"]);
    assert!(err.contains("--arch cannot go with --restore"), "{err}");
    let err = refused(&snap, &["--disk", "path=/nonexistent"]);
    assert!(
        err.contains("1 --disk given") && err.contains("0 disks"),
        "{err}"
    );
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory"))
        .unwrap();
    mem.set_len(128 * MIB).unwrap();
    let err = refused(&snap, &[]);
    assert!(
        err.contains("truncated or belongs to another snapshot"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restore_time_does_not_grow_with_memory() {
    let dir = temp_dir("snap-timing");
    let mut rows = Vec::new();
    for memory in ["256M", "1G"] {
        let snap = dir.join(format!("snap-{memory}"));
        let mut g = Guest::boot(&dir, memory, &[]);
        // The guest touches 64 MiB, as a working guest would.
        g.ask(
            "head -c 67108864 /dev/zero | tr '\\0' x > /tmp/w; echo W$((1+1))=done",
            "W2",
        );
        let info = g.snapshot(&snap);
        assert_eq!(g.stop().code(), Some(0));
        let mut restores = Vec::new();
        for _ in 0..3 {
            let mut r = Guest::restore(&dir, &snap, &[]);
            let own = r.restore_ms();
            r.ask("echo R$((4+4))=up", "R8");
            let answered = r.started.elapsed().as_millis();
            restores.push((own, answered));
            assert_eq!(r.stop().code(), Some(0));
        }
        rows.push((memory, info, restores));
    }
    for (memory, info, restores) in &rows {
        eprintln!(
            "riscv64 {memory}: snapshot {} ms, memory data {:.1} MiB ({:.1} MiB on disk), \
             state {} bytes; restore (monitor: state read to machine running) {:?} ms; \
             process start to the guest answering on its console {:?} ms",
            info.took_ms,
            info.memory_data_bytes as f64 / MIB as f64,
            info.memory_disk_bytes as f64 / MIB as f64,
            info.state_bytes,
            restores.iter().map(|r| r.0).collect::<Vec<_>>(),
            restores.iter().map(|r| r.1).collect::<Vec<_>>(),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
