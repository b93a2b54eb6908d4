//! The control socket: JSON lines over a Unix socket (see `vme_api::control`). One thread
//! accepts connections; each connection is served on its own thread so a slow client cannot
//! hold up another.

use crate::control::VmControl;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use vme_api::control::{Reply, Request, Status};

/// Facts about the VM that `status` reports and that do not change while it runs.
#[derive(Clone)]
pub struct VmFacts {
    pub arch: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub cpu_template: Option<String>,
    /// The vsock device's host socket (absolute), where `vme-vmm exec` reaches the agent.
    pub vsock_uds: Option<String>,
    /// MACs and vsock CID; the clone part is filled from `clone` at each request.
    pub identity: vme_api::control::IdentityStatus,
    /// A clone's status, which its announcing thread updates.
    pub clone: Option<Arc<std::sync::Mutex<vme_api::control::CloneStatus>>>,
}

/// Longest request line accepted; anything longer is a broken or hostile client.
const MAX_LINE: u64 = 64 * 1024;

pub struct ControlServer {
    path: PathBuf,
    /// Requests being answered: the process waits for them before it exits, so a `stop`
    /// (which lets it exit at once) still gets its reply.
    in_flight: Arc<AtomicUsize>,
}

impl ControlServer {
    /// Binds the socket. A live VM already on that path is an error; a stale socket file left
    /// by a dead monitor is replaced.
    pub fn bind(
        path: &Path,
        control: Arc<VmControl>,
        facts: VmFacts,
    ) -> Result<ControlServer, String> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "control socket {} is in use by another running VM: choose another path or stop that VM",
                    path.display()
                ));
            }
            std::fs::remove_file(path).map_err(|e| {
                format!("cannot remove stale control socket {}: {e}", path.display())
            })?;
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("cannot create control socket {}: {e}", path.display()))?;
        let in_flight = Arc::new(AtomicUsize::new(0));
        let counter = in_flight.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::Kind::Api);
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let (control, facts) = (control.clone(), facts.clone());
                    let counter = counter.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || {
                            // Already bound by the listener's filter; this names the kind.
                            crate::seccomp::enter(crate::seccomp::Kind::Api);
                            serve(conn, &control, &facts, &counter)
                        });
                }
            })
            .map_err(|e| format!("cannot start the control socket thread: {e}"))?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            in_flight,
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // Bounded: a client that stopped reading must not hold the exit up.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while self.in_flight.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn serve(conn: UnixStream, control: &VmControl, facts: &VmFacts, in_flight: &AtomicUsize) {
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn).take(MAX_LINE);
    let mut line = String::new();
    loop {
        line.clear();
        reader.set_limit(MAX_LINE);
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && reader.limit() == 0 {
            let too_long = Reply::error(format!("request longer than {MAX_LINE} bytes"));
            let _ = write_reply(&mut writer, &too_long);
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        #[cfg(feature = "seccomp-drill")]
        if let Some(out) = crate::drill::control(line.trim()) {
            if writer.write_all(format!("{out}\n").as_bytes()).is_err() {
                return;
            }
            continue;
        }
        in_flight.fetch_add(1, Ordering::SeqCst);
        let reply = match Request::parse_line(line.trim()) {
            Ok(req) => handle(req, control, facts),
            Err(e) => Reply::error(e),
        };
        let migrated = reply.ok && reply.migration.is_some();
        let written = write_reply(&mut writer, &reply);
        in_flight.fetch_sub(1, Ordering::SeqCst);
        if migrated {
            // The guest runs at the destination now: this monitor ends (status 0), whether
            // or not the client is still there to read the figures.
            log::info!("migration done: this monitor exits");
            control.request_exit(crate::control::ExitReason::Stopped);
            return;
        }
        if written.is_err() {
            return;
        }
    }
}

fn write_reply(writer: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut out = serde_json::to_string(reply).unwrap_or_default();
    out.push('\n');
    writer.write_all(out.as_bytes())
}

