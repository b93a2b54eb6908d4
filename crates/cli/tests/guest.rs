//! `vme exec`, `vme console` and devices against the real daemon and a real riscv64 VM:
//! commands through the guest agent over vsock, a disk the guest sees, the interactive
//! console (also across a daemon restart) and its bounded log, and the refusals.

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VME: &str = env!("CARGO_BIN_EXE_vme");
/// Generous for an interpreted guest on a loaded 2-core host.
const BOOT: Duration = Duration::from_secs(300);

#[path = "../../vmed/tests/support/mod.rs"]
mod support;
use support::{Vmed, gather, request};

/// A daemon (without cgroups: they have their own tests) with a small console log.
fn start(test: &str) -> Vmed {
    start_under(test, &[])
}

/// [`start`] under `prefix` (`ip netns exec NS`), with the projects' bridges and taps in
/// the daemon's namespace (per-project namespaces have their own test, in vmed's).
fn start_under(test: &str, prefix: &[&str]) -> Vmed {
    Vmed::start_under(
        test,
        false,
        &["--console-log-size", "8K", "--per-project-netns", "false"],
        prefix,
    )
}

fn image(file: &str) -> String {
    support::image(file).display().to_string()
}

fn vme(d: &Vmed, args: &[&str]) -> Output {
    Command::new(VME)
        .env("VME_SOCKET", &d.socket)
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// One raw API request: the status code and the JSON body.
fn http(d: &Vmed, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (code, text) = request(&d.socket, method, path, body);
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `vme console NAME` with its stdin and stdout in our hands.
struct Attached {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Attached {
    fn new(d: &Vmed, name: &str) -> Attached {
        let mut child = Command::new(VME)
            .env("VME_SOCKET", &d.socket)
            .args(["console", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = gather(child.stdout.take().unwrap());
        Attached { child, out }
    }

    fn send(&mut self, bytes: &[u8]) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Types `line` (again every few seconds: the guest may still be booting, or the
    /// attach not yet through) until `want` shows up.
    fn run_until(&mut self, line: &str, want: &str) {
        let deadline = Instant::now() + BOOT;
        loop {
            self.send(format!("{line}\n").as_bytes());
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                if text(&self.out.lock().unwrap()).contains(want) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(
                Instant::now() < deadline,
                "no {want:?} on the console: {}",
                text(&self.out.lock().unwrap())
            );
        }
    }

    /// Ctrl-a q; the CLI must leave on its own, successfully.
    fn detach(mut self) -> String {
        self.send(b"\x01q");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                assert!(status.success(), "{err}");
                return err;
            }
            assert!(Instant::now() < deadline, "vme console did not detach");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn exec_console_and_a_disk_on_a_riscv64_vm() {
    let mut d = start("main");
    let (k, i) = (image("Image"), image("initramfs.cpio"));
    let disk = d.dir.join("data.img");
    // 1 MiB: the guest sees 2048 sectors.
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk = disk.to_str().unwrap().to_string();

    // Bad device specs: 400, nothing stored.
    let base = json!({"name": "bad", "arch": "riscv64", "kernel": k, "initrd": i});
    for (extra, why) in [
        (json!({"disks": [{"path": "data.img"}]}), "relative"),
        (
            json!({"disks": [{"path": "/nonexistent.img"}]}),
            "check the path",
        ),
        (
            json!({"disks": [{"path": "/tmp"}]}),
            "neither a regular file",
        ),
        (
            json!({"disks": [{"path": disk, "size": 1}]}),
            "unknown field",
        ),
        (
            json!({"disks": [{"path": disk, "serial": "has space"}]}),
            "serial",
        ),
        (json!({"nics": [{"tap": "a/b"}]}), "interface name"),
        (json!({"nics": [{"tap": "abcdefghijklmnop"}]}), "at most 15"),
        (
            json!({"nics": [{"tap": "t0"}, {"tap": "t0"}]}),
            "given twice",
        ),
        (json!({"nics": [{"mac": "01:00:5e:00:00:01"}]}), "multicast"),
        (
            json!({"nics": [{}, {}, {}, {}, {}, {}, {}]}),
            "virtio slots",
        ),
        (json!({"vsock": "yes"}), "invalid type"),
    ] {
        let mut body = base.clone();
        for (key, v) in extra.as_object().unwrap() {
            body[key] = v.clone();
        }
        let (code, v) = http(&d, "POST", "/1.0/vms", &body.to_string());
        let msg = v["error"].as_str().unwrap_or_default();
        assert_eq!(code, 400, "{body}: {v}");
        assert!(msg.contains(why), "{body}: {msg}");
    }
    assert_eq!(ok(vme(&d, &["list", "--format", "json"])).trim(), "[]");

    // A VM with a disk (and, by default, vsock for the agent). No `quiet`: the boot is
    // more output than the 8K console log holds.
    let out = ok(vme(
        &d,
        &[
            "launch",
            "g1",
            "--arch",
            "riscv64",
            "--kernel",
            &k,
            "--initrd",
            &i,
            "--memory",
            "128M",
            "--cmdline",
            "console=ttyS0 panic=-1",
            "--disk",
            &disk,
        ],
    ));
    assert_eq!(out, "g1: running\n");
    // The daemon waits for the agent while the guest boots.
    assert_eq!(
        ok(vme(&d, &["exec", "g1", "--", "uname", "-m"])),
        "riscv64\n"
    );
    assert_eq!(
        ok(vme(&d, &["exec", "g1", "--", "cat", "/sys/block/vda/size"])),
        "2048\n"
    );
    let out = vme(
        &d,
        &[
            "exec",
            "g1",
            "--env",
            "X=41",
            "--",
            "sh",
            "-c",
            "echo out$X; echo err >&2; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        (text(&out.stdout), text(&out.stderr)),
        ("out41\n".into(), "err\n".into())
    );
    // Bytes that are not UTF-8 come through exactly (the CLI asks for base64), and the
    // API's text output replaces them.
    let out = vme(&d, &["exec", "g1", "--", "printf", "\\377\\000a"]);
    assert_eq!(out.stdout, b"\xff\x00a", "{out:?}");
    let (code, v) = http(
        &d,
        "POST",
        "/1.0/vms/g1/exec",
        r#"{"command":["printf","\\377a"]}"#,
    );
    assert_eq!(
        (code, v["metadata"]["stdout"].as_str()),
        (200, Some("\u{fffd}a")),
        "{v}"
    );
    assert_eq!(v["metadata"]["encoding"], "text");
    let (code, v) = http(&d, "POST", "/1.0/vms/g1/exec", r#"{"command":[]}"#);
    assert_eq!(code, 400, "{v}");
    let (code, v) = http(
        &d,
        "POST",
        "/1.0/vms/g1/exec",
        r#"{"command":["sleep","5"],"timeout_secs":1}"#,
    );
    assert_eq!(
        (code, v["metadata"]["status"].as_u64()),
        (200, Some(124)),
        "{v}"
    );

    // The console: keystrokes in, output out, Ctrl-a q out.
    let mut c = Attached::new(&d, "g1");
    c.run_until("echo con''sole-$((6*7))", "console-42");
    let err = c.detach();
    assert!(err.contains("Detached"), "{err}");

    // A daemon killed -9 comes back to a VM whose console and agent still work.
    d.kill9_and_restart();
    let mut c = Attached::new(&d, "g1");
    c.run_until("echo again-$((6*7))", "again-42");
    // A second client takes over; the first is told and let go.
    let mut second = Attached::new(&d, "g1");
    second.run_until("echo second-$((6*7))", "second-42");
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the first client was not let go");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(text(&c.out.lock().unwrap()).contains("another client attached"));
    second.detach();
    assert_eq!(
        ok(vme(&d, &["exec", "g1", "--", "uname", "-m"])),
        "riscv64\n"
    );

    // The log is bounded (two segments within the cap) and ends with the newest output.
    let vm_dir = d.dir.join("state/vms/g1");
    let size = |f: &str| std::fs::metadata(vm_dir.join(f)).map_or(0, |m| m.len());
    assert!(
        size("console.log.1") > 0,
        "the boot output filled a segment"
    );
    assert!(size("console.log") + size("console.log.1") <= 8 << 10);
    let log = ok(vme(&d, &["console", "g1", "--show-log"]));
    assert!(log.contains("second-42"), "{log}");

    // Each VM gets its own CID; --no-vsock gets none.
    ok(vme(
        &d,
        &["create", "g2", "--arch", "riscv64", "--kernel", &k],
    ));
    ok(vme(
        &d,
        &[
            "create",
            "g3",
            "--arch",
            "riscv64",
            "--kernel",
            &k,
            "--no-vsock",
        ],
    ));
    let info = |n: &str| -> Value { serde_json::from_str(&ok(vme(&d, &["info", n]))).unwrap() };
    assert_eq!(info("g1")["spec"]["vsock"]["cid"], 3);
    assert_eq!(info("g2")["spec"]["vsock"]["cid"], 4);
    assert!(info("g3")["spec"]["vsock"].is_null());

    // A stopped VM: exec and attach are refused with its state.
    assert_eq!(ok(vme(&d, &["stop", "--force", "g1"])), "g1: stopped\n");
    let (code, v) = http(&d, "POST", "/1.0/vms/g1/exec", r#"{"command":["true"]}"#);
    assert_eq!(
        (code, v["metadata"]["state"].as_str()),
        (409, Some("stopped")),
        "{v}"
    );
    let out = vme(&d, &["exec", "g1", "--", "true"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("409"),
        "{out:?}"
    );
    let out = vme(&d, &["console", "g1"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is stopped") && err.contains("409"),
        "{err}"
    );
    // Without the upgrade headers, an attach is a 400 that says what to send.
    let (code, v) = http(&d, "GET", "/1.0/vms/g1/console?attach=1", "");
    assert!(
        code == 400 && v["error"].as_str().unwrap().contains("Upgrade"),
        "{v}"
    );
    // The log survives the stop.
    assert!(ok(vme(&d, &["console", "g1", "--show-log"])).contains("second-42"));
    for n in ["g1", "g2", "g3"] {
        ok(vme(&d, &["delete", n]));
    }
}

/// A network namespace of this test's own, deleted when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn a_nic_on_a_tap_reaches_the_guest_with_its_stored_mac() {
    if !Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: no /dev/net/tun on this host");
        return;
    }
    let ns = Netns(format!("vme-guest-{}", std::process::id()));
    let _ = Command::new("ip")
        .args(["netns", "del", &ns.0])
        .stderr(Stdio::null())
        .status();
    let added = Command::new("ip")
        .args(["netns", "add", &ns.0])
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "ip netns add: {}",
        text(&added.stderr)
    );
    // The daemon (and so its monitors and their taps) live in the namespace: no tap ever
    // appears on the host's own network.
    let d = start_under("nic", &["ip", "netns", "exec", &ns.0]);
    let (k, i) = (image("Image"), image("initramfs.cpio"));
    let out = ok(vme(
        &d,
        &[
            "launch",
            "n1",
            "--arch",
            "riscv64",
            "--kernel",
            &k,
            "--initrd",
            &i,
            "--memory",
            "128M",
            "--net",
            "default",
            "--net",
            "tap=vmetest1,mac=52:54:00:12:34:56",
        ],
    ));
    assert_eq!(out, "n1: running\n");
    let info: Value = serde_json::from_str(&ok(vme(&d, &["info", "n1"]))).unwrap();
    let nets = &info["spec"]["nets"];
    assert_eq!(nets[0]["tap"], "vme-n1-0");
    assert_eq!(nets[1]["tap"], "vmetest1");
    let mac0 = nets[0]["mac"].as_str().unwrap().to_string();
    let macs = ok(vme(
        &d,
        &[
            "exec",
            "n1",
            "--",
            "cat",
            "/sys/class/net/eth0/address",
            "/sys/class/net/eth1/address",
        ],
    ));
    assert_eq!(macs, format!("{mac0}\n52:54:00:12:34:56\n"));
    let taps = Command::new("ip")
        .args(["netns", "exec", &ns.0, "ip", "-o", "link"])
        .output()
        .unwrap();
    let taps = text(&taps.stdout);
    assert!(
        taps.contains("vme-n1-0") && taps.contains("vmetest1"),
        "{taps}"
    );
    // Another VM cannot take a tap in use.
    let out = vme(
        &d,
        &[
            "create",
            "n2",
            "--arch",
            "riscv64",
            "--kernel",
            &k,
            "--net",
            "tap=vmetest1",
        ],
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already VM \"n1\"'s"),
        "{err}"
    );
    ok(vme(&d, &["stop", "--force", "n1"]));
    ok(vme(&d, &["delete", "n1"]));
}

/// The local modes of the terminal behind `fd`.
fn lflag(fd: i32) -> libc::tcflag_t {
    // SAFETY: termios is plain data; tcgetattr fills it for a valid terminal descriptor.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is our pty's open slave side and `t` a writable termios.
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
    t.c_lflag
}

/// `vme console` on a pseudo-terminal: raw while attached, restored after a detach and
/// after the console closing under it (the VM stopped).
#[test]
fn the_terminal_goes_raw_and_comes_back() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let d = start("tty");
    let (k, i) = (image("Image"), image("initramfs.cpio"));
    ok(vme(
        &d,
        &[
            "launch", "t1", "--arch", "riscv64", "--kernel", &k, "--initrd", &i, "--memory", "128M",
        ],
    ));
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors into the given ints; name, termios and
    // window size may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty just gave us these descriptors; nothing else owns them.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let cooked = lflag(slave.as_raw_fd());
    assert_ne!(cooked & libc::ICANON, 0);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut reader = std::fs::File::from(master.try_clone().unwrap());
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let mut keys = std::fs::File::from(master.try_clone().unwrap());
    let attach = || {
        let io = || Stdio::from(slave.try_clone().unwrap());
        Command::new(VME)
            .env("VME_SOCKET", &d.socket)
            .args(["console", "t1"])
            .stdin(io())
            .stdout(io())
            .stderr(io())
            .spawn()
            .unwrap()
    };
    let wait = |child: &mut Child| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "vme console did not end");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut child = attach();
    let deadline = Instant::now() + BOOT;
    while !text(&seen.lock().unwrap()).contains("tty-42") {
        assert!(Instant::now() < deadline, "{}", text(&seen.lock().unwrap()));
        keys.write_all(b"echo tty-$((6*7))\r").unwrap();
        std::thread::sleep(Duration::from_secs(2));
    }
    let raw = lflag(slave.as_raw_fd());
    assert_eq!(
        raw & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "raw while attached"
    );
    keys.write_all(b"\x01q").unwrap();
    assert!(wait(&mut child).success());
    assert_eq!(lflag(slave.as_raw_fd()), cooked, "restored after a detach");

    // The console closes under the client: the VM stops.
    let mut child = attach();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lflag(slave.as_raw_fd()) & libc::ICANON != 0 {
        assert!(Instant::now() < deadline, "the terminal never went raw");
        std::thread::sleep(Duration::from_millis(20));
    }
    ok(vme(&d, &["stop", "--force", "t1"]));
    assert!(wait(&mut child).success());
    assert_eq!(
        lflag(slave.as_raw_fd()),
        cooked,
        "restored after the console closed"
    );
    assert!(text(&seen.lock().unwrap()).contains("The console closed"));
    ok(vme(&d, &["delete", "t1"]));
}
