//! Diff snapshots of the riscv64 software machine end to end: the real `vme-vmm`, the tiny
//! image's shell on the console, full and diff snapshots over the control socket, restores
//! of a chain, refusals of broken chains, `snapshot-merge`, and the figures (printed, not
//! asserted): diff size and time against a full snapshot, restore time of a chain against a
//! full snapshot, and what the dirty-page log costs a running guest.

mod common;

use common::{VMM, Vm, riscv_tiny_args, temp_dir};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vme_api::control::{Request, SnapshotInfo, call};

/// Generous for an interpreted guest on a loaded 2-core host.
const TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

/// A monitor with the guest's console on a pipe and a control socket.
struct Guest {
    vm: Vm,
    sock: PathBuf,
    started: Instant,
    /// For a restore: the monitor's own account of it (state read to machine running).
    restore_ms: f64,
}

impl Guest {
    fn boot(dir: &Path, tag: &str) -> Guest {
        let args = riscv_tiny_args("1", "256M", "");
        let mut g = Guest::spawn(dir, tag, args);
        g.vm.wait_for("VME-GUEST-READY", TIMEOUT);
        g
    }

    /// Restores `snap` and waits until the machine runs (its control socket is up then).
    fn restore(dir: &Path, tag: &str, snap: &Path) -> Guest {
        let args = vec!["--restore".into(), snap.display().to_string()];
        let mut g = Guest::spawn(dir, tag, args);
        g.restore_ms = g.wait_restored();
        g
    }

    fn spawn(dir: &Path, tag: &str, mut args: Vec<String>) -> Guest {
        let sock = dir.join(format!("{tag}.sock"));
        args.extend([
            "--log-level".into(),
            "info".into(),
            "--control-socket".into(),
        ]);
        args.push(sock.display().to_string());
        let started = Instant::now();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Guest {
            vm: Vm::start_interactive(&args),
            sock,
            started,
            restore_ms: 0.0,
        }
    }

    /// Types `cmd`, which prints `TAG=value` (with a `$((..))` marker so the echo of the
    /// typed line never matches), and returns the value.
    fn ask(&mut self, cmd: &str, tag: &str) -> String {
        self.vm.type_line(cmd);
        let line = self.vm.wait_for(&format!("{tag}="), TIMEOUT);
        let v = line.split_once(&format!("{tag}=")).unwrap().1;
        v.trim().to_string()
    }

    fn sha(&mut self, file: &str, n: u32) -> String {
        let cmd = format!("echo H$(({n}+0))=$(sha256sum {file} | cut -c1-64)");
        self.ask(&cmd, &format!("H{n}"))
    }

    fn request(&mut self, req: Request) -> Result<SnapshotInfo, String> {
        match call(&self.sock, &req, TIMEOUT) {
            Ok(r) if r.ok => Ok(r.snapshot.expect("a snapshot reply says what was written")),
            Ok(r) => Err(r.error.unwrap_or_default()),
            Err(e) => self.vm.fail(&format!("{req:?}: {e}")),
        }
    }

    fn full(&mut self, dir: &Path) -> SnapshotInfo {
        let req = Request::Snapshot {
            dir: dir.display().to_string(),
        };
        self.request(req).unwrap_or_else(|e| self.vm.fail(&e))
    }

    fn diff(&mut self, dir: &Path) -> Result<SnapshotInfo, String> {
        self.request(Request::SnapshotDiff {
            dir: dir.display().to_string(),
        })
    }

    fn stop(mut self) {
        if let Err(e) = call(&self.sock, &Request::Stop, TIMEOUT) {
            self.vm.fail(&format!("stop: {e}"));
        }
        assert_eq!(self.vm.wait_exit(TIMEOUT).code(), Some(0));
    }

    /// The monitor's own account of its restore ("restored snapshot DIR in N ms").
    fn wait_restored(&mut self) -> f64 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let err = self.vm.stderr.lock().unwrap().clone();
            if let Some(rest) = err.split("restored snapshot ").nth(1) {
                let ms = rest.split(" in ").nth(1).and_then(|r| r.split(' ').next());
                return ms.and_then(|m| m.parse().ok()).unwrap();
            }
            if Instant::now() > deadline {
                self.vm.fail("the monitor never said it restored");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Runs `vme-vmm args...` expecting exit status 1; returns stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(VMM).args(args).output().expect("run vme-vmm");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "not refused: {err}");
    err
}

