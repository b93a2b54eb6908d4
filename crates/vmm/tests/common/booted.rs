//! A booted guest to start tests from: the tiny x86_64 image is booted once per test run,
//! checked, snapshotted once its agent answers, and stopped; tests then restore it in
//! seconds instead of booting it in minutes (on PVM hosts).
//!
//! "Once per test run": the snapshot lives under the target directory, keyed by
//! `VME_TEST_RUN` (`make test` sets it, so every test binary of one run shares the boot), or
//! by the test process when that is unset. A file lock makes concurrent callers, in this
//! process or another, wait for the one boot.

use super::{BASIC_FACTS, VIRTIO_FACTS, Vm, image, random_bytes, sha256_hex};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use vme_api::agent::AgentClient;

/// Generous for PVM hosts, where the boot takes minutes.
const BOOT: Duration = Duration::from_secs(40 * 60);

/// What a restore of the booted guest needs, and what the guest said while it booted.
pub struct Booted {
    /// The snapshot directory (`--restore` it; never write into it).
    pub snapshot: PathBuf,
    /// The disks as they were at the snapshot, in `--disk` order: copy them before giving
    /// them to a restore ([`Booted::restore_args`] does).
    pub disks: Vec<(PathBuf, bool)>,
    /// The guest's console up to the snapshot (its [`BASIC_FACTS`] and [`VIRTIO_FACTS`] lines among them).
    pub console: String,
    /// The SHA-256 of `vda` and of its first 64 KiB, as the host wrote it.
    pub vda_sha: String,
    pub vda_head_sha: String,
    /// `sha256sum /tmp/before` in the guest: a tmpfs file made before the snapshot.
    pub tmpfs_sha: String,
    /// The guest's uptime (seconds) just before the snapshot.
    pub uptime: f64,
    /// The host's time (Unix seconds) when the console was read: what the guest's clock
    /// in it is checked against (a test may look at it many minutes later).
    pub console_at: u64,
    /// vCPUs and MiB of memory it was booted with.
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl Booted {
    /// `--restore` flags for a new monitor of this guest in `dir` (its own copies of the
    /// disks, its own vsock socket `dir/v.sock` and control socket `dir/ctl.sock`).
    pub fn restore_args(&self, dir: &Path) -> Vec<String> {
        let mut args = vec![
            super::STRICT[0].to_string(),
            super::STRICT[1].to_string(),
            "--restore".to_string(),
            self.snapshot.display().to_string(),
            "--control-socket".to_string(),
            dir.join("ctl.sock").display().to_string(),
            "--vsock".to_string(),
            format!("cid=3,uds={}", dir.join("v.sock").display()),
        ];
        for (i, (disk, readonly)) in self.disks.iter().enumerate() {
            let copy = dir.join(format!("disk{i}.raw"));
            std::fs::copy(disk, &copy).expect("copy the booted guest's disk for a restore");
            let ro = if *readonly { ",readonly=on" } else { "" };
            args.extend(["--disk".into(), format!("path={}{ro}", copy.display())]);
        }
        args
    }
}

/// The tiny x86_64 image, 2 vCPUs, 256M, two disks (`vda` 4 MiB of random bytes read-only,
/// `vdb` 1 MiB writable), vsock with the agent, booted and snapshotted once per test run.
pub fn x86_tiny() -> &'static Booted {
    static BOOTED: OnceLock<Booted> = OnceLock::new();
    BOOTED.get_or_init(|| {
        let dir = run_dir().join("x86-tiny");
        std::fs::create_dir_all(&dir).expect("create the booted-guest directory");
        let _lock = Lock::take(&dir.join("lock"));
        let info = dir.join("booted.json");
        if let Some(b) = load(&dir, &info) {
            eprintln!("restoring the x86_64 tiny guest booted earlier in this run");
            return b;
        }
        let b = boot_x86_tiny(&dir);
        save(&b, &info);
        b
    })
}

/// The directory shared by one test run.
fn run_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::repo_dir().join("target"));
    let run = std::env::var("VME_TEST_RUN").unwrap_or_else(|_| std::process::id().to_string());
    target.join("tmp/booted").join(run)
}

