//! The monitor's control protocol: one JSON object per line over a Unix socket, one reply line
//! per request. The daemon and `vme-vmm ctl` speak it; a person can too (`socat`).

use crate::limits::DeviceLimits;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A request to a running monitor. On the wire: `{"cmd":"pause"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// State, resources and counters.
    Status,
    /// Stop every vCPU; they consume no CPU until `resume`.
    Pause,
    Resume,
    /// Ask the guest to power off (ACPI power button).
    Shutdown,
    /// End the VM now, without asking the guest.
    Stop,
    /// Set the balloon's target: the guest should give this much memory back (0 deflates).
    Balloon {
        mib: u64,
    },
    /// The balloon's target and size, the guest's memory statistics (fresh if the guest
    /// answers within a moment) and the monitor's resident memory.
    BalloonStats,
    /// Write a snapshot of the VM into directory `dir` (an absolute path: the monitor's
    /// working directory is not the client's). A running VM is paused for it and resumed
    /// after; a paused VM stays paused.
    Snapshot {
        dir: String,
    },
    /// Change a disk's or network device's rate limits while the VM runs. `device` is a
    /// name from `status` (`disk0`, `net0`, ...); `limits` uses the `--disk`/`--net` limit
    /// syntax (`bw=20M,iops=500`; `KEY=off` removes a limit; keys not named keep their value).
    SetLimit {
        device: String,
        limits: String,
    },
    /// Like `snapshot`, but the memory file holds only the pages written since this VM's
    /// previous snapshot (full or diff, or the snapshot it was restored from), which it
    /// names as its parent: restoring it needs the whole chain. CLI: `snapshot DIR --diff`.
    SnapshotDiff {
        dir: String,
    },
    /// Live-migrate the VM to a monitor waiting with `vme-vmm --migrate-listen` at `to`
    /// (HOST:PORT): memory is copied while the guest runs, then the guest stops for at most
    /// about `downtime_ms` (default 100) while the rest and the device state go. On success
    /// the reply carries `migration` and this monitor exits (status 0); on failure the guest
    /// keeps running here. `bandwidth_mib` caps the rate (MiB/s); `key` is the pre-shared
    /// key file, required unless `to` is a loopback address. CLI: `migrate-send HOST:PORT
    /// [--downtime-ms N] [--bandwidth MiB/s] [--key FILE]`.
    MigrateSend {
        to: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bandwidth_mib: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
}