/// SHA-256 of a file, through the host's sha256sum.
fn host_sha(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// A file of `bytes` random bytes in the guest's tmpfs; its SHA-256.
fn write_random(g: &mut Guest, file: &str, bytes: u64, n: u32) -> String {
    g.ask(
        &format!("head -c {bytes} /dev/urandom > {file}; echo W$(({n}+0))=ok"),
        &format!("W{n}"),
    );
    g.sha(file, n)
}

#[test]
fn a_diff_chain_restores_the_same_memory_as_a_full_snapshot() {
    let dir = temp_dir("diffsnap");
    let (full, d1, d2) = (dir.join("full"), dir.join("d1"), dir.join("d2"));
    let mut g = Guest::boot(&dir, "boot");
    let err = g.diff(&d1).unwrap_err();
    assert!(err.contains("take a full snapshot first"), "{err}");

    // 16 MiB the guest keeps, then the full snapshot.
    g.ask(
        "head -c 16777216 /dev/zero | tr '\\0' x > /tmp/big; echo B$((1+1))=ok",
        "B2",
    );
    let sha_a = write_random(&mut g, "/tmp/a", 1_000_000, 1);
    let f = g.full(&full);
    // 1 MB more, then a diff, through `vme-vmm ctl` (the CLI form).
    let sha_b = write_random(&mut g, "/tmp/b", 1_000_000, 2);
    let out = Command::new(VMM)
        .args(["ctl", "--control-socket"])
        .arg(&g.sock)
        .arg("snapshot")
        .arg(&d1)
        .arg("--diff")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: vme_api::control::Reply = serde_json::from_slice(&out.stdout).unwrap();
    let i1 = reply.snapshot.unwrap();
    assert_eq!(i1.parent.as_deref(), Some(full.to_str().unwrap()));
    assert!(
        i1.memory_data_bytes > 1_000_000 && i1.memory_data_bytes < f.memory_data_bytes / 4,
        "the diff holds the 1 MB written and far less than the full {} bytes: {i1:?}",
        f.memory_data_bytes
    );
    // Another change, then (paused, so nothing moves between them) a second diff and a
    // full snapshot of the same moment.
    let sha_c = write_random(&mut g, "/tmp/c", 300_000, 3);
    let up = g.ask("echo U$((1+0))=$(cut -d' ' -f1 /proc/uptime)", "U1");
    let err = g.diff(&full).unwrap_err();
    assert!(err.contains("would replace a snapshot it needs"), "{err}");
    call(&g.sock, &Request::Pause, TIMEOUT).unwrap();
    let i2 = g.diff(&d2).unwrap();
    let f2 = g.full(&dir.join("full2"));
    call(&g.sock, &Request::Resume, TIMEOUT).unwrap();
    assert_eq!(g.ask("echo OK$((2*3))=yes", "OK6"), "yes", "runs on");
    g.stop();
    eprintln!(
        "256M riscv64 guest: full snapshot {:.1} MiB data, {} ms; diff after 1 MB written \
         {:.2} MiB data, {} ms; diff after 0.3 MB {:.2} MiB, {} ms (paused); full at that \
         moment {:.1} MiB, {} ms",
        mib(f.memory_data_bytes),
        f.took_ms,
        mib(i1.memory_data_bytes),
        i1.took_ms,
        mib(i2.memory_data_bytes),
        i2.took_ms,
        mib(f2.memory_data_bytes),
        f2.took_ms
    );

    // The chain full <- d1 <- d2 restores the guest: its files, its clock, and it runs.
    let mut r = Guest::restore(&dir, "r1", &d2);
    assert_eq!(
        r.sha("/tmp/a", 4),
        sha_a,
        "a file from before the full snapshot"
    );
    assert_eq!(
        r.sha("/tmp/b", 5),
        sha_b,
        "a file from before the first diff"
    );
    assert_eq!(
        r.sha("/tmp/c", 6),
        sha_c,
        "a file from before the second diff"
    );
    let big = "echo BIG$((1+1))=$(tr -d x < /tmp/big | wc -c)";
    assert_eq!(r.ask(big, "BIG2"), "0", "the 16 MiB file is all x");
    let up2: f64 = r
        .ask("echo U$((2+0))=$(cut -d' ' -f1 /proc/uptime)", "U2")
        .parse()
        .unwrap();
    assert!(up2 > up.parse::<f64>().unwrap(), "uptime continues");
    // A restored VM's log starts at the restore, with the restored diff as parent.
    let i3 = r.diff(&dir.join("d3")).unwrap();
    assert_eq!(i3.parent.as_deref(), Some(d2.to_str().unwrap()));
    r.stop();

    // Flattened, the chain is the full snapshot of the same moment, byte for byte.
    let merged = dir.join("merged");
    let out = Command::new(VMM)
        .arg("snapshot-merge")
        .arg(&d2)
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        host_sha(&merged.join("memory")),
        host_sha(&dir.join("full2/memory")),
        "merged diffs hold exactly the memory of a full snapshot at that moment"
    );
    let mut m = Guest::restore(&dir, "m", &merged);
    assert_eq!(m.sha("/tmp/c", 7), sha_c);
    m.stop();

    // A parent removed, or replaced by a later snapshot, is refused by name.
    let moved = dir.join("full-moved");
    std::fs::rename(&full, &moved).unwrap();
    let d2s = d2.to_str().unwrap();
    let err = refused(&["--restore", d2s]);
    assert!(
        err.contains("needs its parent snapshot") && err.contains(full.to_str().unwrap()),
        "{err}"
    );
    std::fs::rename(&moved, &full).unwrap();
    let mut again = Guest::restore(&dir, "r2", &merged);
    again.full(&d1);
    again.stop();
    let err = refused(&["--restore", d2s]);
    assert!(
        err.contains("was replaced by a later snapshot") && err.contains(d1.to_str().unwrap()),
        "{err}"
    );
    // The merged snapshot needs no parent.
    let mut m = Guest::restore(&dir, "m2", &merged);
    assert_eq!(m.sha("/tmp/b", 8), sha_b);
    m.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Seconds the guest takes for `work`, measured inside it.
fn timed(g: &mut Guest, work: &str, n: u32) -> f64 {
    let cmd = format!(
        "a=$(cut -d' ' -f1 /proc/uptime); {work}; b=$(cut -d' ' -f1 /proc/uptime); \
         echo T$(({n}+0))=$a $b"
    );
    let v = g.ask(&cmd, &format!("T{n}"));
    let (a, b) = v.split_once(' ').unwrap();
    b.parse::<f64>().unwrap() - a.parse::<f64>().unwrap()
}

#[test]
fn what_diff_snapshots_and_the_dirty_log_cost() {
    let dir = temp_dir("diffsnap-cost");
    let loops = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done";
    let writes = "dd if=/dev/zero of=/tmp/w bs=1M count=32 2>/dev/null; rm /tmp/w";
    let mut g = Guest::boot(&dir, "boot");
    let mut off = (Vec::new(), Vec::new());
    for n in 0..3 {
        off.0.push(timed(&mut g, loops, 10 + n));
        off.1.push(timed(&mut g, writes, 20 + n));
    }
    // The first snapshot turns the log on; it stays on.
    let full = dir.join("full");
    g.full(&full);
    let mut on = (Vec::new(), Vec::new());
    for n in 0..3 {
        on.0.push(timed(&mut g, loops, 30 + n));
        on.1.push(timed(&mut g, writes, 40 + n));
    }
    g.ask(
        "head -c 4194304 /dev/zero | tr '\\0' y > /tmp/d; echo D$((1+1))=ok",
        "D2",
    );
    let diff = dir.join("diff");
    let d = g.diff(&diff).unwrap();
    let f = g.full(&dir.join("full-now"));
    g.stop();
    let mut chain = Vec::new();
    let mut flat = Vec::new();
    for (k, (snap, out)) in [(&diff, &mut chain), (&dir.join("full-now"), &mut flat)]
        .into_iter()
        .enumerate()
    {
        for i in 0..3 {
            let mut r = Guest::restore(&dir, &format!("r{k}{i}"), snap);
            let own = r.restore_ms;
            r.ask("echo R$((4+4))=up", "R8");
            out.push((own, r.started.elapsed().as_millis()));
            r.stop();
        }
    }
    eprintln!(
        "dirty log off/on, seconds in the guest: shell loop {:?} / {:?}; writing 32 MiB to \
         tmpfs {:?} / {:?}",
        off.0, on.0, off.1, on.1
    );
    eprintln!(
        "after 4 MiB written: diff {:.2} MiB data in {} ms; full {:.1} MiB in {} ms",
        mib(d.memory_data_bytes),
        d.took_ms,
        mib(f.memory_data_bytes),
        f.took_ms
    );
    eprintln!(
        "restore (monitor: state read to machine running; process start to the guest \
         answering), ms: chain of one diff {:?}, full {:?}",
        chain, flat
    );
    let _ = std::fs::remove_dir_all(&dir);
}
