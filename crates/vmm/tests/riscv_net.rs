//! virtio-net end to end on the riscv64 software machine: the real Linux driver over
//! virtio-mmio, through the real `vme-vmm` binary, on a real tap device. Everything runs in a
//! network namespace of its own (created and deleted by the test), so no traffic reaches the
//! host's network. Needs root (namespaces, taps); set VME_SKIP_NET_TESTS=1 to skip knowingly.

mod common;

use common::netns::{Netns, ip, net_available};
use common::{Vm, riscv_tiny_args, run_to_end, temp_dir};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Generous: the 256 MiB streams take tens of seconds on an interpreted guest, more on a
/// loaded host.
const TIMEOUT: Duration = Duration::from_secs(300);
/// Moved each way over TCP (more than the guest's RAM: it goes to and from virtio disks).
const BULK: usize = 256 << 20;
const TAP: &str = "vmetap0";
const MAC: &str = "52:54:00:12:34:56";

/// Accepts one TCP connection on port 9000, reads it to the end and prints
/// `SINK <sha256> <bytes> <seconds from first byte to end>`.
const SINK: &str = r#"
import hashlib, socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000))
s.listen(1)
print("LISTENING", flush=True)
c, _ = s.accept()
h, n, t0 = hashlib.sha256(), 0, None
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    if t0 is None:
        t0 = time.monotonic()
    h.update(b)
    n += len(b)
c.close()
print("SINK", h.hexdigest(), n, "%.3f" % (time.monotonic() - (t0 or time.monotonic())), flush=True)
"#;

/// Serves files of a directory over HTTP on port 8000 (what the guest's busybox wget speaks).
const HTTP: &str = r#"
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
handler = functools.partial(Quiet, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("0.0.0.0", 8000), handler)
print("LISTENING", flush=True)
server.serve_forever()
"#;

/// Fetches `argv[1]` (from the guest's busybox httpd, which sends with sendfile and so
/// with full-size TSO frames), prints `FETCH <sha256> <bytes> <seconds>`, then connects to
/// `argv[2]`:9001 to tell the guest it may finish.
const FETCH: &str = r#"
import hashlib, socket, sys, time, urllib.request
t0 = time.monotonic()
body = urllib.request.urlopen(sys.argv[1], timeout=120).read()
secs = time.monotonic() - t0
print("FETCH", hashlib.sha256(body).hexdigest(), len(body), "%.3f" % secs, flush=True)
socket.create_connection((sys.argv[2], 9001), timeout=10).close()
"#;

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run the host's sha256sum (coreutils)");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The value after `TAG=` on the guest's console line.
fn value(vm: &mut Vm, tag: &str) -> String {
    let line = vm.wait_for(&format!("{tag}="), TIMEOUT);
    let rest = line.split_once(&format!("{tag}=")).unwrap().1;
    rest.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn seconds(vm: &mut Vm, tag: &str) -> f64 {
    value(vm, tag).parse().unwrap()
}

fn mb_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(0.001)
}

