//! The daemon's monitors are jailed, each VM as its own uid/gid, under strict seccomp; the
//! uids stay unique across a restart of the daemon (which re-adopts the running monitors);
//! and a monitor ended by its seccomp filter is reported as a security event (the VM's
//! reason and the event stream). Real daemon, real riscv64 VMs.

mod support;

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{Vmed, image};

fn create_and_start(d: &Vmed, name: &str) {
    let body = json!({"name": name, "arch": "riscv64", "kernel": image("Image"),
                      "initrd": image("initramfs.cpio"), "memory": "128M"});
    let (code, v) = d.http("POST", "/1.0/vms", &body.to_string());
    assert_eq!(code, 201, "{v}");
    let (code, v) = d.http(
        "PUT",
        &format!("/1.0/vms/{name}/state"),
        r#"{"action":"start"}"#,
    );
    assert_eq!(code, 200, "{v}");
}

fn state(d: &Vmed, name: &str) -> Value {
    d.http("GET", &format!("/1.0/vms/{name}"), "").1["metadata"].clone()
}

/// The process that runs VM `name`: the jailed child of its (only) monitor.
fn jailed(d: &Vmed, name: &str) -> u32 {
    let keeper = match d.monitors_of(name)[..] {
        [pid] => pid,
        ref v => panic!("{} processes name VM {name}'s machine file", v.len()),
    };
    let children =
        std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).unwrap();
    children
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("VM {name}'s monitor {keeper} is not jailed"))
        .parse()
        .unwrap()
}

