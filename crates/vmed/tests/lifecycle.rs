//! The real daemon, a real riscv64 VM: create, start, pause, resume, stop and delete over the
//! REST API, with the refusals (400, 404, 409) along the way.

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

mod support;
use support::{Vmed, http, image, pids_of};

fn start_vmed(test: &str) -> Vmed {
    Vmed::start(test, true, &[])
}

fn start_vmed_with(test: &str, args: &[&str]) -> Vmed {
    Vmed::start(test, true, args)
}

/// A GET whose reply is text (the metrics).
fn http_text(socket: &Path, path: &str) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: vme\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

fn act(d: &Vmed, name: &str, action: &str) -> (u16, Value) {
    let body = json!({ "action": action }).to_string();
    http(&d.socket, "PUT", &format!("/1.0/vms/{name}/state"), &body)
}

fn state_of(d: &Vmed, name: &str) -> String {
    let (code, v) = http(&d.socket, "GET", &format!("/1.0/vms/{name}"), "");
    assert_eq!(code, 200, "{v}");
    v["metadata"]["state"].as_str().unwrap().to_string()
}

#[test]
fn riscv64_vm_lifecycle_over_the_api() {
    let d = start_vmed("lifecycle");
    let create = |name: &str, extra: Value| {
        let (kernel, initrd) = (image("Image"), image("initramfs.cpio"));
        let mut body = json!({"name": name, "arch": "riscv64", "kernel": kernel,
                              "initrd": initrd, "vcpus": 1, "memory": "128M"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        http(&d.socket, "POST", "/1.0/vms", &body.to_string())
    };

    // Bad input: 400 with a message, and nothing stored.
    let long = "x".repeat(300);
    for (code, v) in [
        http(&d.socket, "POST", "/1.0/vms", "{not json"),
        create("a", json!({"memroy": "1G"})),
        create("a/b", json!({})),
        create("..", json!({})),
        create(&long, json!({})),
        create("a", json!({"memory": "5000G"})),
        create("a", json!({"vcpus": 100000})),
        create("a", json!({"kernel": "relative/Image"})),
    ] {
        assert_eq!(code, 400, "{v}");
        assert!(!v["error"].as_str().unwrap().is_empty(), "{v}");
    }
    let (_, v) = http(&d.socket, "GET", "/1.0/vms", "");
    assert_eq!(
        v["metadata"],
        json!([]),
        "a refused create stored something"
    );

    let (code, v) = create("r1", json!({}));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["metadata"]["state"], "defined");
    let (code, _) = create("r1", json!({}));
    assert_eq!(code, 409, "a second VM with the same name");

    // An illegal transition names the state and what is allowed.
    let (code, v) = act(&d, "r1", "pause");
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["metadata"]["state"], "defined");
    assert_eq!(v["metadata"]["allowed_actions"], json!(["start", "delete"]));
    let (code, v) = act(&d, "r1", "restart");
    assert_eq!(code, 409, "a VM never started cannot be restarted: {v}");
    let (code, v) = act(&d, "nope-either", "restart");
    assert_eq!(code, 404, "{v}");
    let (code, _) = act(&d, "nope", "start");
    assert_eq!(code, 404);
    let (code, v) = http(&d.socket, "PUT", "/1.0/vms/r1/state", r#"{"action":"fly"}"#);
    assert_eq!(code, 400, "{v}");
    let (code, v) = http(
        &d.socket,
        "PUT",
        "/1.0/vms/r1/state",
        r#"{"action":"start","forse":true}"#,
    );
    assert_eq!(code, 400, "an unknown field is refused, not ignored: {v}");
    assert!(v["error"].as_str().unwrap().contains("forse"), "{v}");
    let (code, v) = http(&d.socket, "GET", "/1.0/nothing", "");
    assert_eq!((code, v["type"].as_str()), (404, Some("error")), "{v}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "the API socket's mode");

    let (code, v) = act(&d, "r1", "start");
    assert_eq!(code, 200, "{v}");
    assert_eq!(state_of(&d, "r1"), "running");
    let metrics = http_text(&d.socket, "/1.0/metrics");
    assert!(
        metrics.contains("vme_vms{state=\"running\"} 1"),
        "{metrics}"
    );
    let (code, v) = http(&d.socket, "DELETE", "/1.0/vms/r1", "");
    assert_eq!(code, 409, "a running VM cannot be deleted: {v}");
    assert_eq!(v["metadata"]["state"], "running");

    assert_eq!(act(&d, "r1", "pause").0, 200);
    assert_eq!(state_of(&d, "r1"), "paused");
    let (code, v) = act(&d, "r1", "pause");
    assert_eq!(code, 409, "{v}");
    let (code, v) = act(&d, "nope-either", "restart");
    assert_eq!(code, 404, "{v}");
    assert_eq!(act(&d, "r1", "resume").0, 200);
    assert_eq!(state_of(&d, "r1"), "running");

    let (code, v) = http(
        &d.socket,
        "PUT",
        "/1.0/vms/r1/state",
        r#"{"action":"restart","force":true}"#,
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["metadata"]["state"], "running");
    // A paused VM stops at once (its guest could not answer the power button).
    assert_eq!(act(&d, "r1", "pause").0, 200);
    let (code, v) = act(&d, "r1", "stop");
    assert_eq!(code, 200, "{v}");
    assert_eq!(state_of(&d, "r1"), "stopped");
    assert_eq!(v["metadata"]["reason"], "");

    let (code, v) = http(&d.socket, "DELETE", "/1.0/vms/r1", "");
    assert_eq!(code, 200, "{v}");
    let (code, _) = http(&d.socket, "GET", "/1.0/vms/r1", "");
    assert_eq!(code, 404);
    assert!(
        !d.dir.join("state/vms/r1").exists(),
        "the VM's files remain"
    );
}

fn pid_of(needle: &str) -> i32 {
    match pids_of(needle)[..] {
        [pid] => pid,
        ref v => panic!("{} processes mention {needle}", v.len()),
    }
}

#[test]
fn a_killed_monitor_is_recorded_as_crashed() {
    let d = start_vmed("crash");
    let body = json!({"name": "c1", "arch": "riscv64", "kernel": image("Image"),
                      "initrd": image("initramfs.cpio"), "memory": "128M"});
    assert_eq!(
        http(&d.socket, "POST", "/1.0/vms", &body.to_string()).0,
        201
    );
    assert_eq!(act(&d, "c1", "start").0, 200);
    let machine = d.dir.join("state/vms/c1/machine.toml");
    let pid = pid_of(machine.to_str().unwrap());
    // SAFETY: kill(2) with plain integers; the pid is the VM's monitor found just above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(&d, "c1") != "crashed" {
        assert!(Instant::now() < deadline, "the crash was not noticed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, v) = http(&d.socket, "GET", "/1.0/vms/c1", "");
    let reason = v["metadata"]["reason"].as_str().unwrap();
    assert!(reason.contains("killed by signal 9"), "{reason}");
    // A crashed VM starts again.
    assert_eq!(act(&d, "c1", "start").0, 200);
    let (code, v) = http(
        &d.socket,
        "PUT",
        "/1.0/vms/c1/state",
        r#"{"action":"stop","force":true}"#,
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(state_of(&d, "c1"), "stopped");
}

#[test]
fn a_monitor_that_cannot_boot_leaves_the_vm_crashed_with_its_reason() {
    let d = start_vmed("badkernel");
    // A file that is no riscv64 Image: the monitor refuses it and exits.
    let bogus = d.dir.join("not-an-image");
    std::fs::write(&bogus, b"this is not a kernel").unwrap();
    let body = json!({"name": "b1", "arch": "riscv64", "kernel": bogus, "memory": "128M"});
    assert_eq!(
        http(&d.socket, "POST", "/1.0/vms", &body.to_string()).0,
        201
    );
    // The monitor may refuse the kernel before its control socket answers (the start then
    // fails with the reason) or just after (the start succeeds and the crash follows at
    // once): both end crashed, with the monitor's exit status as the reason.
    let (code, v) = act(&d, "b1", "start");
    if code == 500 {
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains("failed to start"), "{msg}");
    } else {
        assert_eq!(code, 200, "{v}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while state_of(&d, "b1") != "crashed" {
            assert!(Instant::now() < deadline, "the failed boot was not noticed");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(state_of(&d, "b1"), "crashed");
    let (_, v) = http(&d.socket, "GET", "/1.0/vms/b1", "");
    let reason = v["metadata"]["reason"].as_str().unwrap();
    assert!(reason.contains("exited with status"), "{reason}");
    assert_eq!(http(&d.socket, "DELETE", "/1.0/vms/b1", "").0, 200);
}

#[test]
fn a_killed_daemon_takes_down_no_vm() {
    let mut d = start_vmed("kill9");
    for n in ["k1", "k2", "k3"] {
        let body = json!({"name": n, "arch": "riscv64", "kernel": image("Image"),
                          "initrd": image("initramfs.cpio"), "memory": "128M"});
        assert_eq!(
            http(&d.socket, "POST", "/1.0/vms", &body.to_string()).0,
            201
        );
        assert_eq!(act(&d, n, "start").0, 200);
    }
    assert_eq!(act(&d, "k2", "pause").0, 200);
    let pid = |d: &Vmed, n: &str| {
        let (_, v) = http(&d.socket, "GET", &format!("/1.0/vms/{n}"), "");
        v["metadata"]["pid"].as_i64().unwrap() as i32
    };
    let (p1, p3) = (pid(&d, "k1"), pid(&d, "k3"));
    assert!(p1 > 0 && p3 > 0);
    // Each monitor leads its own session: no signal for the daemon's terminal reaches it,
    // and the scheduler weighs it apart from the daemon's session.
    for p in [p1, p3] {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap();
        // Fields after the command's closing parenthesis: state ppid pgrp session ...
        let after: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        assert_eq!(
            after[3],
            p.to_string(),
            "monitor {p} is not a session leader: {stat}"
        );
    }

    d.kill9_and_restart();
    assert_eq!(state_of(&d, "k1"), "running");
    assert_eq!(state_of(&d, "k2"), "paused");
    assert_eq!(pid(&d, "k1"), p1, "k1 was re-adopted, not restarted");

    // A monitor that dies while no daemon watches is found crashed, with the reason.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    // SAFETY: kill(2) with plain integers, on k3's monitor.
    assert_eq!(unsafe { libc::kill(p3, libc::SIGKILL) }, 0);
    while std::path::Path::new(&format!("/proc/{p3}/cmdline")).exists()
        && !std::fs::read(format!("/proc/{p3}/cmdline"))
            .unwrap_or_default()
            .is_empty()
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    d.launch(None);
    assert_eq!(state_of(&d, "k3"), "crashed");
    let (_, v) = http(&d.socket, "GET", "/1.0/vms/k3", "");
    let reason = v["metadata"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("vmed restarted while the VM was running") && reason.contains("gone"),
        "{reason}"
    );

    // The adopted monitors answer and stop as before; the adopted monitor's exit is noticed.
    assert_eq!(act(&d, "k2", "resume").0, 200);
    assert_eq!(act(&d, "k1", "pause").0, 200);
    for n in ["k1", "k2"] {
        let (code, v) = act(&d, n, "stop");
        assert_eq!(code, 200, "{v}");
        assert_eq!(state_of(&d, n), "stopped");
        assert_eq!(pid(&d, n), 0);
    }
}

/// Twenty VMs created and started at once all reach `running` and stop cleanly; two starts
/// of the same VM at once never both proceed.
#[test]
fn concurrent_vms() {
    const N: usize = 20;
    // Room for them on any host: admission is tested on its own.
    let d = start_vmed_with("concurrent", &["--cpu-overcommit", "100"]);
    let socket = d.socket.clone();
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let name = format!("c{i}");
                let body = json!({"name": name, "arch": "riscv64", "kernel": image("Image"),
                                  "initrd": image("initramfs.cpio"), "memory": "128M"});
                let (code, v) = http(&socket, "POST", "/1.0/vms", &body.to_string());
                assert_eq!(code, 201, "{v}");
                let path = format!("/1.0/vms/{name}/state");
                http(&socket, "PUT", &path, r#"{"action":"start"}"#)
            })
        })
        .collect();
    for t in threads {
        let (code, v) = t.join().unwrap();
        assert_eq!(code, 200, "{v}");
    }
    let (_, v) = http(&d.socket, "GET", "/1.0/vms", "");
    let states: Vec<_> = v["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, vec!["running"; N]);

    // Two stops of one VM at once: one does it, the other is refused (busy or stopped).
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                http(
                    &socket,
                    "PUT",
                    "/1.0/vms/c0/state",
                    r#"{"action":"stop","force":true}"#,
                )
                .0
            })
        })
        .collect();
    let mut codes: Vec<u16> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    codes.sort();
    assert_eq!(codes, [200, 409]);

    let stops: Vec<_> = (1..N)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let path = format!("/1.0/vms/c{i}/state");
                http(&socket, "PUT", &path, r#"{"action":"stop","force":true}"#).0
            })
        })
        .collect();
    for t in stops {
        assert_eq!(t.join().unwrap(), 200);
    }
    for i in 0..N {
        assert_eq!(state_of(&d, &format!("c{i}")), "stopped");
    }
}