impl Request {
    /// Parses one wire line. Unknown commands and unknown fields are errors: a client that
    /// misspells an argument must hear about it rather than have it ignored.
    pub fn parse_line(line: &str) -> Result<Request, String> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("request is not JSON: {e}"))?;
        let req: Request = serde_json::from_value(value.clone())
            .map_err(|e| format!("invalid request: {e}; send e.g. {{\"cmd\":\"status\"}}"))?;
        let known = serde_json::to_value(&req).unwrap_or_default();
        if let (Some(given), Some(known)) = (value.as_object(), known.as_object()) {
            if let Some(extra) = given.keys().find(|k| !known.contains_key(*k)) {
                return Err(format!("invalid request: unknown field {extra:?}"));
            }
        }
        Ok(req)
    }

    /// Parses the command-line form used by `vme-vmm ctl`: `status`, `pause`, ...
    pub fn from_words(words: &[String]) -> Result<Request, String> {
        let usage = "commands: status, pause, resume, shutdown, stop, balloon <MiB>, balloon-stats, \
                     snapshot <DIR> [--diff], set-limit <device> <KEY=VALUE,...>, \
                     migrate-send <HOST:PORT> [--downtime-ms N] [--bandwidth MiB/s] [--key FILE]";
        match words {
            [w, rest @ ..] if w == "migrate-send" || w == "migrate_send" => migrate_words(rest),
            [w, dir, d] | [w, d, dir] if w == "snapshot" && d == "--diff" => {
                Ok(Request::SnapshotDiff { dir: dir.clone() })
            }
            [w, dir] if w == "snapshot-diff" || w == "snapshot_diff" => {
                Ok(Request::SnapshotDiff { dir: dir.clone() })
            }
            [w, dir] if w == "snapshot" && !dir.starts_with('-') => {
                Ok(Request::Snapshot { dir: dir.clone() })
            }
            [w, ..] if w == "snapshot" || w == "snapshot-diff" || w == "snapshot_diff" => {
                Err(format!(
                    "snapshot takes the directory to write it into and optionally --diff (e.g. \
                     snapshot /var/lib/vm1/snap, or snapshot /var/lib/vm1/snap2 --diff); {usage}"
                ))
            }
            [w, device, limits] if w == "set-limit" || w == "set_limit" => Ok(Request::SetLimit {
                device: device.clone(),
                limits: limits.clone(),
            }),
            [w, ..] if w == "set-limit" || w == "set_limit" => Err(
                "set-limit takes a device and its limits, like set-limit disk0 bw=20M,iops=500 \
                 (devices as status names them; KEY=off removes a limit)"
                    .into(),
            ),
            [w, mib] if w == "balloon" => match mib.parse() {
                Ok(mib) => Ok(Request::Balloon { mib }),
                Err(_) => Err(format!(
                    "balloon takes the target in MiB as a whole number, not {mib:?}: e.g. balloon 128"
                )),
            },
            [w] if w == "balloon" => Err(format!(
                "balloon needs the target in MiB (e.g. balloon 128; 0 gives everything back); {usage}"
            )),
            [w] => match w.as_str() {
                "status" => Ok(Request::Status),
                "pause" => Ok(Request::Pause),
                "resume" => Ok(Request::Resume),
                "shutdown" => Ok(Request::Shutdown),
                "stop" => Ok(Request::Stop),
                "balloon-stats" | "balloon_stats" => Ok(Request::BalloonStats),
                other => Err(format!("unknown command {other:?}; {usage}")),
            },
            [] => Err(format!("no command given; {usage}")),
            [w, ..] => Err(format!("command {w:?} takes no arguments; {usage}")),
        }
    }
}

/// The arguments of `migrate-send`: the destination, then options with a value each.
fn migrate_words(words: &[String]) -> Result<Request, String> {
    let usage = "migrate-send takes the destination and options, like migrate-send \
                 10.0.0.2:7000 --key /etc/vme/migrate.key [--downtime-ms 100] [--bandwidth 500]";
    let Some((to, mut rest)) = words.split_first() else {
        return Err(format!("{usage}: the destination HOST:PORT is missing"));
    };
    if to.starts_with('-') {
        return Err(format!("{usage}: the destination comes first, not {to:?}"));
    }
    let (mut downtime_ms, mut bandwidth_mib, mut key) = (None, None, None);
    let number = |flag: &str, v: &str| -> Result<Option<u64>, String> {
        match v.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(format!(
                "{flag} takes a whole number above 0, not {v:?}; {usage}"
            )),
        }
    };
    while let [flag, value, more @ ..] = rest {
        match flag.as_str() {
            "--downtime-ms" => downtime_ms = number(flag, value)?,
            "--bandwidth" => bandwidth_mib = number(flag, value)?,
            "--key" => key = Some(value.clone()),
            other => return Err(format!("unknown option {other:?} of migrate-send; {usage}")),
        }
        rest = more;
    }
    if let [extra] = rest {
        return Err(format!(
            "{extra:?} lacks a value or is not an option; {usage}"
        ));
    }
    Ok(Request::MigrateSend {
        to: to.clone(),
        downtime_ms,
        bandwidth_mib,
        key,
    })
}

