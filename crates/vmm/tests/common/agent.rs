//! The guest agent end to end, for any machine whose image runs `vme-agent`: commands
//! through `vme-vmm exec`, files both ways over vsock, a guest-initiated connection, stats.

use super::{VMM, random_bytes, sha256_hex};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vme_api::agent::AgentClient;

/// File round trips through the agent. More than one, each after another connection has
/// come and gone: on PVM hosts, data was seen altered most often right then.
const ROUNDS: usize = 3;

/// The first differing index and how many bytes differ.
fn first_difference(a: &[u8], b: &[u8]) -> (Option<usize>, usize) {
    let diff = a.iter().zip(b).enumerate().filter(|(_, (x, y))| x != y);
    let first = diff.clone().next().map(|(i, _)| i);
    (first, diff.count())
}

/// Talks to the agent of the guest behind vsock socket `uds` (control socket `ctl`) in both
/// directions, then writes `/tmp/vme-done` so a guest waiting for it can power off.
/// `tolerate_altered_data` reports altered file data instead of failing (see x86_linux).
pub fn checks(uds: &Path, ctl: &str, timeout: Duration, tolerate_altered_data: bool) {
    let t0 = Instant::now();
    let mut agent = AgentClient::wait(uds, timeout).expect("the guest agent answers");
    agent.set_timeout(Some(timeout)).unwrap();
    eprintln!("agent answered after {:?}", t0.elapsed());

    for round in 0..ROUNDS {
        // vme-vmm exec, on a connection of its own: output, error output and exit status.
        let out = Command::new(VMM)
            .args(["exec", "--control-socket", ctl, "--"])
            .args(["sh", "-c", "echo out; echo err >&2; exit 7"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(7), "{out:?}");
        assert_eq!(
            (&out.stdout[..], &out.stderr[..]),
            (&b"out\n"[..], &b"err\n"[..])
        );

        // A file written through the agent reads back the same, in the guest and to the
        // host. 1 MiB: guest user space on PVM hosts moves vsock data at about 100 KB/s.
        let data = random_bytes(1 << 20);
        let t = Instant::now();
        agent.write_file("/tmp/blob", &data, None).unwrap();
        let up = t.elapsed().as_secs_f64();
        let sum = agent
            .exec(&["sha256sum".into(), "/tmp/blob".into()], &[], timeout)
            .unwrap();
        let guest_sum = String::from_utf8_lossy(&sum.stdout).to_string();
        let t = Instant::now();
        let back = agent.read_file("/tmp/blob").unwrap();
        let down = t.elapsed().as_secs_f64();
        eprintln!(
            "round {round}: host -> guest 1 MiB in {up:.2} s ({:.2} MiB/s), guest -> host in \
             {down:.2} s ({:.2} MiB/s)",
            1.0 / up,
            1.0 / down
        );
        assert_eq!(back.len(), data.len(), "the file reads back whole");
        let host_sum = sha256_hex(&data);
        if !guest_sum.starts_with(&host_sum) || back != data {
            let msg = format!(
                "vsock data differs in round {round}: guest SHA-256 {guest_sum:?}, host \
                 {host_sum}; read back differs in {:?} (first byte, count)",
                first_difference(&back, &data)
            );
            assert!(tolerate_altered_data, "{msg}");
            eprintln!("KNOWN ISSUE on PVM hosts: {msg}");
        }
    }

    // The guest connects to the host: its port 5000 is the Unix socket <uds>_5000.
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        s.write_all(format!("host saw {got}").as_bytes()).unwrap();
    });
    let echo = agent
        .exec(
            &["vme-agent".into(), "--connect".into(), "5000".into()],
            b"guest hello",
            timeout,
        )
        .unwrap();
    server.join().unwrap();
    assert_eq!(echo.code, Some(0), "{echo:?}");
    assert_eq!(
        String::from_utf8_lossy(&echo.stdout),
        "host saw guest hello"
    );

    let stats = agent.stats().unwrap();
    assert!(
        stats.mem_total_kib > 100 << 10 && stats.processes > 5,
        "{stats:?}"
    );
    agent.write_file("/tmp/vme-done", b"", None).unwrap();
}