/// With room for one vCPU, a larger VM is refused at create and a second VM at start, each
/// with the numbers; nothing is stored or changed by a refusal.
#[test]
fn admission_names_the_numbers() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    // Through a config file, to test that path too.
    let config =
        std::env::temp_dir().join(format!("vmed-test-{}-admission.toml", std::process::id()));
    std::fs::write(&config, format!("cpu_overcommit = {}\n", 1.5 / cpus as f64)).unwrap();
    let d = start_vmed_with("admission", &["--config", &config.display().to_string()]);
    std::fs::remove_file(&config).unwrap();
    let create = |name: &str, vcpus: u32| {
        let body = json!({"name": name, "arch": "riscv64", "kernel": image("Image"),
                          "initrd": image("initramfs.cpio"), "memory": "128M", "vcpus": vcpus});
        http(&d.socket, "POST", "/1.0/vms", &body.to_string())
    };
    let (code, v) = create("big", 2);
    assert_eq!(code, 400, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("2 vCPUs") && msg.contains("= 1 vCPUs"),
        "{msg}"
    );
    assert_eq!(http(&d.socket, "GET", "/1.0/vms/big", "").0, 404);

    assert_eq!(create("a1", 1).0, 201);
    assert_eq!(create("a2", 1).0, 201);
    assert_eq!(act(&d, "a1", "start").0, 200);
    let (code, v) = act(&d, "a2", "start");
    assert_eq!(code, 409, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("running VMs have 1") && msg.contains("stop another VM"),
        "{msg}"
    );
    assert_eq!(state_of(&d, "a2"), "defined");

    let force = r#"{"action":"stop","force":true}"#;
    assert_eq!(http(&d.socket, "PUT", "/1.0/vms/a1/state", force).0, 200);
    assert_eq!(act(&d, "a2", "start").0, 200);
    assert_eq!(http(&d.socket, "PUT", "/1.0/vms/a2/state", force).0, 200);
}