fn field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn uid(pid: u32) -> u32 {
    field(pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn every_monitor_is_jailed_as_its_own_uid_and_stays_so_across_a_daemon_restart() {
    let mut d = Vmed::start("isolation", false, &["--jail-uid-range", "1000500-1000502"]);
    create_and_start(&d, "i1");
    create_and_start(&d, "i2");
    let (p1, p2) = (jailed(&d, "i1"), jailed(&d, "i2"));
    let (u1, u2) = (uid(p1), uid(p2));
    assert_ne!(u1, u2, "two VMs share a uid");
    for (pid, u) in [(p1, u1), (p2, u2)] {
        assert!((1_000_500..=1_000_502).contains(&u), "{u}");
        assert_eq!(field(pid, "CapEff"), "0000000000000000");
        assert_eq!(field(pid, "CapBnd"), "0000000000000000");
        assert_eq!(field(pid, "NoNewPrivs"), "1");
        // The main thread installs its filter once the machine is built, just after the
        // control socket answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        while field(pid, "Seccomp") != "2" {
            assert!(
                Instant::now() < deadline,
                "VM's monitor {pid} is not filtered"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let ns = |p: String| std::fs::read_link(p).unwrap();
        assert_ne!(
            ns(format!("/proc/{pid}/ns/mnt")),
            ns("/proc/self/ns/mnt".into())
        );
    }
    // The VM's directory is shared into its jail: root's, its group's, sticky.
    let vm_dir = d.dir.join("state/vms/i1");
    let meta = std::fs::metadata(&vm_dir).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (0, u1, 0o1770)
    );
    let files: Vec<String> = std::fs::read_dir(format!("/proc/{p1}/root{}", vm_dir.display()))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.contains(&"control.sock".to_string()), "{files:?}");
    assert!(
        !Path::new(&format!(
            "/proc/{p1}/root{}",
            d.dir.join("state/vms/i2").display()
        ))
        .exists(),
        "VM i1's jail shows VM i2's directory"
    );

    // A restarted daemon re-adopts both and keeps their uids; a third VM gets the last.
    d.kill9_and_restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&d, "i1")["state"] != "running" || state(&d, "i2")["state"] != "running" {
        assert!(
            Instant::now() < deadline,
            "not re-adopted: {}",
            state(&d, "i1")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!((jailed(&d, "i1"), jailed(&d, "i2")), (p1, p2));
    create_and_start(&d, "i3");
    let u3 = uid(jailed(&d, "i3"));
    assert!(u3 != u1 && u3 != u2, "{u3}");
    // The range is full: a fourth VM cannot start, and says why.
    let body = json!({"name": "i4", "arch": "riscv64", "kernel": image("Image"),
                      "initrd": image("initramfs.cpio"), "memory": "128M"});
    assert_eq!(d.http("POST", "/1.0/vms", &body.to_string()).0, 201);
    let (code, v) = d.http("PUT", "/1.0/vms/i4/state", r#"{"action":"start"}"#);
    assert_ne!(code, 200);
    assert!(v.to_string().contains("jail_uid_range"), "{v}");
    for vm in ["i1", "i2", "i3"] {
        let (code, v) = d.http(
            "PUT",
            &format!("/1.0/vms/{vm}/state"),
            r#"{"action":"stop","force":true}"#,
        );
        assert_eq!(code, 200, "{v}");
    }
}

/// The monitor built with the test-only drill hooks (`make test` builds it apart).
fn drill_vmm() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let p = target.join("drill/release/vme-vmm");
    assert!(
        p.is_file(),
        "{} is missing: CARGO_TARGET_DIR=target/drill cargo build --release -p vme-vmm \
         --features seccomp-drill",
        p.display()
    );
    p
}

#[test]
#[cfg_attr(
    not(feature = "seccomp-drill"),
    ignore = "needs --features seccomp-drill and the drill monitor"
)]
fn a_monitor_ended_by_its_seccomp_filter_is_a_security_event() {
    let vmm = drill_vmm();
    let d = Vmed::start("security", false, &["--vmm", vmm.to_str().unwrap()]);
    // Subscribed before the escape, so the event cannot be missed.
    let mut events = support::send(&d.socket, "GET", "/1.0/events?type=security", "");
    events
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    create_and_start(&d, "s1");
    // The guest "escapes" into the monitor and makes it exec a shell.
    let ctl = d.dir.join("state/vms/s1/control.sock");
    let mut s = UnixStream::connect(&ctl).unwrap();
    s.write_all(b"{\"drill\":\"exec\"}\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&d, "s1")["state"] != "crashed" {
        assert!(Instant::now() < deadline, "{}", state(&d, "s1"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let reason = state(&d, "s1")["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("SECURITY EVENT") && reason.contains("forbidden syscall 59 (execve)"),
        "{reason}"
    );
    let mut line = String::new();
    let mut r = BufReader::new(&mut events);
    while !line.contains("\"type\":\"security\"") {
        line.clear();
        r.read_line(&mut line).expect("a security event");
        assert!(!line.is_empty(), "the event stream ended");
    }
    assert!(
        line.contains("\"vm\":\"s1\"") && line.contains("seccomp"),
        "{line}"
    );
    drop(r);
    drop(events);

    // A monitor adopted by a restarted daemon (its exit status goes elsewhere): its log.
    let mut d = d;
    create_and_start(&d, "s2");
    d.kill9_and_restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&d, "s2")["state"] != "running" {
        assert!(Instant::now() < deadline, "{}", state(&d, "s2"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let ctl = d.dir.join("state/vms/s2/control.sock");
    let mut s = UnixStream::connect(&ctl).unwrap();
    s.write_all(b"{\"drill\":\"exec\"}\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&d, "s2")["state"] != "crashed" {
        assert!(Instant::now() < deadline, "{}", state(&d, "s2"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let reason = state(&d, "s2")["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("SECURITY EVENT"), "{reason}");

    // Both are in the audit log as security records, and the chain holds.
    let (code, v) = support::http(&d.socket, "GET", "/1.0/audit?kind=security", "");
    assert_eq!(code, 200, "{v}");
    let objects: Vec<_> = v["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["action"].clone(), r["object"].clone()))
        .collect();
    assert_eq!(
        objects,
        [
            (json!("monitor.seccomp-kill"), json!("vm/default/s1")),
            (json!("monitor.seccomp-kill"), json!("vm/default/s2"))
        ],
        "{v}"
    );
    let (_, v) = support::http(&d.socket, "GET", "/1.0/audit/verify", "");
    assert_eq!(v["metadata"]["ok"], json!(true), "{v}");
}
