//! Cgroups and accounting with the real daemon and real riscv64 VMs: each monitor runs in its
//! own cgroups with its limits, each controller in cgroup v2 where the host offers it there,
//! else in its cgroup v1 hierarchy (or, with neither, says so); a CPU allowance holds a
//! spinning guest to it, a monitor over its memory limit is OOM-killed and reported so; its
//! usage is sampled into the store and served at /1.0/vms/NAME/usage and /1.0/metrics, and
//! the cgroups are gone once the monitor is.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
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

/// Where a controller's limits went for a VM: its cgroup v2 directory, or its directory in
/// the cgroup v1 hierarchy that carries the controller (a hybrid host), or nowhere.
#[derive(Debug, PartialEq)]
enum At {
    V2(PathBuf),
    V1(PathBuf),
    Nowhere,
}

/// The cgroup v1 hierarchies: (mount, controllers).
fn v1_hierarchies() -> Vec<(PathBuf, Vec<String>)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut post = post.split(' ');
            (post.next()? == "cgroup").then_some(())?;
            let opts = post.nth(1)?.split(',').map(String::from).collect();
            Some((PathBuf::from(pre.split(' ').nth(4)?), opts))
        })
        .collect()
}

impl Vmed {
    /// VM `vm`'s cgroup v2 directory.
    fn group(&self, vm: &str) -> PathBuf {
        self.cg().join(format!("vm-{vm}"))
    }

    /// Where controller `v2`/`v1` (its names in each version) applies to VM `vm`.
    fn at(&self, vm: &str, v2: &str, v1: &str) -> At {
        let group = self.group(vm);
        if controllers(&group).iter().any(|c| c == v2) {
            return At::V2(group);
        }
        let rel = group.strip_prefix(mount()).unwrap();
        match v1_hierarchies()
            .into_iter()
            .find(|(_, c)| c.iter().any(|c| c == v1))
        {
            Some((m, _)) => At::V1(m.join(rel)),
            None => At::Nowhere,
        }
    }

    /// Every cgroup directory VM `vm` has or may have (v2 and each v1 hierarchy).
    fn all_groups(&self, vm: &str) -> Vec<PathBuf> {
        let group = self.group(vm);
        let rel = group.strip_prefix(mount()).unwrap().to_path_buf();
        let mut all = vec![group];
        all.extend(v1_hierarchies().into_iter().map(|(m, _)| m.join(&rel)));
        all
    }

    fn assert_no_groups(&self, vm: &str) {
        for g in self.all_groups(vm) {
            assert!(!g.exists(), "{} outlived its monitor", g.display());
        }
    }

    /// Gives this test's cgroups (the root above its VMs', in v2 and in v1's cpu hierarchy)
    /// the largest CPU weight: on a busy host the unlimited spinner then gets the CPU it
    /// asks for, so what the test measures is the allowance, not the contention.
    fn outweigh_the_host(&self) {
        let rel = self.cg().strip_prefix(mount()).unwrap();
        for (file, value) in [(self.cg().join("cpu.weight"), "10000")].into_iter().chain(
            v1_hierarchies()
                .into_iter()
                .filter(|(_, c)| c.iter().any(|c| c == "cpu"))
                .map(|(m, _)| (m.join(rel).join("cpu.shares"), "262144")),
        ) {
            if file.exists() {
                std::fs::write(&file, value).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            }
        }
    }

    fn stop(&self, vm: &str) {
        let (code, v) = self.call(
            "PUT",
            &format!("/1.0/vms/{vm}/state"),
            r#"{"action":"stop","force":true}"#,
        );
        assert_eq!(code, 200, "{v}");
    }
}

