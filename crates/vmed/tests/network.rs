//! The network row of the redundancy matrix (DESIGN.md principle 3) with the real daemon and
//! real riscv64 guests: a VM cannot reach another project's VMs with both mechanisms (the
//! per-project bridge, the per-project network namespace), with each alone, and does reach
//! them with both switched off (so the test can see a breach). Two VMs of one project reach
//! each other in every case (so a dead network cannot pass for isolation).
//!
//! The daemon runs in a network namespace of the test's own (`nsenter --net`), so the
//! bridges and taps it makes in "its" namespace never touch the host's; the per-project
//! namespaces get a prefix of the test's own. All of them are deleted at the end, also on
//! failure. Needs root; set VME_SKIP_NET_TESTS=1 to skip knowingly.

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

mod support;
use support::{Vmed, image};

/// How long a guest may take to boot and show its pings (interpreted, on a loaded host).
const TIMEOUT: Duration = Duration::from_secs(180);

fn net_available() -> bool {
    if std::env::var("VME_SKIP_NET_TESTS").as_deref() == Ok("1") {
        eprintln!("VME_SKIP_NET_TESTS=1: skipping a test that needs root and /dev/net/tun");
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root && std::path::Path::new("/dev/net/tun").exists(),
        "the network isolation tests make namespaces, bridges and taps: run them as root on a \
         host with /dev/net/tun, or set VME_SKIP_NET_TESTS=1 to skip them knowingly"
    );
    true
}

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2): apt-get install iproute2")
}

fn ok(args: &[&str]) -> String {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test's namespace for the daemon, and every namespace with the test's prefix: deleted
/// on drop (after the daemon, declared later, is gone).
struct Namespaces {
    daemon: String,
    prefix: String,
}

impl Namespaces {
    fn new() -> Namespaces {
        let pid = std::process::id();
        let ns = Namespaces {
            daemon: format!("vme-test-{pid}-netiso"),
            prefix: format!("vt{pid}-"),
        };
        ns.clean();
        ok(&["netns", "add", &ns.daemon]);
        ns
    }

    /// The per-project namespaces that exist now.
    fn projects(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&self.prefix))
            .collect();
        v.sort();
        v
    }

    fn clean(&self) {
        for n in self.projects() {
            let _ = ip(&["netns", "del", &n]);
        }
        let _ = ip(&["netns", "del", &self.daemon]);
    }

    /// The links of namespace `ns`, one `ip -o -d link` line each.
    fn links(&self, ns: &str) -> String {
        ok(&["-n", ns, "-o", "-d", "link", "show"])
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.clean();
    }
}

/// One request with an optional bearer token; the status and the JSON body.
fn api(d: &Vmed, token: Option<&str>, method: &str, path: &str, body: Value) -> (u16, Value) {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: vme\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, text) = reply.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (
        code,
        serde_json::from_str(text).unwrap_or(Value::String(text.into())),
    )
}

/// The guests: VM name, project, address, and what each pings: its project mate (if it has
/// one) and the other project's guest, or nothing (it only answers).
type Pings = Option<(Option<&'static str>, &'static str)>;
const GUESTS: [(&str, &str, &str, Pings); 3] = [
    (
        "a",
        "p1",
        "10.77.0.1",
        Some((Some("10.77.0.2"), "10.77.0.3")),
    ),
    ("b", "p1", "10.77.0.2", None),
    ("c", "p2", "10.77.0.3", Some((None, "10.77.0.1"))),
];

fn cmdline(addr: &str, pings: Pings) -> String {
    let setup = format!("ip addr add {addr}/24 dev eth0; ip link set eth0 up; echo NET-UP");
    let ping = |tag: &str, to: &str| {
        format!("ping -c1 -W1 {to} >/dev/null && echo {tag}=ok || echo {tag}=no; ")
    };
    let work = match pings {
        Some((same, other)) => format!(
            "while :; do {}{}done",
            same.map(|s| ping("SAME", s)).unwrap_or_default(),
            ping("OTHER", other)
        ),
        None => "while :; do sleep 100; done".into(),
    };
    format!("console=ttyS0 quiet panic=-1 vme.run=\"{setup}; {work}\"")
}

fn console(d: &Vmed, vm: &str) -> String {
    let (_, v) = api(
        d,
        None,
        "GET",
        &format!("/1.0/vms/{vm}/console"),
        Value::Null,
    );
    v["metadata"]["log"].as_str().unwrap_or("").to_string()
}

