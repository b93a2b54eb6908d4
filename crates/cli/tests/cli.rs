//! `vme` against the real daemon: the verbs a user types, their output and their errors.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const VME: &str = env!("CARGO_BIN_EXE_vme");

struct Vmed {
    child: Child,
    dir: PathBuf,
    /// This daemon's own cgroup root (tests run in parallel with other daemons).
    cgroups: PathBuf,
}

impl Drop for Vmed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Monitors outlive the daemon by design: end any a failed test left behind (their
        // command lines name machine files under this test's dir).
        let dir = self.dir.to_string_lossy().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let pid = e.file_name().to_string_lossy().to_string();
            if pid.parse::<u32>().is_ok_and(|p| p != std::process::id())
                && String::from_utf8_lossy(&cmdline).contains(&dir)
            {
                let _ = Command::new("kill").args(["-9", &pid]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let deadline = Instant::now() + Duration::from_secs(5);
        for e in std::fs::read_dir(&self.cgroups)
            .into_iter()
            .flatten()
            .flatten()
        {
            while e.path().is_dir()
                && std::fs::remove_dir(e.path()).is_err()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir(&self.cgroups);
    }
}

/// A cgroup root of this test's own, under the host's cgroup2 mount.
fn cgroup_root(test: &str) -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount = info
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            post.starts_with("cgroup2 ")
                .then(|| PathBuf::from(pre.split(' ').nth(4).unwrap()))
        })
        .expect("this host has no cgroup2 mount");
    mount.join(format!("vme-cli-test-{}-{test}", std::process::id()))
}

/// `vmed` and `vme-vmm` live next to `vme` once the workspace is built.
fn sibling(name: &str) -> PathBuf {
    let p = Path::new(VME).with_file_name(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace; cargo test \
         --workspace does)",
        p.display()
    );
    p
}

fn image(file: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let p = target.join("images/tiny-riscv64").join(file);
    assert!(
        p.is_file(),
        "guest image file {} is missing: build it with `images/build.sh tiny-riscv64` (or `make images`)",
        p.display()
    );
    p
}

fn vme(socket: &Path, args: &[&str]) -> Output {
    Command::new(VME)
        .env("VME_SOCKET", socket)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn fails(out: Output) -> String {
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn the_cli_drives_a_riscv64_vm() {
    let dir = std::env::temp_dir().join(format!("vme-cli-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vme.sock");
    let cgroups = cgroup_root("drive");
    let child = Command::new(sibling("vmed"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--vmm")
        .arg(sibling("vme-vmm"))
        .arg("--cgroup-root")
        .arg(&cgroups)
        .args(["--sample-interval", "1"])
        .spawn()
        .unwrap();
    let _vmed = Vmed {
        child,
        dir,
        cgroups,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "vmed did not open its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = socket.as_path();

    let (k, i) = (image("Image"), image("initramfs.cpio"));
    let out = ok(vme(
        s,
        &[
            "create",
            "t1",
            "--arch",
            "riscv64",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--memory",
            "128M",
        ],
    ));
    assert!(out.contains("t1: defined"), "{out}");
    assert_eq!(ok(vme(s, &["start", "t1"])), "t1: running\n");
    let list = ok(vme(s, &["list"]));
    assert!(
        list.lines().any(|l| l
            .split_whitespace()
            .eq(["t1", "running", "riscv64", "1", "128M"])),
        "{list}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(vme(s, &["list", "--format", "json"]))).unwrap();
    assert_eq!(json[0]["name"], "t1");
    assert_eq!(json[0]["state"], "running");
    let err = fails(vme(s, &["start", "t1"]));
    assert!(
        err.contains("cannot start a VM that is running; allowed now: stop, pause, restart"),
        "{err}"
    );
    assert_eq!(ok(vme(s, &["stop", "--force", "t1"])), "t1: stopped\n");
    let info: serde_json::Value = serde_json::from_str(&ok(vme(s, &["info", "t1"]))).unwrap();
    assert_eq!(info["state"], "stopped");
    assert_eq!(ok(vme(s, &["rm", "t1"])), "t1: deleted\n");

    // launch = create + start; the console log shows what the guest printed (without
    // `quiet`, the kernel's banner comes first).
    let out = ok(vme(
        s,
        &[
            "launch",
            "t2",
            "--arch",
            "riscv64",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--memory",
            "128M",
            "--cmdline",
            "console=ttyS0 panic=-1",
            "--restart",
            "on-failure",
        ],
    ));
    assert_eq!(out, "t2: running\n");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = ok(vme(s, &["console", "t2", "--show-log"]));
        if log.contains("Linux version") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no kernel banner in the console log: {log:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let info: serde_json::Value = serde_json::from_str(&ok(vme(s, &["info", "t2"]))).unwrap();
    assert_eq!(info["restart_policy"], "on-failure");
    // Stats: the samples taken each second, as a table and as JSON.
    let deadline = Instant::now() + Duration::from_secs(30);
    let usage = loop {
        let u: serde_json::Value =
            serde_json::from_str(&ok(vme(s, &["stats", "t2", "--format", "json"]))).unwrap();
        if u["totals"]["samples"].as_u64().unwrap() >= 3 {
            break u;
        }
        assert!(Instant::now() < deadline, "no samples: {u}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        usage["totals"]["cpu_seconds"].as_f64().unwrap() > 0.0,
        "{usage}"
    );
    let table = ok(vme(
        s,
        &["stats", "t2", "--since", "2000-01-01T00:00:00+01:00"],
    ));
    assert!(
        table.starts_with("VM       t2 (running)\nCPU      "),
        "{table}"
    );
    assert!(
        table.contains("% now; ") && table.contains("MEMORY   "),
        "{table}"
    );
    let err = fails(vme(s, &["stats", "t2", "--since", "last week"]));
    assert!(err.contains("RFC 3339") && err.contains("400"), "{err}");
    assert_eq!(ok(vme(s, &["stop", "--force", "t2"])), "t2: stopped\n");
    assert_eq!(ok(vme(s, &["delete", "t2"])), "t2: deleted\n");
    let err = fails(vme(s, &["info", "t1"]));
    assert!(
        err.contains("no VM named \"t1\"") && err.contains("404"),
        "{err}"
    );

    // Errors a user can make, each naming the fix.
    let err = fails(vme(
        s,
        &["create", "bad/name", "--kernel", k.to_str().unwrap()],
    ));
    assert!(err.contains("'/'"), "{err}");
    let err = fails(vme(
        s,
        &[
            "create",
            "x",
            "--kernel",
            k.to_str().unwrap(),
            "--cpu-allowance",
            "9000%",
        ],
    ));
    assert!(
        err.contains("cpu_allowance") && err.contains("out of range"),
        "{err}"
    );
    let err = fails(vme(
        s,
        &[
            "create",
            "x",
            "--kernel",
            k.to_str().unwrap(),
            "--io-max",
            "/,speed=1",
        ],
    ));
    assert!(err.contains("unknown limit"), "{err}");
    ok(vme(
        s,
        &[
            "create",
            "t3",
            "--kernel",
            k.to_str().unwrap(),
            "--cpu-allowance",
            "50%",
        ],
    ));
    let info: serde_json::Value = serde_json::from_str(&ok(vme(s, &["info", "t3"]))).unwrap();
    assert_eq!(info["limits"]["cpu_allowance"], 0.5);
    ok(vme(s, &["rm", "t3"]));
    let err = fails(vme(Path::new("/nonexistent/vme.sock"), &["list"]));
    assert!(
        err.contains("cannot reach vmed") && err.contains("VME_SOCKET"),
        "{err}"
    );
}