fn controllers(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

/// A VM cgroup's CPU time so far, in µs, from its own counters: cgroup v2's `cpu.stat`
/// (there with or without the cpu controller) and, on a host with cgroup v1's cpuacct, the
/// VM's cpuacct cgroup (which the daemon makes when it limits CPU through v1).
fn cpu_usec(d: &Vmed, vm: &str) -> (u64, Option<u64>) {
    let stat = read(&d.group(vm).join("cpu.stat"));
    let v2 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .unwrap()
        .parse()
        .unwrap();
    let v1 = match d.at(vm, "-", "cpuacct") {
        At::V1(dir) if dir.exists() => {
            Some(read(&dir.join("cpuacct.usage")).parse::<u64>().unwrap() / 1000)
        }
        _ => None,
    };
    (v2, v1)
}

/// CPU seconds per wall second each VM's cgroup used over the same `secs`.
fn cpu_shares(d: &Vmed, vms: &[&str], secs: u64) -> Vec<f64> {
    let before: Vec<_> = vms.iter().map(|vm| cpu_usec(d, vm)).collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let after: Vec<_> = vms.iter().map(|vm| cpu_usec(d, vm)).collect();
    let wall = t0.elapsed().as_secs_f64();
    before
        .iter()
        .zip(&after)
        .map(|((a2, a1), (b2, b1))| {
            let v2 = (b2 - a2) as f64 / 1e6 / wall;
            if let (Some(a1), Some(b1)) = (a1, b1) {
                // cgroup v1's cpuacct counts the same process as cgroup v2's cpu.stat.
                let v1 = (b1 - a1) as f64 / 1e6 / wall;
                assert!((v1 - v2).abs() < 0.05, "cpuacct says {v1}, cpu.stat {v2}");
            }
            v2
        })
        .collect()
}

#[test]
fn each_monitor_runs_in_its_cgroups_with_its_limits() {
    let d = start("limits", true);
    // A guest that spins: the riscv64 machine interprets it on a host thread, which then
    // burns a host CPU.
    let (code, v) = d.create_and_start("spin", json!({}));
    assert_eq!(code, 200, "{v}");
    let pid = d.vm("spin")["pid"].as_u64().unwrap();
    let group = d.group("spin");
    let rel = group.strip_prefix(mount()).unwrap();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let line = format!("0::/{}", rel.display());
    assert!(
        cgroups.lines().any(|l| l == line),
        "monitor {pid} is not in {line}: {cgroups}"
    );
    let log = d.dir.join("state/vms/spin/monitor.log");
    let note = std::fs::read_to_string(&log).unwrap();

    // memory = 128M of guest + the default 64M allowance for the monitor, no swap.
    let memory = ((128u64 + 64) << 20).to_string();
    match d.at("spin", "memory", "memory") {
        At::V2(g) => assert_eq!(read(&g.join("memory.max")), memory),
        At::V1(g) => {
            assert_eq!(read(&g.join("memory.limit_in_bytes")), memory);
            if g.join("memory.memsw.limit_in_bytes").exists() {
                assert_eq!(read(&g.join("memory.memsw.limit_in_bytes")), memory);
            }
            assert!(
                note.contains(&format!("memory.limit_in_bytes {memory} (v1")),
                "{note}"
            );
        }
        At::Nowhere => assert!(note.contains(&format!("memory.max {memory}")), "{note}"),
    }
    // The default CPU quota: its one vCPU.
    let cpu = d.at("spin", "cpu", "cpu");
    match &cpu {
        At::V2(g) => assert_eq!(read(&g.join("cpu.max")), "100000 100000"),
        At::V1(g) => {
            assert_eq!(read(&g.join("cpu.cfs_period_us")), "100000");
            assert_eq!(read(&g.join("cpu.cfs_quota_us")), "100000");
        }
        At::Nowhere => assert!(note.contains("cpu.max 100000 100000"), "{note}"),
    }
    // The monitor is in every cgroup the daemon made for it: each v1 one too.
    for g in d.all_groups("spin").iter().filter(|g| g.exists()).skip(1) {
        let (m, _) = v1_hierarchies()
            .into_iter()
            .find(|(m, _)| g.starts_with(m))
            .unwrap();
        let want = format!("/{}", g.strip_prefix(&m).unwrap().display());
        assert!(
            cgroups.lines().any(|l| l.ends_with(&format!(":{want}"))),
            "monitor {pid} is not in {}: {cgroups}",
            g.display()
        );
        // The monitor, and the jailed child that runs its VM (see vme-vmm --jail).
        let procs = read(&g.join("cgroup.procs"));
        let child =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let mut want = vec![pid.to_string()];
        want.extend(child.split_whitespace().map(String::from));
        let mut got: Vec<String> = procs.lines().map(String::from).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{}", g.display());
    }

    // Half a CPU: enforced where the host has a cpu controller (v2 or v1), measured by the
    // cgroup's own counter against the unlimited spinner over the same seconds; else the
    // start fails, saying why.
    let (code, v) = d.create_and_start("half", json!({"cpu_allowance": "50%"}));
    if cpu == At::Nowhere {
        assert_eq!(code, 500, "{v}");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("no cpu controller") && e.contains("CPU allowance"),
            "{e}"
        );
        assert_eq!(d.vm("half")["state"], "crashed");
        d.assert_no_groups("half");
    } else {
        assert_eq!(code, 200, "{v}");
        match d.at("half", "cpu", "cpu") {
            At::V2(g) => assert_eq!(read(&g.join("cpu.max")), "50000 100000"),
            At::V1(g) => {
                assert_eq!(read(&g.join("cpu.cfs_period_us")), "100000");
                assert_eq!(read(&g.join("cpu.cfs_quota_us")), "50000");
            }
            At::Nowhere => unreachable!(),
        }
        // Each VM weighs its one vCPU as one default-weight process, and the slice above
        // them the sum: two VMs, two processes' worth against the host's others.
        let (file, unit) = match d.at("half", "cpu", "cpu") {
            At::V2(_) => ("cpu.weight", 100),
            _ => ("cpu.shares", 1024),
        };
        let slice = match d.at("half", "cpu", "cpu") {
            At::V2(g) | At::V1(g) => g.parent().unwrap().to_path_buf(),
            At::Nowhere => unreachable!(),
        };
        for vm in ["spin", "half"] {
            let (At::V2(g) | At::V1(g)) = d.at(vm, "cpu", "cpu") else {
                unreachable!()
            };
            assert_eq!(read(&g.join(file)), unit.to_string(), "{vm}'s {file}");
        }
        assert_eq!(
            read(&slice.join(file)),
            (2 * unit).to_string(),
            "the slice's {file}"
        );
        d.outweigh_the_host();
        // Let both boot and settle into spinning.
        std::thread::sleep(Duration::from_secs(2));
        let used = cpu_shares(&d, &["half", "spin"], 6);
        eprintln!(
            "CPU seconds per second: 50% allowance {:.3}, unlimited {:.3}",
            used[0], used[1]
        );
        assert!(used[0] <= 0.6, "a 50% allowance used {}", used[0]);
        assert!(
            used[0] >= 0.3,
            "the spinning guest used only {}: is it spinning?",
            used[0]
        );
        assert!(
            used[1] >= 0.75 && used[1] > used[0] + 0.2,
            "without an allowance the spinner used only {} (the limited one {})",
            used[1],
            used[0]
        );
        // The kernel says it held the limited one back (v2 and v1 cpu.stat alike).
        let (At::V2(g) | At::V1(g)) = d.at("half", "cpu", "cpu") else {
            unreachable!()
        };
        let stat = read(&g.join("cpu.stat"));
        let throttled: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(throttled > 10, "{}: {stat}", g.display());
    }
    assert_eq!(d.vm("half")["limits"]["cpu_allowance"], 0.5);

    // io limits on a disk of this host: io.max in v2, the blkio throttle files in v1, else
    // the start fails saying why.
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
    match d.at("io", "io", "blkio") {
        At::V2(g) => {
            assert_eq!(code, 200, "{v}");
            let max = read(&g.join("io.max"));
            assert!(
                max.contains(&format!("{disk} rbps=max wbps=1048576 riops=100 wiops=max")),
                "{max}"
            );
        }
        At::V1(g) => {
            assert_eq!(code, 200, "{v}");
            let t = |f: &str| read(&g.join(format!("blkio.throttle.{f}_device")));
            assert_eq!(t("write_bps"), format!("{disk} 1048576"));
            assert_eq!(t("read_iops"), format!("{disk} 100"));
            assert_eq!(
                (t("read_bps"), t("write_iops")),
                (String::new(), String::new())
            );
        }
        At::Nowhere => {
            assert_eq!(code, 500, "{v}");
            let e = v["error"].as_str().unwrap();
            assert!(
                e.contains("no io controller") && e.contains("io_max"),
                "{e}"
            );
        }
    }
    if code == 200 {
        d.stop("io");
    }
    d.assert_no_groups("io");
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

    // Stopped: every cgroup is gone; started again: fresh ones; deleted: gone for good.
    d.stop("spin");
    d.assert_no_groups("spin");
    let (code, v) = d.call("PUT", "/1.0/vms/spin/state", r#"{"action":"start"}"#);
    assert_eq!(code, 200, "{v}");
    assert!(group.exists());
    if let At::V1(g) = &cpu {
        assert!(g.exists(), "{}", g.display());
    }
    d.stop("spin");
    if cpu != At::Nowhere {
        d.stop("half");
    }
    for name in ["spin", "half", "io"] {
        let (code, v) = d.call("DELETE", &format!("/1.0/vms/{name}"), "");
        assert_eq!(code, 200, "{v}");
        d.assert_no_groups(name);
    }
}

#[test]
fn a_monitor_over_its_memory_limit_is_oom_killed_and_reported() {
    // A monitor allowance of 4M: a guest that touches all of its memory takes its monitor
    // over the limit.
    let d = Vmed::start(
        "oom",
        true,
        &["--sample-interval", "1", "--monitor-memory", "4M"],
    );
    let fill = |mib: u32| {
        json!({"memory": "64M", "cmdline": format!(
            "console=ttyS0 quiet panic=-1 vme.run=\"mkdir -p /mnt; mount -t ramfs r /mnt; \
             dd if=/dev/zero of=/mnt/fill bs=1M count={mib} 2>/dev/null; echo filled-{mib}; \
             while :; do sleep 1; done\"")})
    };
    // One that stays well within its limit keeps running.
    let (code, v) = d.create_and_start("small", fill(8));
    assert_eq!(code, 200, "{v}");
    let (code, v) = d.create_and_start("hog", fill(200));
    assert_eq!(code, 200, "{v}");
    let at = d.at("hog", "memory", "memory");
    let limit = ((64u64 + 4) << 20).to_string();
    match &at {
        At::V2(g) => assert_eq!(read(&g.join("memory.max")), limit),
        At::V1(g) => assert_eq!(read(&g.join("memory.limit_in_bytes")), limit),
        At::Nowhere => {
            eprintln!("this host has no memory controller (v2 or v1): no OOM to test");
            return;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let hog = loop {
        let vm = d.vm("hog");
        if vm["state"] != "running" {
            break vm;
        }
        assert!(
            Instant::now() < deadline,
            "the hog was not killed in 60 s: {vm}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("hog: {} ({})", hog["state"], hog["reason"]);
    assert_eq!(hog["state"], "crashed", "{hog}");
    let reason = hog["reason"].as_str().unwrap();
    assert!(
        reason.contains("killed by signal 9")
            && reason.contains("OOM killer")
            && reason.contains(&format!(
                "memory limit ({}",
                match &at {
                    At::V2(g) => g.join("memory.max"),
                    At::V1(g) => g.join("memory.limit_in_bytes"),
                    At::Nowhere => unreachable!(),
                }
                .display()
            ))
            && reason.contains(&format!("= {limit} bytes")),
        "{reason}"
    );
    d.assert_no_groups("hog");
    // Its last sample, taken from the cgroup before it went, shows it at its limit.
    let peak = d.usage("hog", "")["latest"]["memory_peak_bytes"]
        .as_u64()
        .unwrap();
    assert!(peak > 60 << 20, "peak {peak}");

    let console = d.dir.join("state/vms/small/console.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("filled-8")
    {
        assert!(
            Instant::now() < deadline,
            "the small VM never filled its 8M"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.vm("small")["state"], "running");
    d.stop("small");
    assert_eq!(d.vm("small")["reason"], "");
    d.assert_no_groups("small");
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
        "vme_vm_cpu_seconds_total{vm=\"acct\",project=\"default\"} ",
        "vme_vm_memory_used_bytes{vm=\"acct\",project=\"default\"} ",
        "vme_vm_disk_read_bytes_total{vm=\"acct\",project=\"default\"} ",
        "vme_vm_network_receive_bytes_total{vm=\"acct\",project=\"default\"} ",
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
    d.assert_no_groups("acct");
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

#[test]
fn a_monitor_that_died_while_no_daemon_watched_leaves_no_cgroup() {
    let mut d = start("orphan", true);
    let (code, v) = d.create_and_start("gone", json!({}));
    assert_eq!(code, 200, "{v}");
    let pid = d.vm("gone")["pid"].as_u64().unwrap() as i32;
    let made: Vec<PathBuf> = d
        .all_groups("gone")
        .into_iter()
        .filter(|g| g.exists())
        .collect();
    assert!(!made.is_empty());
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    // SAFETY: kill(2) with plain integers, on the monitor this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "monitor {pid} survived SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its cgroups (v2 and v1) are still there, empty; the next daemon removes them.
    assert!(made.iter().all(|g| g.exists()), "{made:?}");
    d.launch(None);
    assert_eq!(d.vm("gone")["state"], "crashed");
    d.assert_no_groups("gone");
}