pub fn handle(req: Request, control: &VmControl, facts: &VmFacts) -> Reply {
    log::debug!("control request {req:?}");
    match req {
        Request::Status => {
            let status = Status {
                state: control.state(),
                arch: facts.arch.clone(),
                vcpus: facts.vcpus,
                memory_bytes: facts.memory_bytes,
                pid: std::process::id(),
                uptime_ms: control.uptime().as_millis() as u64,
                exits: control.exits.load(std::sync::atomic::Ordering::Relaxed),
                emulated_instructions: control
                    .emulated_instructions
                    .load(std::sync::atomic::Ordering::Relaxed),
                instructions_retired: control.instructions_retired(),
                cpu_template: facts.cpu_template.clone(),
                vsock_uds: facts.vsock_uds.clone(),
                rss_bytes: rss_bytes(),
                devices: control.limits.list(),
                identity: Some(vme_api::control::IdentityStatus {
                    clone: facts
                        .clone
                        .as_ref()
                        .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).clone()),
                    ..facts.identity.clone()
                }),
            };
            let mut r = Reply::ok(status.state);
            r.status = Some(status);
            r
        }
        Request::Pause => control.pause().map_or_else(Reply::error, Reply::ok),
        Request::Resume => control.resume().map_or_else(Reply::error, Reply::ok),
        Request::Shutdown => match control.press_power_button() {
            Ok(()) => Reply::ok(control.state()),
            Err(e) => Reply::error(e),
        },
        Request::Stop => {
            control.request_exit(crate::control::ExitReason::Stopped);
            Reply::ok(control.state())
        }
        Request::Balloon { mib } => balloon(control, facts, Some(mib)),
        Request::BalloonStats => balloon(control, facts, None),
        Request::SetLimit { device, limits } => match control.limits.set(&device, &limits) {
            Ok(info) => {
                let mut r = Reply::ok(control.state());
                r.device = Some(info);
                r
            }
            Err(e) => Reply::error(e),
        },
        Request::Snapshot { dir } => snapshot(control, &dir, false),
        Request::SnapshotDiff { dir } => snapshot(control, &dir, true),
        Request::MigrateSend {
            to,
            downtime_ms,
            bandwidth_mib,
            key,
        } => {
            let p = crate::migrate::send::Params {
                to,
                downtime: Duration::from_millis(downtime_ms.unwrap_or(100)),
                bandwidth: bandwidth_mib.map(|m| m << 20),
                key: key.map(PathBuf::from),
                paused: false,
            };
            match control.migrate(&p) {
                Ok(info) => {
                    let mut r = Reply::ok(control.state());
                    r.migration = Some(info);
                    r
                }
                Err(e) => Reply::error(format!(
                    "migration to {} failed: {e}; the VM {} here",
                    p.to,
                    match control.state() {
                        vme_api::control::RunState::Running => "keeps running",
                        _ => "is paused",
                    }
                )),
            }
        }
    }
}

fn snapshot(control: &VmControl, dir: &str, diff: bool) -> Reply {
    let dir = Path::new(dir);
    if !dir.is_absolute() {
        return Reply::error(format!(
            "snapshot directory {} is relative: give an absolute path (vme-vmm ctl makes it \
             absolute for you)",
            dir.display()
        ));
    }
    let taken = match diff {
        true => control.snapshot_diff(dir),
        false => control.snapshot(dir),
    };
    match taken {
        Ok((state, info)) => {
            log::info!(
                "snapshot written to {} in {} ms ({} bytes of memory data)",
                info.dir,
                info.took_ms,
                info.memory_data_bytes
            );
            let mut r = Reply::ok(state);
            r.snapshot = Some(info);
            r
        }
        Err(e) => Reply::error(format!("snapshot to {} failed: {e}", dir.display())),
    }
}

/// How long `balloon_stats` waits for the guest to send fresh statistics.
const STATS_WAIT: Duration = Duration::from_secs(2);

/// `balloon <MiB>` (with `mib`) or `balloon_stats`.
fn balloon(control: &VmControl, facts: &VmFacts, mib: Option<u64>) -> Reply {
    let Some(b) = control.balloon() else {
        return Reply::error(
            "this VM has no balloon device: start it with --balloon on (balloon = true in the \
             machine file)",
        );
    };
    let running = control.state() == vme_api::control::RunState::Running;
    if let Some(mib) = mib {
        let guest_mib = facts.memory_bytes >> 20;
        if mib > guest_mib {
            return Reply::error(format!(
                "balloon {mib} MiB is more than the guest's {guest_mib} MiB of memory: give at \
                 most {guest_mib} (0 gives it all back to the guest)"
            ));
        }
        if let Err(e) = b.set_target(mib << 20) {
            return Reply::error(e);
        }
    }
    // Fresh statistics only when asked for them and the guest can answer.
    let wait = (mib.is_none() && running).then_some(STATS_WAIT);
    let mut status = b.status(wait);
    status.vmm_rss_bytes = rss_bytes();
    let mut r = Reply::ok(control.state());
    r.balloon = Some(status);
    r
}

