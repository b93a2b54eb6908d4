//! `vme` against the real daemon: the verbs a user types, their output and their errors.

use serde_json::Value;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod cli_support;
use cli_support::{VME, fails, ok, vme};

#[path = "../../vmed/tests/support/mod.rs"]
mod support;
use support::{Vmed, image};

#[test]
fn the_cli_drives_a_riscv64_vm() {
    let vmed = Vmed::start("drive", true, &["--sample-interval", "1"]);
    let socket = vmed.socket.clone();
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
            .eq(["t1", "default", "running", "riscv64", "1", "128M"])),
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

/// A daemon of its own for a test, on a fresh state dir; its socket.
fn daemon(test: &str) -> (Vmed, PathBuf) {
    let vmed = Vmed::start(test, true, &[]);
    let socket = vmed.socket.clone();
    (vmed, socket)
}

/// `vme events` running, killed when dropped; its events (JSON lines) come on `rx`.
struct Events {
    child: Child,
    rx: mpsc::Receiver<Value>,
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Events {
    fn spawn(socket: &Path) -> Events {
        let mut child = Command::new(VME)
            .env("VME_SOCKET", socket)
            .args(["events", "--format", "json"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { return };
                let e = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("`vme events --format json` printed {line:?}: {e}"));
                if tx.send(e).is_err() {
                    return;
                }
            }
        });
        Events { child, rx }
    }

    /// Events until `done` says enough, or None after `within`.
    fn until(&self, within: Duration, done: impl Fn(&[Value]) -> bool) -> Option<Vec<Value>> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        while !done(&got) {
            let left = deadline.checked_duration_since(Instant::now())?;
            got.push(self.rx.recv_timeout(left).ok()?);
        }
        Some(got)
    }
}

/// Whether `events` has a lifecycle event of `vm` from `from` to `to` made by `action`.
fn has_change(events: &[Value], vm: &str, from: &str, to: &str, action: &str) -> bool {
    events.iter().any(|e| {
        let m = &e["metadata"];
        e["type"] == "lifecycle"
            && m["vm"] == vm
            && m["from"].as_str().unwrap_or("-") == from
            && m["to"] == to
            && m["action"] == action
    })
}

#[test]
fn events_operations_formats_and_completions() {
    // Completion scripts need no daemon.
    let none = Path::new("/nonexistent/vme.sock");
    let bash = ok(vme(none, &["completion", "bash"]));
    assert!(
        bash.contains("complete") && bash.contains("operation") && bash.contains("--format"),
        "{bash}"
    );
    for shell in ["zsh", "fish"] {
        assert!(
            !ok(vme(none, &["completion", shell])).trim().is_empty(),
            "{shell}"
        );
    }
    // `vme daemon` is vmed, its options passed as they are.
    let version = ok(vme(none, &["daemon", "--version"]));
    assert!(version.starts_with("vmed "), "{version}");
    let help = ok(vme(none, &["daemon", "--help"]));
    assert!(help.contains("--state-dir"), "{help}");
    let err = fails(vme(none, &["events"]));
    assert!(
        err.contains("cannot reach vmed") && err.contains("VME_SOCKET"),
        "{err}"
    );

    let (_vmed, socket) = daemon("ops");
    let s = socket.as_path();
    let (k, i) = (image("Image"), image("initramfs.cpio"));
    let create = [
        "create",
        "e1",
        "--arch",
        "riscv64",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        i.to_str().unwrap(),
        "--memory",
        "128M",
    ];

    // `vme events` subscribes a moment after it starts: create the VM until its creation
    // is seen, so nothing later can be missed.
    let events = Events::spawn(s);
    let mut tries = 0;
    loop {
        ok(vme(s, &create));
        let seen = events.until(Duration::from_secs(2), |got| {
            has_change(got, "e1", "-", "defined", "create")
        });
        if seen.is_some() {
            break;
        }
        tries += 1;
        assert!(tries < 10, "`vme events` never showed a VM's creation");
        ok(vme(s, &["rm", "e1"]));
    }

    // A start is an async operation the CLI waits on; its events come through.
    assert_eq!(ok(vme(s, &["start", "e1"])), "e1: running\n");
    let seen = events
        .until(Duration::from_secs(30), |got| {
            has_change(got, "e1", "starting", "running", "start")
                && got.iter().any(|e| {
                    e["type"] == "operation"
                        && e["metadata"]["description"] == "Starting VM e1"
                        && e["metadata"]["status"] == "Success"
                })
        })
        .expect("no lifecycle and operation events of the start");
    assert!(
        has_change(&seen, "e1", "defined", "starting", "start"),
        "{seen:#?}"
    );

    // The operation is listed; show and wait find it ended well.
    let table = ok(vme(s, &["operation", "list"]));
    assert!(
        table.lines().next().unwrap().starts_with("ID")
            && table
                .lines()
                .any(|l| l.contains("Starting VM e1") && l.contains("Success")),
        "{table}"
    );
    let ops: Value =
        serde_json::from_str(&ok(vme(s, &["operation", "list", "--format", "json"]))).unwrap();
    let start = ops
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["description"] == "Starting VM e1")
        .unwrap();
    let id = start["id"].as_str().unwrap();
    let shown: Value = serde_json::from_str(&ok(vme(s, &["operation", "show", id]))).unwrap();
    assert_eq!(shown["status"], "Success");
    assert_eq!(shown["resources"]["vms"][0], "/1.0/vms/e1");
    let waited: Value =
        serde_norway::from_str(&ok(vme(s, &["op", "wait", id, "--format", "yaml"]))).unwrap();
    assert_eq!(waited, shown);
    let err = fails(vme(s, &["operation", "wait", "0000-bad"]));
    assert!(
        err.contains("no operation") && err.contains("/1.0/operations"),
        "{err}"
    );
    let err = fails(vme(s, &["operation", "show", "../vms"]));
    assert!(err.contains("vme operation list"), "{err}");

    // Every listing in json and yaml says the same.
    for args in [&["list"][..], &["info", "e1"], &["operation", "list"]] {
        let json_out = ok(vme(s, &[args, &["--format", "json"]].concat()));
        let yaml_out = ok(vme(s, &[args, &["--format", "yaml"]].concat()));
        let j: Value = serde_json::from_str(&json_out).unwrap();
        let y: Value = serde_norway::from_str(&yaml_out).unwrap();
        // The VM's and operations' records do not change between the two calls.
        assert_eq!(j, y, "{args:?}");
    }
    let info = ok(vme(s, &["info", "e1", "--format", "table"]));
    assert!(
        info.lines()
            .any(|l| l.split_whitespace().eq(["state:", "running"])),
        "{info}"
    );
    assert!(info.lines().any(|l| l.starts_with("spec.arch:")), "{info}");

    // A stop: its events too, in the table format of a second reader.
    assert_eq!(ok(vme(s, &["stop", "--force", "e1"])), "e1: stopped\n");
    events
        .until(Duration::from_secs(30), |got| {
            has_change(got, "e1", "stopping", "stopped", "stop")
        })
        .expect("no lifecycle event of the stop");
    let err = fails(vme(s, &["events", "--type", "bogus"]));
    assert!(err.contains("lifecycle"), "{err}");
    assert_eq!(ok(vme(s, &["rm", "e1"])), "e1: deleted\n");
}
