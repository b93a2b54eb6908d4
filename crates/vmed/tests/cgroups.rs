//! Cgroups and accounting with the real daemon and real riscv64 VMs: each monitor runs in its
//! own cgroup v2 with its limits (or, where the host lacks a controller, says so), its usage
//! is sampled into the store and served at /1.0/vms/NAME/usage and /1.0/metrics, and the
//! cgroup is gone once the monitor is.

use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

mod support;
use support::{Vmed, cgroup2_mount as mount, image, request};

/// A daemon sampling every second, with cgroups of its own (or none).
fn start(test: &str, cgroups: bool) -> Vmed {
    Vmed::start(test, cgroups, &["--sample-interval", "1"])
}

impl Vmed {
    /// This daemon's cgroup root.
    fn cg(&self) -> &Path {
        self.cgroups.as_deref().unwrap()
    }

    fn call(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let (code, text) = request(&self.socket, method, path, body);
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        (code, v)
    }

    fn create_and_start(&self, name: &str, extra: Value) -> (u16, Value) {
        let mut body = json!({"name": name, "arch": "riscv64", "kernel": image("Image"),
                              "initrd": image("initramfs.cpio"), "vcpus": 1, "memory": "128M",
                              "cmdline": "console=ttyS0 quiet panic=-1 vme.run=\"while :; do :; done\""});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (code, v) = self.call("POST", "/1.0/vms", &body.to_string());
        assert_eq!(code, 201, "{v}");
        self.call(
            "PUT",
            &format!("/1.0/vms/{name}/state"),
            r#"{"action":"start"}"#,
        )
    }

    fn vm(&self, name: &str) -> Value {
        let (code, v) = self.call("GET", &format!("/1.0/vms/{name}"), "");
        assert_eq!(code, 200, "{v}");
        v["metadata"].clone()
    }

    fn usage(&self, name: &str, query: &str) -> Value {
        let (code, v) = self.call("GET", &format!("/1.0/vms/{name}/usage{query}"), "");
        assert_eq!(code, 200, "{v}");
        v["metadata"].clone()
    }
}