/// The answer to a `migrate_send` that succeeded: what it took.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// The destination, as given.
    pub to: String,
    /// From the request to the destination's confirmation that the guest runs there.
    pub total_ms: u64,
    /// From pausing the guest here to that confirmation.
    pub downtime_ms: u64,
    /// Copy rounds while the guest ran (the first copies all of RAM).
    pub rounds: u32,
    /// Bytes sent, framing and state included.
    pub bytes_sent: u64,
    /// Pages sent in the final copy while paused.
    pub final_pages: u64,
    /// Whether the transport was authenticated and encrypted with a pre-shared key.
    pub authenticated: bool,
}

/// What the VM is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

/// The answer to `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: RunState,
    pub arch: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub pid: u32,
    /// Milliseconds since the VM started running (paused time included).
    pub uptime_ms: u64,
    /// Exits from guest to monitor handled in user space (x86: KVM_RUN returns).
    pub exits: u64,
    /// Instructions the monitor completed itself because KVM's emulator could not.
    pub emulated_instructions: u64,
    /// Instructions retired (software machine only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions_retired: Option<u64>,
    /// The CPU template in force (x86_64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// The vsock device's host Unix socket, if the VM has one (the guest agent is there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_uds: Option<String>,
    /// The monitor process's resident memory (VmRSS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// The disks and network devices, by the names `set-limit` takes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceInfo>,
    /// What tells this VM apart from others on the network and on vsock, and for a clone
    /// whether the guest has taken its new identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityStatus>,
}

/// A VM's identity as the monitor gave it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityStatus {
    /// The MAC of each network device, in `--net` order (`net0`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub macs: Vec<String>,
    /// The vsock device's guest CID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_cid: Option<u64>,
    /// Set when the VM is a clone (`--restore DIR --clone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneStatus>,
}

/// A clone's new identity and how far the guest has taken it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneStatus {
    /// The snapshot this VM was cloned from.
    pub snapshot: String,
    /// 32 hex digits, new for every clone.
    pub generation_id: String,
    pub guest: CloneGuestState,
    /// Why the guest has not taken it, or what the agent changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Where the guest stands with its new identity (MACs and entropy go through its agent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneGuestState {
    /// The monitor is still trying to reach the guest's agent.
    Pending,
    /// The agent reseeded the guest's random generator and changed its MACs.
    Applied,
    /// The agent could not be reached or refused: the guest keeps its parent's MACs and
    /// random state inside (its vsock CID and the devices' MACs are new regardless).
    Failed,
    /// The VM has no vsock device, so no agent can be reached (as `failed`).
    NoAgent,
}

/// A disk or network device of a running VM and the rate limits in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `disk0`, `disk1`, ... in `--disk` order (the guest's vda, vdb, ...); `net0`, ... in
    /// `--net` order.
    pub name: String,
    /// The disk's image file or the network device's tap.
    pub backend: String,
    pub limits: DeviceLimits,
}

/// The guest's memory statistics as its balloon driver last sent them. A statistic the guest
/// does not send is absent. Amounts are bytes; faults are counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemoryStats {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
}

/// The answer to `balloon` and `balloon_stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatus {
    /// What the host asked the guest to give back.
    pub target_bytes: u64,
    /// What the guest says it has given back.
    pub actual_bytes: u64,
    /// Whether the guest's balloon driver is running.
    pub driver_ready: bool,
    /// Pages the guest put into the balloon / took out of it, and bytes of free memory it
    /// reported, since the VM started.
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub reported_bytes: u64,
    /// Page numbers the device refused (outside guest RAM, repeated in one request).
    pub refused_pages: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<GuestMemoryStats>,
    /// How old `stats` are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_age_ms: Option<u64>,
    /// The monitor process's resident memory (VmRSS): what the host really spends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_rss_bytes: Option<u64>,
}