/// This process's resident memory, from /proc/self/status (VmRSS).
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vme_api::control::{RunState, call};

    fn facts() -> VmFacts {
        VmFacts {
            arch: "x86_64".into(),
            vcpus: 2,
            memory_bytes: 1 << 28,
            cpu_template: None,
            vsock_uds: None,
            identity: Default::default(),
            clone: None,
        }
    }

    #[test]
    fn serves_requests_and_refuses_a_second_binder() {
        let dir = std::env::temp_dir().join(format!("vme-sock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let ctl = Arc::new(VmControl::new());
        let server = ControlServer::bind(&path, ctl.clone(), facts()).unwrap();
        let t = Duration::from_secs(5);
        let r = call(&path, &Request::Status, t).unwrap();
        let s = r.status.unwrap();
        assert_eq!((s.vcpus, s.state), (2, RunState::Running));
        assert_eq!(
            call(&path, &Request::Pause, t).unwrap().state,
            Some(RunState::Paused)
        );
        let r = call(&path, &Request::Shutdown, t).unwrap();
        assert!(!r.ok && r.error.unwrap().contains("paused"));
        let err = ControlServer::bind(&path, ctl.clone(), facts())
            .err()
            .unwrap();
        assert!(err.contains("in use"), "{err}");
        assert_eq!(
            call(&path, &Request::Stop, t).unwrap().state,
            Some(RunState::Stopping)
        );
        drop(server);
        assert!(!path.exists());
        // A stale file (no listener) is replaced.
        std::fs::write(&path, b"").unwrap();
        let _again = ControlServer::bind(&path, ctl, facts()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_lines_get_errors_and_the_connection_survives() {
        let dir = std::env::temp_dir().join(format!("vme-sock-test2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let _server = ControlServer::bind(&path, Arc::new(VmControl::new()), facts()).unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"garbage\n{\"cmd\":\"nope\"}\n{\"cmd\":\"status\"}\n")
            .unwrap();
        let mut lines = BufReader::new(s).lines();
        let a: Reply = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        let b: Reply = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        let c: Reply = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert!(!a.ok && a.error.unwrap().contains("not JSON"));
        assert!(!b.ok && b.error.unwrap().contains("nope"));
        assert!(c.ok && c.status.is_some());
        assert!(c.status.unwrap().rss_bytes.unwrap() > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn balloon_requests_need_a_balloon_and_a_sane_size() {
        let ctl = VmControl::new();
        let r = handle(Request::Balloon { mib: 1 }, &ctl, &facts());
        assert!(r.error.unwrap().contains("--balloon on"));
        let r = handle(Request::BalloonStats, &ctl, &facts());
        assert!(r.error.unwrap().contains("--balloon on"));

        let dev = vme_devices::virtio::balloon::Balloon::new(1 << 28, true);
        let link = crate::virtio::tests::link(dev.shared());
        ctl.set_balloon(link);
        let r = handle(Request::Balloon { mib: 257 }, &ctl, &facts());
        assert!(r.error.unwrap().contains("at most 256"));
        let r = handle(Request::Balloon { mib: 64 }, &ctl, &facts());
        let b = r.balloon.unwrap();
        assert_eq!((b.target_bytes, b.actual_bytes), (64 << 20, 0));
        assert!(!b.driver_ready && b.vmm_rss_bytes.unwrap() > 0);
        // No driver to ask: answers at once with what it has.
        let r = handle(Request::BalloonStats, &ctl, &facts());
        assert!(r.ok && r.balloon.unwrap().stats.is_none());
        ctl.reset_for_restart();
        assert!(ctl.balloon().is_none(), "a rebuilt machine brings its own");
    }

    #[test]
    fn set_limit_names_the_devices_it_knows() {
        let ctl = VmControl::new();
        let req = |d: &str, l: &str| Request::SetLimit {
            device: d.into(),
            limits: l.into(),
        };
        let r = handle(req("disk0", "bw=1M"), &ctl, &facts());
        assert!(r.error.unwrap().contains("no disks or network devices"));
        ctl.limits.register(vec![crate::limits::LimitTarget {
            name: "disk0".into(),
            backend: "/d.img".into(),
            limits: vme_api::limits::DeviceLimits::of_disk(&"path=/d.img".parse().unwrap()),
            apply: Arc::new(|_| true),
        }]);
        let r = handle(req("disk0", "bw=1M"), &ctl, &facts());
        assert!(r.ok, "{r:?}");
        assert_eq!(r.device.unwrap().name, "disk0");
        let s = handle(Request::Status, &ctl, &facts()).status.unwrap();
        assert_eq!(s.devices.len(), 1);
        let line = serde_json::to_string(&s.devices[0]).unwrap();
        assert_eq!(
            line,
            r#"{"name":"disk0","backend":"/d.img","limits":{"kind":"disk","bw":"1M"}}"#
        );
    }
}