fn boot_x86_tiny(dir: &Path) -> Booted {
    let t0 = Instant::now();
    let (vda, vdb) = (dir.join("vda.raw"), dir.join("vdb.raw"));
    let bytes = random_bytes(4 << 20);
    std::fs::write(&vda, &bytes).unwrap();
    std::fs::write(&vdb, vec![0u8; 1 << 20]).unwrap();
    let ctl = dir.join("boot-ctl.sock");
    let uds = dir.join("boot-v.sock");
    let (vcpus, memory_mib) = (2, 256);
    let run = format!(
        r#"vme.run="{BASIC_FACTS}; {VIRTIO_FACTS}; while [ ! -e /tmp/vme-done ]; do sleep 1; done""#
    );
    let cmdline = format!("console=ttyS0 quiet panic=-1 {run}");
    let (k, i) = (image("tiny", "vmlinux"), image("tiny", "initramfs.cpio"));
    let args = [
        super::STRICT[0].to_string(),
        super::STRICT[1].to_string(),
        "--kernel".to_string(),
        k.display().to_string(),
        "--initrd".into(),
        i.display().to_string(),
        "--vcpus".into(),
        vcpus.to_string(),
        "--memory".into(),
        format!("{memory_mib}M"),
        "--cmdline".into(),
        cmdline,
        "--control-socket".into(),
        ctl.display().to_string(),
        "--vsock".into(),
        format!("cid=3,uds={}", uds.display()),
        "--disk".into(),
        format!("path={},readonly=on", vda.display()),
        "--disk".into(),
        format!("path={}", vdb.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::start(&args);
    vm.wait_for("MSI=", BOOT);
    let mut agent = AgentClient::wait(&uds, BOOT)
        .unwrap_or_else(|e| vm.fail(&format!("the booted guest's agent does not answer: {e}")));
    agent.set_timeout(Some(BOOT)).unwrap();
    let sh = |agent: &mut AgentClient, cmd: &str| {
        let out = agent
            .exec(&["sh".into(), "-c".into(), cmd.into()], &[], BOOT)
            .expect("run a command through the booted guest's agent");
        assert_eq!(out.code, Some(0), "{cmd}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Made and hashed inside the guest, through the agent (so it is whole when hashed):
    // host-to-guest vsock data is not always intact on PVM hosts with 2 vCPUs.
    let tmpfs_sha = sh(
        &mut agent,
        "head -c 65536 /dev/urandom > /tmp/before; sha256sum /tmp/before",
    );
    let uptime: f64 = sh(&mut agent, "cat /proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("the guest's /proc/uptime");
    drop(agent);
    let snapshot = dir.join("snapshot");
    let reply = super::ctl_args(&ctl, &["snapshot", snapshot.to_str().unwrap()]);
    assert!(reply.contains(r#""ok":true"#), "{reply}");
    assert!(super::ctl(&ctl, "stop").contains("stopping"));
    assert_eq!(vm.wait_exit(BOOT).code(), Some(0));
    vm.assert_no_seccomp_violation();
    eprintln!(
        "booted and snapshotted the x86_64 tiny guest for this run in {:?}",
        t0.elapsed()
    );
    Booted {
        snapshot,
        disks: vec![(vda, true), (vdb, false)],
        console: vm.console_text(),
        console_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        vda_sha: sha256_hex(&bytes),
        vda_head_sha: sha256_hex(&bytes[..65536]),
        tmpfs_sha,
        uptime,
        vcpus,
        memory_mib,
    }
}

fn save(b: &Booted, path: &Path) {
    let v = serde_json::json!({
        "snapshot": b.snapshot,
        "disks": b.disks,
        "console": b.console,
        "console_at": b.console_at,
        "vda_sha": b.vda_sha,
        "vda_head_sha": b.vda_head_sha,
        "tmpfs_sha": b.tmpfs_sha,
        "uptime": b.uptime,
        "vcpus": b.vcpus,
        "memory_mib": b.memory_mib,
    });
    std::fs::write(path, v.to_string()).expect("record the booted guest");
}

/// The guest another test binary of this run booted, if it finished.
fn load(dir: &Path, path: &Path) -> Option<Booted> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let s = |k: &str| v[k].as_str().map(String::from);
    let disks = serde_json::from_value(v["disks"].clone()).ok()?;
    let b = Booted {
        snapshot: s("snapshot")?.into(),
        disks,
        console: s("console")?,
        console_at: v["console_at"].as_u64()?,
        vda_sha: s("vda_sha")?,
        vda_head_sha: s("vda_head_sha")?,
        tmpfs_sha: s("tmpfs_sha")?,
        uptime: v["uptime"].as_f64()?,
        vcpus: v["vcpus"].as_u64()? as u32,
        memory_mib: v["memory_mib"].as_u64()?,
    };
    b.snapshot.starts_with(dir).then_some(b)
}

/// An exclusive `flock` held until dropped (released by the kernel if the process dies).
struct Lock(std::fs::File);

impl Lock {
    fn take(path: &Path) -> Lock {
        let f = std::fs::File::create(path).expect("create the booted-guest lock file");
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "lock {}", path.display());
        Lock(f)
    }
}
