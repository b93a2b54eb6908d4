//! A network namespace per test, with the monitor's tap inside it, so no test traffic reaches
//! the host's network. Used by the virtio-net tests of both machines.

use crate::common::Vm;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True when the tap tests should run; without root or /dev/net/tun they fail with the fix.
pub fn net_available() -> bool {
    if std::env::var("VME_SKIP_NET_TESTS").as_deref() == Ok("1") {
        eprintln!("VME_SKIP_NET_TESTS=1: skipping a test that needs root and /dev/net/tun");
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "the virtio-net tests create a network namespace and a tap device: run them as root, \
         or set VME_SKIP_NET_TESTS=1 to skip them knowingly"
    );
    assert!(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: modprobe tun, or set VME_SKIP_NET_TESTS=1 to skip knowingly"
    );
    true
}

pub fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2): apt-get install iproute2")
}

/// A network namespace for one test, deleted (with the helpers running in it) on drop, even
/// when the test fails.
pub struct Netns {
    pub name: String,
    pub helpers: Vec<Child>,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("vme-test-{}-{tag}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        let out = ip(&["netns", "add", &name]);
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns {
            name,
            helpers: Vec::new(),
        }
    }

    pub fn exec(&self) -> Vec<&str> {
        vec!["ip", "netns", "exec", &self.name]
    }

    /// Starts `python3 -c script args...` inside the namespace; its stdout is piped.
    pub fn python(&mut self, script: &str, args: &[&str]) -> usize {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-c", script])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run python3 in the test namespace");
        self.helpers.push(child);
        self.helpers.len() - 1
    }

    /// Starts a helper (as [`Netns::python`]) that prints LISTENING once it serves, and waits
    /// for that line. Returns the helper's index.
    pub fn start_listening(&mut self, script: &str, args: &[&str]) -> usize {
        let i = self.python(script, args);
        let out = self.helpers[i].stdout.as_mut().expect("piped stdout");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
            .expect("read the helper's first line");
        assert_eq!(line.trim(), "LISTENING", "a host-side helper did not start");
        i
    }

    /// Waits for the monitor to create `tap` in the namespace, then gives the host side an
    /// address and brings it up.
    pub fn configure_tap(&self, tap: &str, vm: &Vm) {
        let t = Instant::now();
        while !ip(&["-n", &self.name, "link", "show", tap])
            .status
            .success()
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the monitor did not create tap {tap} in {}\n--- stderr ---\n{}",
                self.name,
                vm.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        for args in [
            vec!["-n", &self.name, "addr", "add", "10.0.2.1/24", "dev", tap],
            vec!["-n", &self.name, "link", "set", tap, "up"],
        ] {
            let out = ip(&args);
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for h in &mut self.helpers {
            let _ = h.kill();
            let _ = h.wait();
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}