/// The answer to `snapshot`: what was written and how long the VM was stopped for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub dir: String,
    /// Size of the state file.
    pub state_bytes: u64,
    /// Guest RAM (the memory file's length).
    pub memory_bytes: u64,
    /// RAM that was not zero pages, written to the memory file (the rest are holes).
    pub memory_data_bytes: u64,
    /// Space the memory file takes on disk.
    pub memory_disk_bytes: u64,
    /// From the request to the files on disk, the pause included.
    pub took_ms: u64,
    /// This snapshot's ID (diff snapshots name their parent by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// For a diff snapshot: the directory of its parent, which a restore needs too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// One reply line. `ok:false` always carries `error`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<RunState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
    /// The device `set_limit` changed, with the limits now in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceInfo>,
    /// What a successful `migrate_send` took (the monitor exits after this reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationInfo>,
}

impl Reply {
    pub fn ok(state: RunState) -> Reply {
        Reply {
            ok: true,
            error: None,
            state: Some(state),
            status: None,
            balloon: None,
            snapshot: None,
            device: None,
            migration: None,
        }
    }
    pub fn error(msg: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(msg.into()),
            state: None,
            status: None,
            balloon: None,
            snapshot: None,
            device: None,
            migration: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to control socket {path}: {source}; is the VM running with --control-socket {path}?"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket {path} sent an unreadable reply {line:?}: {source}")]
    BadReply {
        path: String,
        line: String,
        source: serde_json::Error,
    },
    #[error("control socket {path} closed the connection without replying")]
    NoReply { path: String },
}

