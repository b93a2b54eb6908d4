//! What every test of the daemon needs, shared by vmed's tests and the `vme` CLI's (which
//! include this file by path): a real `vmed` on a state dir of its own, killed with its
//! monitors and cgroups when the test ends; raw HTTP over its socket; the riscv64 tiny image.
#![allow(dead_code)] // Each test binary uses its own part.

use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A binary of the workspace: test executables live in `target/<profile>/deps`, the
/// binaries one level up.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first (cargo build --release --workspace; \
         cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// A file of the riscv64 tiny image.
pub fn image(file: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let p = target.join("images/tiny-riscv64").join(file);
    assert!(
        p.is_file(),
        "guest image file {} is missing: build it with `images/build.sh tiny-riscv64` (or \
         `make images`)",
        p.display()
    );
    p.canonicalize().unwrap()
}

/// The daemon under test.
pub struct Vmed {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
    /// Flags beyond the socket, state dir, stop timeout and cgroup root, given at each launch.
    pub args: Vec<String>,
    /// This daemon's own cgroup root (tests run in parallel and reuse VM names); None runs
    /// the monitors unconfined (`--cgroups false`).
    pub cgroups: Option<PathBuf>,
    /// A program the daemon runs under (`ip netns exec NS`).
    pub prefix: Vec<String>,
}

impl Vmed {
    /// A daemon for test `test`, with cgroups of its own if `cgroups`, and `args`.
    pub fn start(test: &str, cgroups: bool, args: &[&str]) -> Vmed {
        Vmed::start_under(test, cgroups, args, &[])
    }

    /// [`Vmed::start`] under `prefix`.
    pub fn start_under(test: &str, cgroups: bool, args: &[&str], prefix: &[&str]) -> Vmed {
        let id = format!("vme-test-{}-{test}", std::process::id());
        let dir = std::env::temp_dir().join(&id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cgroups = cgroups.then(|| cgroup2_mount().join(&id));
        if let Some(c) = &cgroups {
            remove_cgroups(c);
        }
        let mut d = Vmed {
            child: Command::new("true").spawn().unwrap(),
            socket: dir.join("vme.sock"),
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            cgroups,
            prefix: prefix.iter().map(|a| a.to_string()).collect(),
        };
        d.launch(None);
        d
    }

    /// Runs the daemon (again) on this state and waits for its socket; `crash_at` arms one
    /// of vmed's crash points.
    pub fn launch(&mut self, crash_at: Option<&str>) {
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("vmed"));
                c
            }
            None => Command::new(bin("vmed")),
        };
        cmd.env("VMED_TEST_CRASH_AT", crash_at.unwrap_or(""))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--stop-timeout", "3"]);
        if !self.args.iter().any(|a| a == "--vmm") {
            cmd.arg("--vmm").arg(bin("vme-vmm"));
        }
        match &self.cgroups {
            Some(c) => cmd.arg("--cgroup-root").arg(c),
            None => cmd.args(["--cgroups", "false"]),
        };
        self.child = cmd.args(&self.args).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "vmed did not open its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon with SIGKILL and starts a new one on the same state.
    pub fn kill9_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.launch(None);
    }

    /// One request; the status code and the JSON body.
    pub fn http(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        http(&self.socket, method, path, body)
    }

    /// The processes of monitors started for VM `name`.
    pub fn monitors_of(&self, name: &str) -> Vec<i32> {
        let machine = self.dir.join(format!("state/vms/{name}/machine.toml"));
        pids_of(machine.to_str().unwrap())
    }
}

impl Drop for Vmed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Monitors outlive the daemon by design (their own process groups): end any a
        // failed test left behind. The trailing '/' keeps test "crash" from matching test
        // "crash-points"' processes.
        kill_all(&format!("{}/", self.dir.display()));
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(c) = &self.cgroups {
            remove_cgroups(c);
        }
    }
}

/// The processes (other than this one) whose command line contains `needle`.
pub fn pids_of(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if pid != std::process::id() as i32 && String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Kills (SIGKILL) every process whose command line contains `needle`.
pub fn kill_all(needle: &str) {
    for pid in pids_of(needle) {
        // SAFETY: kill(2) with plain integers, on a process the caller named.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Reads `from` to its end on a thread of its own; what it has read so far.
pub fn gather(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    out
}

/// The host's cgroup2 mount (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host).
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            post.starts_with("cgroup2 ")
                .then(|| PathBuf::from(pre.split(' ').nth(4).unwrap()))
        })
        .expect("this host has no cgroup2 mount")
}

/// The host's cgroup v1 hierarchies' mounts (none on a unified host).
pub fn cgroup_v1_mounts() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            post.starts_with("cgroup ")
                .then(|| PathBuf::from(pre.split(' ').nth(4).unwrap()))
        })
        .collect()
}

/// Removes a test daemon's cgroups once their (killed) monitors are gone: its v2 root and,
/// on a host with cgroup v1 hierarchies, the same path in each of them.
pub fn remove_cgroups(root: &Path) {
    let rel = root.strip_prefix(cgroup2_mount()).unwrap_or(root);
    let mut roots = vec![root.to_path_buf()];
    roots.extend(cgroup_v1_mounts().iter().map(|m| m.join(rel)));
    let deadline = Instant::now() + Duration::from_secs(5);
    for root in roots {
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                while std::fs::remove_dir(e.path()).is_err() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = std::fs::remove_dir(&root);
    }
}

/// Sends one HTTP/1.1 request; the connection, to read the reply from.
pub fn send(socket: &Path, method: &str, path: &str, body: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: vme\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// One request; the status code and the body as text.
pub fn request(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut reply = String::new();
    send(socket, method, path, body)
        .read_to_string(&mut reply)
        .unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// One request; the status code and the JSON body.
pub fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (code, text) = request(socket, method, path, body);
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    (code, json)
}