/// What `vm` (one that pings) saw: whether it reached the other project's guest, once every
/// guest's network is up and `vm` has reached its project mate (if it has one), in the
/// 3 tries or more since.
fn reaches_other(d: &Vmed, vm: &str) -> bool {
    let t = Instant::now();
    let has_mate = GUESTS
        .iter()
        .any(|g| g.0 == vm && g.3.is_some_and(|p| p.0.is_some()));
    let mark = if has_mate { "SAME=ok" } else { "NET-UP" };
    loop {
        let all_up = GUESTS.iter().all(|g| console(d, g.0).contains("NET-UP"));
        let log = console(d, vm);
        if let Some((_, after)) = log.split_once(mark).filter(|_| all_up) {
            let tries: Vec<&str> = after
                .lines()
                .filter_map(|l| l.trim().strip_prefix("OTHER="))
                .collect();
            if tries.contains(&"ok") {
                return true;
            }
            if tries.len() >= 3 {
                return false;
            }
        }
        assert!(
            t.elapsed() < TIMEOUT,
            "guest {vm} did not reach its project mate (or did not try the other) within {}s:\n{log}",
            TIMEOUT.as_secs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The inode of a namespace: /proc/PID/ns/net of a process, or a /run/netns file.
fn ns_inode(path: &str) -> u64 {
    std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
}

/// The jailed monitor's child (the VM's process) of VM `vm`.
fn vm_process(d: &Vmed, vm: &str) -> u32 {
    let (_, v) = api(d, None, "GET", &format!("/1.0/vms/{vm}"), Value::Null);
    let pid = v["metadata"]["pid"].as_u64().unwrap();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    children.split_whitespace().next().unwrap().parse().unwrap()
}

/// Creates and starts the three guests.
fn boot(d: &Vmed) {
    for (vm, project, addr, pings) in GUESTS {
        let body = json!({"name": vm, "arch": "riscv64", "kernel": image("Image"),
            "initrd": image("initramfs.cpio"), "vcpus": 1, "memory": "64M",
            "cmdline": cmdline(addr, pings), "nics": [{}]});
        let (c, v) = api(
            d,
            None,
            "POST",
            &format!("/1.0/vms?project={project}"),
            body,
        );
        assert_eq!(c, 201, "{v}");
        let (c, v) = api(
            d,
            None,
            "PUT",
            &format!("/1.0/vms/{vm}/state"),
            json!({"action": "start"}),
        );
        assert_eq!(c, 200, "{v}");
    }
}

/// Stops and deletes the guests.
fn delete(d: &Vmed) {
    for (vm, ..) in GUESTS {
        let stop = json!({"action": "stop", "force": true});
        let (c, v) = api(d, None, "PUT", &format!("/1.0/vms/{vm}/state"), stop);
        assert_eq!(c, 200, "{v}");
        let (c, v) = api(d, None, "DELETE", &format!("/1.0/vms/{vm}"), Value::Null);
        assert_eq!(c, 200, "{v}");
    }
}

/// The bridge tap `tap`'s line in `links` names as its master.
fn master_of(links: &str, tap: &str) -> String {
    let line = links
        .lines()
        .find(|l| l.contains(&format!(": {tap}:")))
        .unwrap_or_else(|| panic!("no tap {tap}:\n{links}"));
    let master = line
        .split_whitespace()
        .skip_while(|w| *w != "master")
        .nth(1);
    master
        .unwrap_or_else(|| panic!("tap {tap} is on no bridge: {line}"))
        .to_string()
}

/// A `secret` VM of project p1 gets a segment of its own beside p1's unclassified VMs
/// (frames go both ways on a segment: only equal labels may share one), which goes with it.
fn another_label_is_another_segment(d: &Vmed, ns: &Namespaces, p1: &str) {
    let body = json!({"name": "s", "arch": "riscv64", "kernel": image("Image"),
        "initrd": image("initramfs.cpio"), "vcpus": 1, "memory": "64M", "label": "secret",
        "cmdline": "console=ttyS0 quiet panic=-1", "nics": [{}]});
    let (c, v) = api(d, None, "POST", "/1.0/vms?project=p1", body);
    assert_eq!(c, 201, "{v}");
    let start = json!({"action": "start"});
    let (c, v) = api(d, None, "PUT", "/1.0/vms/s/state?project=p1", start);
    assert_eq!(c, 200, "{v}");
    let links = ns.links(p1);
    let (secret, plain) = (
        master_of(&links, "vme-p1_s-0"),
        master_of(&links, "vme-p1_a-0"),
    );
    assert_ne!(
        secret, plain,
        "a secret VM shares a segment with unclassified ones"
    );
    let stop = json!({"action": "stop", "force": true});
    let (c, v) = api(d, None, "PUT", "/1.0/vms/s/state?project=p1", stop);
    assert_eq!(c, 200, "{v}");
    let (c, v) = api(d, None, "DELETE", "/1.0/vms/s?project=p1", Value::Null);
    assert_eq!(c, 200, "{v}");
    let links = ns.links(p1);
    assert!(!links.contains(&format!(": {secret}:")), "{links}");
    assert_eq!(master_of(&links, "vme-p1_a-0"), plain);
}

fn args(prefix: &str, netns: bool, bridge: bool) -> Vec<String> {
    [
        "--sample-interval",
        "1",
        "--netns-prefix",
        prefix,
        "--per-project-netns",
        if netns { "true" } else { "false" },
        "--per-project-bridge",
        if bridge { "true" } else { "false" },
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn another_projects_vms_are_unreachable_with_either_mechanism_alone() {
    if !net_available() {
        return;
    }
    let ns = Namespaces::new();
    let enter = format!("--net=/run/netns/{}", ns.daemon);
    let mut d = Vmed::start_under(
        "netiso",
        false,
        &args(&ns.prefix, true, true)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &["nsenter", &enter],
    );
    for p in ["p1", "p2"] {
        let (c, v) = api(&d, None, "POST", "/1.0/projects", json!({ "name": p }));
        assert_eq!(c, 201, "{v}");
    }

    // Both mechanisms: each project in its own namespace, on its own bridge; the monitors
    // jailed there; the taps owned by each VM's jail uid; nothing in the daemon's namespace.
    let t = Instant::now();
    boot(&d);
    let (p1, p2) = (format!("{}p1", ns.prefix), format!("{}p2", ns.prefix));
    assert_eq!(ns.projects(), vec![p1.clone(), p2.clone()]);
    let links = ns.links(&p1);
    // Tap names come from the VMs' keys (PROJECT_NAME outside the default project).
    for tap in ["vme-p1_a-0", "vme-p1_b-0"] {
        let line = links.lines().find(|l| l.contains(tap)).unwrap_or_else(|| {
            panic!("tap {tap} is not in {p1}:\n{links}");
        });
        assert!(line.contains("master vmeb"), "{line}");
        assert!(
            line.contains(" user 10") && line.contains("persist on"),
            "{line}"
        );
    }
    assert!(!links.contains("vme-p2_c-0"), "{links}");
    assert!(
        !ns.links(&ns.daemon).contains("vme-"),
        "taps in the daemon's namespace"
    );
    assert_eq!(
        ns_inode(&format!("/proc/{}/ns/net", vm_process(&d, "a"))),
        ns_inode(&format!("/run/netns/{p1}")),
        "a's monitor is jailed in its project's namespace"
    );
    assert!(!reaches_other(&d, "a"), "a reached c (another project)");
    assert!(!reaches_other(&d, "c"), "c reached a (another project)");
    println!(
        "both mechanisms: isolated ({:.1}s)",
        t.elapsed().as_secs_f64()
    );
    another_label_is_another_segment(&d, &ns, &p1);
    // The daemon counts the taps' traffic although they are not in its namespace.
    let t = Instant::now();
    loop {
        let (_, m) = support::request(&d.socket, "GET", "/1.0/metrics", "");
        let sent = m
            .lines()
            .find_map(|l| {
                l.strip_prefix("vme_vm_network_transmit_bytes_total{vm=\"a\",project=\"p1\"} ")
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if sent > 0.0 {
            break;
        }
        assert!(
            t.elapsed() < TIMEOUT,
            "no network bytes counted for a:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A restarted daemon adopts the running VMs and their networks; deleting the VMs
    // removes the project namespaces with their last VM.
    d.kill9_and_restart();
    assert_eq!(ns.projects(), vec![p1.clone(), p2.clone()]);
    delete(&d);
    assert_eq!(
        ns.projects(),
        Vec::<String>::new(),
        "namespaces outlived their VMs"
    );

    // An admin's tap name that is another kind of interface fails the start, which leaves
    // that interface alone and none of the taps it made behind.
    let body = json!({"name": "x", "arch": "riscv64", "kernel": image("Image"),
        "initrd": image("initramfs.cpio"), "memory": "64M", "nics": [{}, {"tap": "lo"}]});
    let (c, v) = api(&d, None, "POST", "/1.0/vms?project=p1", body);
    assert_eq!(c, 201, "{v}");
    let start = json!({"action": "start"});
    let (c, v) = api(&d, None, "PUT", "/1.0/vms/x/state", start);
    assert_ne!(c, 200, "{v}");
    assert!(v.to_string().contains("lo exists and is not a tap"), "{v}");
    let links = ns.links(&p1);
    assert!(
        !links.contains("vme-p1_x-0"),
        "a failed start left its tap:\n{links}"
    );
    assert!(!links.contains("master"), "{links}");
    let (c, v) = api(&d, None, "DELETE", "/1.0/vms/x", Value::Null);
    assert_eq!(c, 200, "{v}");
    assert_eq!(ns.projects(), Vec::<String>::new());

    // Each mechanism alone, then neither.
    for (netns, bridge, isolated) in [
        (false, true, true),
        (true, false, true),
        (false, false, false),
    ] {
        let t = Instant::now();
        d.args = args(&ns.prefix, netns, bridge);
        d.kill9_and_restart();
        boot(&d);
        let daemon_links = ns.links(&ns.daemon);
        if netns {
            assert_eq!(ns.projects(), vec![p1.clone(), p2.clone()]);
            assert!(!daemon_links.contains("vme-"), "{daemon_links}");
            assert!(
                ns.links(&p2).contains("vmebr0"),
                "one bridge name everywhere"
            );
        } else {
            assert_eq!(ns.projects(), Vec::<String>::new());
            assert!(daemon_links.contains("vme-p2_c-0"), "{daemon_links}");
        }
        let a = reaches_other(&d, "a");
        let c = reaches_other(&d, "c");
        println!(
            "per_project_netns={netns} per_project_bridge={bridge}: a reaches c: {a}, c \
             reaches a: {c} ({:.1}s)",
            t.elapsed().as_secs_f64()
        );
        assert_eq!(
            (a, c),
            (!isolated, !isolated),
            "netns={netns} bridge={bridge}"
        );
        delete(&d);
        assert_eq!(ns.projects(), Vec::<String>::new());
        let left = ns.links(&ns.daemon);
        assert!(
            !left.contains("vme-") && !left.contains("vmeb"),
            "taps or bridges outlived their VMs:\n{left}"
        );
    }
}

#[test]
fn a_user_may_not_name_a_tap() {
    // No VM boots: the refusal comes before anything touches the network.
    let d = Vmed::start("netiso-tap", false, &[]);
    let (c, _) = api(&d, None, "POST", "/1.0/projects", json!({"name": "p1"}));
    assert_eq!(c, 201);
    let (c, v) = api(
        &d,
        None,
        "POST",
        "/1.0/users",
        json!({"name": "eve", "project": "p1", "role": "user", "clearance": "unclassified"}),
    );
    assert_eq!(c, 201, "{v}");
    let (c, v) = api(&d, None, "POST", "/1.0/tokens", json!({"user": "eve"}));
    assert_eq!(c, 201, "{v}");
    let eve = v["metadata"]["token"].as_str().unwrap().to_string();
    // Another VM's tap (an admin's VM in another project), and a host interface.
    for tap in ["vme-victim-0", "eth0"] {
        let body = json!({"name": "x", "image": "none", "nics": [{"tap": tap}]});
        let (c, v) = api(&d, Some(&eve), "POST", "/1.0/vms", body);
        assert_eq!(c, 403, "{v}");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("only an admin") && e.contains("nics[].tap"),
            "{e}"
        );
    }
    // Without the tap, the same request gets past that check (to the missing image).
    let body = json!({"name": "x", "image": "none", "nics": [{}]});
    let (c, v) = api(&d, Some(&eve), "POST", "/1.0/vms", body);
    assert_ne!(c, 403, "{v}");
    assert!(!v.to_string().contains("nics[].tap"), "{v}");
}