fn controllers(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// CPU seconds the cgroup used over `secs`.
fn cpu_share(dir: &Path, secs: u64) -> f64 {
    let usec = || -> u64 {
        let t = std::fs::read_to_string(dir.join("cpu.stat")).unwrap();
        t.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (a, t0) = (usec(), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    (usec() - a) as f64 / 1e6 / t0.elapsed().as_secs_f64()
}

#[test]
fn each_monitor_runs_in_its_cgroup_with_its_limits() {
    let d = start("limits", true);
    let (code, v) = d.create_and_start("spin", json!({}));
    assert_eq!(code, 200, "{v}");
    let pid = d.vm("spin")["pid"].as_u64().unwrap();
    let group = d.cg().join("vm-spin");
    let rel = group.strip_prefix(mount()).unwrap();
    let line = format!("0::/{}", rel.display());
    let in_it = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        in_it.lines().any(|l| l == line),
        "monitor {pid} is not in {line}: {in_it}"
    );
    let log = d.dir.join("state/vms/spin/monitor.log");
    let offered = controllers(&group);
    let note = std::fs::read_to_string(&log).unwrap();
    // memory.max = 128M of guest + the default 64M allowance for the monitor.
    let memory = (128u64 + 64) << 20;
    if offered.iter().any(|c| c == "memory") {
        let max = std::fs::read_to_string(group.join("memory.max")).unwrap();
        assert_eq!(max.trim(), memory.to_string());
    } else {
        assert!(
            note.contains(&format!("memory.max {memory}")),
            "without a memory controller the monitor's log says memory.max is not enforced: \
             {note}"
        );
    }
    let spinning = if offered.iter().any(|c| c == "cpu") {
        let max = std::fs::read_to_string(group.join("cpu.max")).unwrap();
        assert_eq!(max.trim(), "100000 100000", "the default: its one vCPU");
        Some(cpu_share(&group, 4))
    } else {
        assert!(note.contains("cpu.max 100000 100000"), "{note}");
        None
    };

    // An allowance the host cannot enforce fails the start, saying why; one it can is
    // enforced.
    let (code, v) = d.create_and_start("slow", json!({"cpu_allowance": "20%"}));
    let slow = d.cg().join("vm-slow");
    if offered.iter().any(|c| c == "cpu") {
        assert_eq!(code, 200, "{v}");
        let max = std::fs::read_to_string(slow.join("cpu.max")).unwrap();
        assert_eq!(max.trim(), "20000 100000");
        let limited = cpu_share(&slow, 5);
        assert!(limited <= 0.25, "20% allowance, used {limited}");
        let free = spinning.unwrap();
        assert!(
            free > 0.5,
            "without an allowance the spinner used only {free}"
        );
    } else {
        assert_eq!(code, 500, "{v}");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("no cpu controller") && e.contains("CPU allowance"),
            "{e}"
        );
        assert_eq!(d.vm("slow")["state"], "crashed");
        assert!(!slow.exists(), "a failed start leaves no cgroup");
    }
    assert_eq!(d.vm("slow")["limits"]["cpu_allowance"], 0.2);

    // io.max on a disk of this host: applied where the io controller is offered, else the
    // start fails saying why.
    let disk = std::fs::read_dir("/sys/block")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("dev")).ok())
        .map(|d| d.trim().to_string())
        .next()
        .expect("this host has no block device");
    let (code, v) = d.create_and_start(
        "io",
        json!({"io_max": [{"device": disk, "wbps": "1M", "riops": 100}]}),
    );
    let io = d.cg().join("vm-io");
    if offered.iter().any(|c| c == "io") {
        assert_eq!(code, 200, "{v}");
        let max = std::fs::read_to_string(io.join("io.max")).unwrap();
        assert!(
            max.contains(&format!("{disk} rbps=max wbps=1048576 riops=100 wiops=max")),
            "{max}"
        );
        let (code, v) = d.call(
            "PUT",
            "/1.0/vms/io/state",
            r#"{"action":"stop","force":true}"#,
        );
        assert_eq!(code, 200, "{v}");
    } else {
        assert_eq!(code, 500, "{v}");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("no io controller") && e.contains("io_max"),
            "{e}"
        );
    }
    assert!(!io.exists());
    assert_eq!(d.vm("io")["limits"]["io_max"][0]["device"], disk.as_str());

    // Bad limits are refused at create, with the reason.
    for (extra, why) in [
        (json!({"cpu_allowance": "300%"}), "out of range"),
        (json!({"cpu_allowance": "lots"}), "not understood"),
        (
            json!({"io_max": [{"device": "/proc/self", "rbps": "1M"}]}),
            "not a block device",
        ),
        (json!({"io_max": [{"device": disk}]}), "sets no limit"),
        (
            json!({"io_max": [{"device": disk, "rbsp": 1}]}),
            "unknown field",
        ),
    ] {
        let mut body = json!({"name": "bad", "arch": "riscv64", "kernel": image("Image")});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (code, v) = d.call("POST", "/1.0/vms", &body.to_string());
        assert_eq!(code, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{body}: {v}");
    }

    // Stopped: the cgroup is gone; started again: a fresh one; deleted: gone for good.
    let (code, v) = d.call(
        "PUT",
        "/1.0/vms/spin/state",
        r#"{"action":"stop","force":true}"#,
    );
    assert_eq!(code, 200, "{v}");
    assert!(!group.exists(), "{} outlived its monitor", group.display());
    let (code, v) = d.call("PUT", "/1.0/vms/spin/state", r#"{"action":"start"}"#);
    assert_eq!(code, 200, "{v}");
    assert!(group.exists());
    let (code, v) = d.call(
        "PUT",
        "/1.0/vms/spin/state",
        r#"{"action":"stop","force":true}"#,
    );
    assert_eq!(code, 200, "{v}");
    for name in ["spin", "slow", "io"] {
        let (code, v) = d.call("DELETE", &format!("/1.0/vms/{name}"), "");
        assert_eq!(code, 200, "{v}");
    }
    assert!(!group.exists() && !slow.exists());
}

#[test]
fn usage_is_sampled_stored_and_served() {
    let mut d = start("usage", true);
    let (code, v) = d.create_and_start("acct", json!({}));
    assert_eq!(code, 200, "{v}");

    let cpu = |u: &Value| u["totals"]["cpu_seconds"].as_f64().unwrap();
    let wait_samples = |d: &Vmed, n: u64| -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let u = d.usage("acct", "");
            if u["totals"]["samples"].as_u64().unwrap() >= n {
                return u;
            }
            assert!(Instant::now() < deadline, "no {n} samples in 30 s: {u}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let first = wait_samples(&d, 3);
    let later = {
        let n = first["totals"]["samples"].as_u64().unwrap();
        wait_samples(&d, n + 2)
    };
    assert!(cpu(&first) > 0.0, "{first}");
    assert!(
        cpu(&later) > cpu(&first),
        "CPU seconds do not grow: {later}"
    );
    let latest = &later["latest"];
    assert!(latest["memory_bytes"].as_u64().unwrap() > 0, "{latest}");
    assert!(
        later["rates"]["cpu_percent"].as_f64().unwrap() > 0.0,
        "{later}"
    );

    let (_, metrics) = request(&d.socket, "GET", "/1.0/metrics", "");
    for series in [
        "vme_vm_cpu_seconds_total{vm=\"acct\"} ",
        "vme_vm_memory_used_bytes{vm=\"acct\"} ",
        "vme_vm_disk_read_bytes_total{vm=\"acct\"} ",
        "vme_vm_network_receive_bytes_total{vm=\"acct\"} ",
    ] {
        assert!(metrics.contains(series), "{series} missing from {metrics}");
    }

    // `since` as Unix seconds or RFC 3339; anything else is a 400 that says what to give.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let recent = d.usage("acct", &format!("?since={}", now - 2));
    let n_recent = recent["totals"]["samples"].as_u64().unwrap();
    assert!(
        n_recent >= 1 && n_recent < later["totals"]["samples"].as_u64().unwrap() + 3,
        "{recent}"
    );
    let future = d.usage("acct", "?since=2999-01-01T00:00:00Z");
    assert_eq!(future["totals"]["samples"], 0);
    assert!(future["latest"].is_null());
    let old = d.usage("acct", "?since=2000-01-01T00%3A00%3A00%2B01%3A00");
    assert!(old["totals"]["samples"].as_u64().unwrap() >= 5);
    for q in [
        "?since=yesterday",
        "?since=2026-13-01T00:00:00Z",
        "?until=5",
        "?since=%zz",
    ] {
        let (code, v) = d.call("GET", &format!("/1.0/vms/acct/usage{q}"), "");
        assert_eq!(code, 400, "{q}: {v}");
        assert!(!v["error"].as_str().unwrap().is_empty());
    }
    let (code, _) = d.call("GET", "/1.0/vms/nope/usage", "");
    assert_eq!(code, 404);

    // Samples survive a daemon killed -9; the re-adopted monitor keeps being sampled.
    let before = d.usage("acct", "");
    d.child.kill().unwrap();
    d.launch(None);
    let after = d.usage("acct", "");
    assert!(
        after["totals"]["samples"].as_u64() >= before["totals"]["samples"].as_u64(),
        "samples lost: {before} then {after}"
    );
    let n = after["totals"]["samples"].as_u64().unwrap();
    let grown = wait_samples(&d, n + 2);
    assert!(cpu(&grown) > cpu(&before), "{grown}");

    // The last sample at stop counts the run to its end; the record keeps the samples.
    let (code, v) = d.call(
        "PUT",
        "/1.0/vms/acct/state",
        r#"{"action":"stop","force":true}"#,
    );
    assert_eq!(code, 200, "{v}");
    let stopped = d.usage("acct", "");
    assert!(cpu(&stopped) >= cpu(&grown), "{stopped}");
    assert!(!d.cg().join("vm-acct").exists());
    let (code, v) = d.call("DELETE", "/1.0/vms/acct", "");
    assert_eq!(code, 200, "{v}");
}

#[test]
fn without_cgroups_monitors_run_unconfined_and_are_still_accounted() {
    let d = start("nocg", false);
    let (code, v) = d.create_and_start("free", json!({}));
    assert_eq!(code, 200, "{v}");
    let pid = d.vm("free")["pid"].as_u64().unwrap();
    let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let its = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert_eq!(its, mine, "the monitor left the daemon's cgroups");
    assert!(
        !mount().join("vme.slice/vm-free").exists(),
        "cgroups = false made a cgroup"
    );
    // CPU and memory then come from /proc/PID.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let u = d.usage("free", "");
        if u["totals"]["samples"].as_u64().unwrap() >= 3 {
            assert!(u["totals"]["cpu_seconds"].as_f64().unwrap() > 0.0, "{u}");
            assert!(u["latest"]["memory_bytes"].as_u64().unwrap() > 0, "{u}");
            break;
        }
        assert!(Instant::now() < deadline, "no samples: {u}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, v) = d.call(
        "PUT",
        "/1.0/vms/free/state",
        r#"{"action":"stop","force":true}"#,
    );
    assert_eq!(code, 200, "{v}");
}