#[test]
fn guest_pings_and_streams_256_mib_each_way_over_a_tap() {
    if !net_available() {
        return;
    }
    let dir = temp_dir("net");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let data = www.join("data");
    let mut bytes = vec![0u8; BULK];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .unwrap();
    std::fs::write(&data, &bytes).unwrap();
    drop(bytes);
    let want = sha256_hex(&data);
    // The guest serves the same file from an ext4 disk (busybox httpd sends it with
    // sendfile, so in full-size TSO frames), and stores its download on a raw disk that the
    // host checks after power-off: piping 256 MiB through an interpreted guest's user space
    // into sha256sum would take minutes.
    let served = dir.join("served.ext4");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&www)
        .arg(&served)
        .arg(format!("{}M", (BULK >> 20) + 64))
        .output()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(mkfs.status.success(), "{mkfs:?}");
    let down = dir.join("down.raw");
    std::fs::File::create(&down)
        .and_then(|f| f.set_len(BULK as u64))
        .unwrap();

    let mut ns = Netns::new("bulk");
    ns.start_listening(HTTP, &[www.to_str().unwrap()]);

    let run = "ip addr add 10.0.2.15/24 dev eth0; ip link set eth0 up; \
               echo MAC=$(cat /sys/class/net/eth0/address); \
               ping -c 3 10.0.2.1 >/dev/null && echo PING=ok; \
               echo T0=$(cut -d. -f1-2 /proc/uptime); \
               wget -q -O /dev/vdb http://10.0.2.1:8000/data && sync && echo DOWN=ok; \
               echo T1=$(cut -d. -f1-2 /proc/uptime); \
               mkdir /mnt && mount -o ro /dev/vda /mnt && \
               httpd -p 8080 -h /mnt && echo SERVING=1; \
               nc -l -p 9001";
    let mut args = riscv_tiny_args("1", "256M", &format!("vme.run=\"{run}\""));
    args.extend(["--net".into(), format!("tap={TAP},mac={MAC}")]);
    for disk in [
        format!("{},readonly=on", served.display()),
        down.display().to_string(),
    ] {
        args.extend(["--disk".into(), format!("path={disk}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::start_wrapped(&ns.exec(), &args);
    ns.configure_tap(TAP, &vm);
    assert!(
        !ip(&["link", "show", TAP]).status.success(),
        "the tap must exist only inside the test's namespace"
    );

    // A second monitor on the same tap is refused, and says why.
    let mut second = ns.exec();
    second.push(common::VMM);
    second.extend(args.iter().copied());
    let out = Command::new(second[0]).args(&second[1..]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another process"), "{err}");

    assert_eq!(
        value(&mut vm, "MAC"),
        MAC,
        "the guest sees the MAC it was given"
    );
    assert_eq!(value(&mut vm, "PING"), "ok", "{}", vm.console_text());
    let t0 = seconds(&mut vm, "T0");
    assert_eq!(value(&mut vm, "DOWN"), "ok", "the guest's wget failed");
    let t1 = seconds(&mut vm, "T1");
    assert_eq!(value(&mut vm, "SERVING"), "1", "busybox httpd started");
    let mut fetch = ns.exec();
    fetch.extend([
        "python3",
        "-c",
        FETCH,
        "http://10.0.2.15:8080/data",
        "10.0.2.15",
    ]);
    let out = Command::new(fetch[0]).args(&fetch[1..]).output().unwrap();
    let fetched = String::from_utf8_lossy(&out.stdout).into_owned();
    let g: Vec<&str> = fetched.split_whitespace().collect();
    assert!(
        out.status.success() && g.first() == Some(&"FETCH"),
        "the host could not fetch from the guest's httpd: {fetched}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(g[1], want, "guest -> host data intact");
    assert_eq!(g[2], BULK.to_string(), "guest -> host byte count");
    let fetch_secs: f64 = g[3].parse().unwrap();
    vm.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
    let status = vm.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", vm.stderr.lock().unwrap());
    assert_eq!(sha256_hex(&down), want, "host -> guest data intact");
    eprintln!(
        "riscv64 virtio-net over tap, 256 MiB each way: host -> guest {:.1} MB/s (guest busybox \
         wget onto a virtio disk, guest clock); guest -> host {:.1} MB/s (host fetching from the \
         guest's busybox httpd, which uses sendfile; host clock)",
        mb_per_s(BULK, t1 - t0),
        mb_per_s(BULK, fetch_secs)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn net_flags_are_checked_before_boot() {
    let (status, err) = run_to_end(&[
        "--arch",
        "riscv64",
        "--kernel",
        "/nonexistent",
        "--net",
        "tap=abcdefghijklmnop",
    ]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("at most 15"), "{err}");
    let (status, err) = run_to_end(&["--kernel", "/k", "--net", "tap=t0,mac=01:00:5e:00:00:01"]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("multicast"), "{err}");
    // x86_64 takes network devices too: the first thing wrong here is the missing kernel.
    let (status, err) = run_to_end(&["--kernel", "/k", "--net", "tap=t0"]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("kernel file /k"), "{err}");
    let out = Command::new(common::VMM)
        .args(["--arch", "riscv64", "--kernel", "/k", "--print-config"])
        .args(["--net", "tap=a,mac=52:54:00:00:00:01", "--net", "tap=b"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("[[nets]]\ntap = \"a\"\nmac = \"52:54:00:00:00:01\"")
            && text.contains("tap = \"b\""),
        "{text}"
    );
}

/// Fetches `argv[1]` and prints the body.
const GET: &str = r#"
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode(), end="")
"#;

/// Sends 1000-byte UDP datagrams to `argv[1]`:9999 for one second; prints how many.
const FLOOD: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t, n = time.monotonic(), 0
while time.monotonic() - t < 1:
    try:
        s.sendto(b"x" * 1000, (sys.argv[1], 9999))
        n += 1
    except OSError:
        time.sleep(0.001)
print(n)
"#;

/// While the VM is paused, frames flooding its tap are not delivered and cost the monitor no
/// CPU (the receive thread sleeps); after resume the network works again.
#[test]
fn a_paused_vm_burns_no_cpu_on_a_flooded_tap_and_resumes_networking() {
    if !net_available() {
        return;
    }
    let dir = temp_dir("net-pause");
    let sock = dir.join("ctl.sock");
    let ns = Netns::new("pause");
    let run = "ip addr add 10.0.2.15/24 dev eth0; ip link set eth0 up; \
               echo alive > /tmp/hi; httpd -p 8080 -h /tmp && echo UP=1; \
               nc -l -p 9001; echo DONE=1";
    let mut args = riscv_tiny_args("1", "128M", &format!("vme.run=\"{run}\""));
    args.extend(["--net".into(), format!("tap={TAP}")]);
    args.extend(["--control-socket".into(), sock.to_str().unwrap().into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::start_wrapped(&ns.exec(), &args);
    ns.configure_tap(TAP, &vm);
    assert_eq!(value(&mut vm, "UP"), "1");
    let python = |script: &str, arg: &str| {
        let mut full = ns.exec();
        full.extend(["python3", "-c", script, arg]);
        let out = Command::new(full[0]).args(&full[1..]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let url = "http://10.0.2.15:8080/hi";
    assert_eq!(python(GET, url).trim(), "alive", "before the pause");
    let ctl = |cmd: &str| {
        common::ctl(&sock, cmd);
    };
    ctl("pause");
    std::thread::sleep(Duration::from_millis(200));
    let cpu_before = vm.cpu_time();
    let sent: u64 = python(FLOOD, "10.0.2.15").trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let cpu_used = vm.cpu_time() - cpu_before;
    assert!(sent > 100, "the flood sent only {sent} datagrams");
    assert!(
        cpu_used < Duration::from_millis(150),
        "the paused monitor used {cpu_used:?} of CPU while {sent} frames hit its tap"
    );
    ctl("resume");
    assert_eq!(python(GET, url).trim(), "alive", "after resume");
    python(
        "import socket, sys; socket.create_connection((sys.argv[1], 9001), timeout=10).close()",
        "10.0.2.15",
    );
    vm.wait_for("DONE=1", TIMEOUT);
    vm.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest reboot with `--on-reboot restart` rebuilds the devices but keeps the tap the
/// monitor created, so its host-side setup (done once, here) still works after the reboot.
#[test]
fn the_tap_and_its_host_setup_survive_a_guest_reboot() {
    if !net_available() {
        return;
    }
    let mut ns = Netns::new("reboot");
    let sink = r#"
import socket
s = socket.socket()
s.bind(("10.0.2.1", 9000))
s.listen(4)
print("LISTENING", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"#;
    let run = "ip addr add 10.0.2.15/24 dev eth0; ip link set eth0 up; \
               nc 10.0.2.1 9000 </dev/null && echo REACHED=1; reboot -f";
    let mut args = riscv_tiny_args("1", "128M", &format!("vme.run=\"{run}\""));
    args.extend(["--net".into(), format!("tap={TAP}")]);
    args.extend(["--on-reboot".into(), "restart".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::start_wrapped(&ns.exec(), &args);
    ns.configure_tap(TAP, &vm);
    // Listening on the tap's address, so this starts only once the host side is set up.
    let helper = ns.python(sink, &[]);
    let mut line = String::new();
    BufReader::new(ns.helpers[helper].stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "LISTENING",
        "the host-side listener did not start"
    );
    assert_eq!(value(&mut vm, "REACHED"), "1", "first boot");
    vm.wait_for("VME-GUEST-READY", TIMEOUT);
    assert_eq!(value(&mut vm, "REACHED"), "1", "after the reboot");
}

/// Both directions limited to 1 MiB/s: 3 MiB down (wget) and 3 MiB up (nc) each take at
/// least ~2.5 s by the guest's clock. A loaded host only makes them slower, so the bound
/// cannot flake; without the limiter they run at several MB/s (the test above).
#[test]
fn per_direction_limits_hold_the_guest_to_one_mib_per_second() {
    if !net_available() {
        return;
    }
    const SIZE: usize = 3 << 20;
    let dir = temp_dir("net-limits");
    let data = dir.join("data");
    std::fs::write(&data, vec![0x5au8; SIZE]).unwrap();
    let mut ns = Netns::new("limits");
    ns.start_listening(HTTP, &[dir.to_str().unwrap()]);
    let sink = ns.start_listening(SINK, &[]);
    let run = "ip addr add 10.0.2.15/24 dev eth0; ip link set eth0 up; \
               ping -c 1 -W 5 10.0.2.1 >/dev/null; \
               echo T0=$(cut -d' ' -f1 /proc/uptime); \
               wget -q -O /tmp/d http://10.0.2.1:8000/data; \
               echo T1=$(cut -d' ' -f1 /proc/uptime); \
               echo DOWN=$(wc -c < /tmp/d); \
               echo T2=$(cut -d' ' -f1 /proc/uptime); \
               nc 10.0.2.1 9000 < /tmp/d; \
               echo T3=$(cut -d' ' -f1 /proc/uptime)";
    let mut args = riscv_tiny_args("1", "128M", &format!("vme.run=\"{run}\""));
    args.extend([
        "--net".into(),
        format!("tap={TAP},mac={MAC},rx_bw=1M,tx_bw=1M"),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::start_wrapped(&ns.exec(), &args);
    ns.configure_tap(TAP, &vm);
    let t0 = seconds(&mut vm, "T0");
    let t1 = seconds(&mut vm, "T1");
    assert_eq!(
        value(&mut vm, "DOWN"),
        SIZE.to_string(),
        "{}",
        vm.console_text()
    );
    let t2 = seconds(&mut vm, "T2");
    let t3 = seconds(&mut vm, "T3");
    vm.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    let mut line = String::new();
    let out = ns.helpers[sink].stdout.as_mut().unwrap();
    BufReader::new(out).read_line(&mut line).unwrap();
    assert!(
        line.contains(&format!(" {SIZE} ")),
        "upload incomplete: {line:?}"
    );
    let mib_s = |s: f64| SIZE as f64 / (1 << 20) as f64 / s.max(0.001);
    eprintln!(
        "riscv64 virtio-net limited to 1 MiB/s each way, 3 MiB: down {:.2} s ({:.2} MiB/s), \
         up {:.2} s ({:.2} MiB/s), guest clock",
        t1 - t0,
        mib_s(t1 - t0),
        t3 - t2,
        mib_s(t3 - t2)
    );
    // Headers count against the limit too, and 100 ms of burst is allowed.
    assert!(mib_s(t1 - t0) < 1.25, "receive went above its limit");
    assert!(mib_s(t3 - t2) < 1.25, "transmit went above its limit");
    let _ = std::fs::remove_dir_all(&dir);
}