/// Sends one request and waits (up to `timeout`) for its reply.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let p = path.display().to_string();
    let io = |source| ClientError::Io {
        path: p.clone(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: p.clone(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).unwrap_or_default();
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    if reply.is_empty() {
        return Err(ClientError::NoReply { path: p });
    }
    serde_json::from_str(reply.trim_end()).map_err(|source| ClientError::BadReply {
        path: p,
        line: reply,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Pause).unwrap(),
            r#"{"cmd":"pause"}"#
        );
        assert_eq!(
            Request::parse_line(r#"{"cmd":"status"}"#),
            Ok(Request::Status)
        );
        assert!(
            Request::parse_line(r#"{"cmd":"explode"}"#)
                .unwrap_err()
                .contains("explode")
        );
        assert!(
            Request::parse_line(r#"{"cmd":"pause","x":1}"#)
                .unwrap_err()
                .contains("\"x\"")
        );
        assert!(
            Request::parse_line("pause")
                .unwrap_err()
                .contains("not JSON")
        );
        let line = serde_json::to_string(&Reply::error("no")).unwrap();
        assert_eq!(line, r#"{"ok":false,"error":"no"}"#);
    }

    #[test]
    fn words() {
        assert_eq!(Request::from_words(&["stop".into()]), Ok(Request::Stop));
        assert!(
            Request::from_words(&[])
                .unwrap_err()
                .contains("status, pause")
        );
        assert!(Request::from_words(&["pause".into(), "x".into()]).is_err());
        assert_eq!(
            Request::from_words(&["snapshot".into(), "/s".into()]),
            Ok(Request::Snapshot { dir: "/s".into() })
        );
        assert!(
            Request::from_words(&["snapshot".into()])
                .unwrap_err()
                .contains("directory")
        );
        let w =
            |v: &[&str]| Request::from_words(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let diff = Ok(Request::SnapshotDiff { dir: "/s".into() });
        assert_eq!(w(&["snapshot", "/s", "--diff"]), diff);
        assert_eq!(w(&["snapshot", "--diff", "/s"]), diff);
        assert_eq!(w(&["snapshot-diff", "/s"]), diff);
        assert!(w(&["snapshot", "--diff"]).unwrap_err().contains("--diff"));
        assert!(w(&["snapshot", "/s", "--full"]).is_err());
        assert_eq!(
            Request::parse_line(r#"{"cmd":"snapshot_diff","dir":"/s"}"#),
            diff
        );
        assert_eq!(
            Request::parse_line(r#"{"cmd":"snapshot","dir":"/s"}"#),
            Ok(Request::Snapshot { dir: "/s".into() })
        );
    }

    #[test]
    fn migrate_send_requests() {
        let w =
            |v: &[&str]| Request::from_words(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let req = Request::MigrateSend {
            to: "10.0.0.2:7000".into(),
            downtime_ms: Some(50),
            bandwidth_mib: None,
            key: Some("/k".into()),
        };
        let words = [
            "migrate-send",
            "10.0.0.2:7000",
            "--key",
            "/k",
            "--downtime-ms",
            "50",
        ];
        assert_eq!(w(&words), Ok(req.clone()));
        let line = serde_json::to_string(&req).unwrap();
        assert_eq!(
            line,
            r#"{"cmd":"migrate_send","to":"10.0.0.2:7000","downtime_ms":50,"key":"/k"}"#
        );
        assert_eq!(Request::parse_line(&line), Ok(req));
        assert!(
            Request::parse_line(r#"{"cmd":"migrate_send","to":"h:1","bw":5}"#)
                .unwrap_err()
                .contains("\"bw\"")
        );
        assert!(w(&["migrate-send"]).unwrap_err().contains("HOST:PORT"));
        assert!(
            w(&["migrate-send", "--key", "/k"])
                .unwrap_err()
                .contains("first")
        );
        assert!(
            w(&["migrate-send", "h:1", "--key"])
                .unwrap_err()
                .contains("value")
        );
        assert!(
            w(&["migrate-send", "h:1", "--bandwidth", "0"])
                .unwrap_err()
                .contains("above 0")
        );
        assert!(
            w(&["migrate-send", "h:1", "--fast", "1"])
                .unwrap_err()
                .contains("--fast")
        );
    }

    #[test]
    fn balloon_requests() {
        let w =
            |v: &[&str]| Request::from_words(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(w(&["balloon", "128"]), Ok(Request::Balloon { mib: 128 }));
        assert_eq!(w(&["balloon-stats"]), Ok(Request::BalloonStats));
        assert!(w(&["balloon"]).unwrap_err().contains("in MiB"));
        assert!(w(&["balloon", "-1"]).unwrap_err().contains("whole number"));
        assert!(w(&["balloon", "1G"]).unwrap_err().contains("whole number"));
        assert_eq!(
            serde_json::to_string(&Request::Balloon { mib: 64 }).unwrap(),
            r#"{"cmd":"balloon","mib":64}"#
        );
        assert_eq!(
            Request::parse_line(r#"{"cmd":"balloon_stats"}"#),
            Ok(Request::BalloonStats)
        );
        assert!(
            Request::parse_line(r#"{"cmd":"balloon"}"#)
                .unwrap_err()
                .contains("mib")
        );
        assert!(Request::parse_line(r#"{"cmd":"balloon","mib":-5}"#).is_err());
    }

    #[test]
    fn set_limit_requests() {
        let w =
            |v: &[&str]| Request::from_words(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let req = Request::SetLimit {
            device: "disk0".into(),
            limits: "bw=20M,iops=off".into(),
        };
        assert_eq!(
            w(&["set-limit", "disk0", "bw=20M,iops=off"]),
            Ok(req.clone())
        );
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"cmd":"set_limit","device":"disk0","limits":"bw=20M,iops=off"}"#
        );
        assert_eq!(
            Request::parse_line(
                r#"{"cmd":"set_limit","device":"disk0","limits":"bw=20M,iops=off"}"#
            ),
            Ok(req)
        );
        for bad in [
            &["set-limit"][..],
            &["set-limit", "disk0"],
            &["set-limit", "a", "b", "c"],
        ] {
            assert!(
                w(bad).unwrap_err().contains("set-limit disk0 bw=20M"),
                "{bad:?}"
            );
        }
        assert!(Request::parse_line(r#"{"cmd":"set_limit","device":"disk0"}"#).is_err());
    }
}