/// `on-failure`: a killed monitor is started again (after the backoff); a stop the user
/// asked for is not undone.
#[test]
fn on_failure_restarts_a_crashed_vm() {
    let d = start_vmed("restart");
    let body = json!({"name": "p1", "arch": "riscv64", "kernel": image("Image"),
                      "initrd": image("initramfs.cpio"), "memory": "128M",
                      "restart_policy": "on-failure"});
    let (code, v) = http(&d.socket, "POST", "/1.0/vms", &body.to_string());
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["metadata"]["restart_policy"], "on-failure");
    let (code, v) = http(
        &d.socket,
        "POST",
        "/1.0/vms",
        &json!({"name": "p2", "kernel": image("Image"), "restart_policy": "sometimes"}).to_string(),
    );
    assert_eq!(code, 400, "{v}");

    assert_eq!(act(&d, "p1", "start").0, 200);
    let pid = |d: &Vmed| {
        let (_, v) = http(&d.socket, "GET", "/1.0/vms/p1", "");
        v["metadata"]["pid"].as_i64().unwrap() as i32
    };
    let first = pid(&d);
    // SAFETY: kill(2) with plain integers, on p1's monitor.
    assert_eq!(unsafe { libc::kill(first, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(state_of(&d, "p1") == "running" && pid(&d) != first && pid(&d) != 0) {
        assert!(
            Instant::now() < deadline,
            "p1 was not restarted: {}",
            state_of(&d, "p1")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The restart's operation may still be finishing (the VM is busy for a moment after it
    // reads running): a stop then gets the documented 409 "retry".
    let mut stopped = act(&d, "p1", "stop");
    for _ in 0..20 {
        if !stopped.1.to_string().contains("already in progress") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        stopped = act(&d, "p1", "stop");
    }
    assert_eq!(stopped.0, 200, "{}", stopped.1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(state_of(&d, "p1"), "stopped", "a stop asked for was undone");
}

/// A request to a daemon that may die while serving it: the status, or None when the
/// connection ended without a reply.
fn http_or_eof(socket: &Path, method: &str, path: &str, body: &str) -> Option<u16> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: vme\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    reply.split(' ').nth(1)?.parse().ok()
}

fn wait_state(d: &Vmed, name: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while state_of(d, name) != want {
        assert!(
            Instant::now() < deadline,
            "{name} is {} after 30 s, not {want}",
            state_of(d, name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon dies (SIGKILL, no cleanup) at each crash point of create, start, stop and
/// delete in turn. After each restart the half-done operation is settled one way or the
/// other with a reason, no record is lost or doubled, no monitor is left unaccounted for,
/// and a VM that ran all along was never touched.
#[test]
fn a_daemon_killed_at_any_point_leaves_every_vm_explained() {
    let mut d = start_vmed_with("crash-points", &["--cpu-overcommit", "100"]);
    let create = |d: &Vmed, name: &str| {
        let body = json!({"name": name, "arch": "riscv64", "kernel": image("Image"),
                          "initrd": image("initramfs.cpio"), "memory": "64M"});
        http_or_eof(&d.socket, "POST", "/1.0/vms", &body.to_string())
    };
    let pid = |d: &Vmed, n: &str| {
        let (_, v) = http(&d.socket, "GET", &format!("/1.0/vms/{n}"), "");
        v["metadata"]["pid"].as_i64().unwrap() as i32
    };
    let force_stop = r#"{"action":"stop","force":true}"#;
    assert_eq!(create(&d, "keep"), Some(201));
    assert_eq!(act(&d, "keep", "start").0, 200);
    let keep = pid(&d, "keep");
    let (uptime_before, since) = (guest_uptime(&d, "keep"), Instant::now());

    // Every point the daemon has: one added there is tested here, or this test fails on
    // the expectations below. The image import's points hold no VM: tests/images.rs has them.
    let points = vmed::crashpoint::POINTS
        .iter()
        .filter(|p| !p.starts_with("image-import:"));
    for (i, point) in points.enumerate() {
        let vm = format!("p{i}");
        let state = format!("/1.0/vms/{vm}/state");
        d.child.kill().unwrap();
        d.child.wait().unwrap();
        d.launch(Some(point));
        if !point.starts_with("create") {
            assert_eq!(create(&d, &vm), Some(201), "{point}");
        }
        if point.starts_with("stop") {
            assert_eq!(act(&d, &vm, "start").0, 200, "{point}");
        }
        let reply = match point.split(':').next().unwrap() {
            "create" => create(&d, &vm),
            "start" => http_or_eof(&d.socket, "PUT", &state, r#"{"action":"start"}"#),
            "stop" => http_or_eof(&d.socket, "PUT", &state, force_stop),
            "delete" => http_or_eof(&d.socket, "DELETE", &format!("/1.0/vms/{vm}"), ""),
            _ => panic!("crash point {point} is in no known operation: teach this test"),
        };
        assert_eq!(reply, None, "{point}: the daemon answered instead of dying");
        let died = d.child.wait().unwrap();
        assert!(!died.success(), "{point}: {died}");
        d.launch(None);

        let (_, v) = http(&d.socket, "GET", &format!("/1.0/vms/{vm}"), "");
        let (now, reason) = (&v["metadata"]["state"], &v["metadata"]["reason"]);
        match *point {
            "create:after-insert" | "delete:after-remove-files" => {
                assert_eq!(now, "defined", "{point}: {v}")
            }
            "start:after-transition" => {
                assert_eq!(now, "stopped", "{point}: {v}");
                assert!(reason.as_str().unwrap().contains("nothing ran"), "{v}");
                assert!(d.monitors_of(&vm).is_empty(), "{point}");
            }
            p if p.starts_with("start") => {
                assert_eq!(now, "running", "{point}: {v}");
                assert_eq!(d.monitors_of(&vm), [pid(&d, &vm)], "{point}");
            }
            p if p.starts_with("stop") => {
                wait_state(&d, &vm, "stopped");
                assert!(d.monitors_of(&vm).is_empty(), "{point}");
            }
            p => panic!("no expectation for crash point {p}: teach this test"),
        }
        // Every record once, the one that ran all along untouched.
        let (_, all) = http(&d.socket, "GET", "/1.0/vms", "");
        let mut names: Vec<_> = all["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        let mut want: Vec<_> = (0..=i).map(|j| format!("p{j}")).collect();
        want.push("keep".into());
        want.sort();
        assert_eq!(names, want, "{point}");
        assert_eq!(state_of(&d, "keep"), "running", "{point}");
        assert_eq!(pid(&d, "keep"), keep, "{point}: keep was restarted");
        assert_eq!(d.monitors_of("keep"), [keep], "{point}");

        // Settled means usable: the VM can be driven to stopped and deleted again.
        if state_of(&d, &vm) == "running" {
            assert_eq!(http(&d.socket, "PUT", &state, force_stop).0, 200, "{point}");
        }
        if *point == "delete:after-remove-files" {
            assert_eq!(
                http(&d.socket, "DELETE", &format!("/1.0/vms/{vm}"), "").0,
                200
            );
            assert_eq!(http(&d.socket, "GET", &format!("/1.0/vms/{vm}"), "").0, 404);
        }
    }
    // The guest itself saw no break: its agent answers and its uptime went on, unreset.
    let (uptime_after, elapsed) = (guest_uptime(&d, "keep"), since.elapsed().as_secs_f64());
    assert!(
        uptime_after - uptime_before >= elapsed * 0.5,
        "keep's guest uptime went from {uptime_before} s to {uptime_after} s in {elapsed:.1} s \
         of daemon restarts: it was rebooted or stalled"
    );
    assert_eq!(
        http(&d.socket, "PUT", "/1.0/vms/keep/state", force_stop).0,
        200
    );
}

/// The guest's own uptime in seconds (`/proc/uptime`, through its agent), once the agent
/// answers.
fn guest_uptime(d: &Vmed, vm: &str) -> f64 {
    let path = format!("/1.0/vms/{vm}/exec");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, v) = http(
            &d.socket,
            "POST",
            &path,
            r#"{"command":["cat","/proc/uptime"]}"#,
        );
        let seconds = v["metadata"]["stdout"]
            .as_str()
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok());
        match seconds {
            Some(s) if code == 200 => return s,
            _ => assert!(
                Instant::now() < deadline,
                "{vm}'s agent did not report its uptime within 30 s: {code} {v}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
