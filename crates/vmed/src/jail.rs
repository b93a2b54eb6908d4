//! Every monitor this daemon starts is jailed (`vme-vmm --jail`, docs/threat-model.md) under
//! strict seccomp filters, as its VM's own uid and gid: one number per VM from
//! `jail_uid_range`, recorded in the VM's directory (`jail.id`) so that it survives restarts
//! of the daemon and is never given to another VM while that directory exists.
//!
//! The jail is `<vm dir>/jail`; the VM's directory itself (its sockets, console log, root
//! volume) is shared into it, owned by root, group the VM's gid, mode 1770 (sticky: the
//! monitor may create its sockets and rotate its log, but not remove the daemon's files).
//! A monitor that a seccomp filter ended exits with [`SECCOMP_EXIT`]: [`security_event`].

use crate::daemon::vm_dir;
use crate::events::{Events, Kind};
use std::ops::RangeInclusive;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Mutex;
use vme_api::MachineSpec;
use vme_api::jail::JailSpec;
use vme_api::spec::SeccompMode;

pub const DEFAULT_RANGE: &str = "1000000-1065535";
/// The monitor's exit status when its seccomp filter stopped a forbidden syscall
/// (vme-vmm's seccomp::EXIT_STATUS).
pub const SECCOMP_EXIT: i32 = 159;
/// Where a VM's jail id is recorded, in its directory.
const ID_FILE: &str = "jail.id";

/// Parses `FIRST-LAST`: unprivileged ids (not 0), at most u32::MAX - 1 (-1 means "none").
pub fn parse_range(s: &str) -> Result<RangeInclusive<u32>, String> {
    let bad = || {
        format!(
            "jail_uid_range {s:?} must be FIRST-LAST with 1 <= FIRST <= LAST < 4294967295, like {DEFAULT_RANGE}"
        )
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u32, u32) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a == 0 || a > b || b == u32::MAX {
        return Err(bad());
    }
    Ok(a..=b)
}

/// Allocations are serialised: two starts must not pick the same free id.
static ALLOCATING: Mutex<()> = Mutex::new(());

/// VM `name`'s jail id: the one recorded in its directory, or the lowest of `range` that no
/// VM directory records, recorded now.
pub fn vm_id(state_dir: &Path, name: &str, range: &RangeInclusive<u32>) -> Result<u32, String> {
    let _one = ALLOCATING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = vm_dir(state_dir, name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let file = dir.join(ID_FILE);
    if let Some(id) = read_id(&file) {
        if range.contains(&id) {
            return Ok(id);
        }
    }
    let mut used = std::collections::BTreeSet::new();
    if let Ok(dirs) = std::fs::read_dir(state_dir.join("vms")) {
        for d in dirs.flatten() {
            used.extend(read_id(&d.path().join(ID_FILE)));
        }
    }
    let id = range.clone().find(|i| !used.contains(i)).ok_or_else(|| {
        format!(
            "every jail uid of {}-{} is taken: widen jail_uid_range",
            range.start(),
            range.end()
        )
    })?;
    let tmp = file.with_extension("id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))
        .and_then(|()| std::fs::rename(&tmp, &file))
        .map_err(|e| format!("cannot record the jail uid in {}: {e}", file.display()))?;
    Ok(id)
}

fn read_id(file: &Path) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// Makes `spec` (about to be VM `name`'s machine file) jailed and strict, and prepares its
/// files: the VM's directory shared into the jail, its writable volumes and console logs
/// owned by its uid, mode 0600 (a volume attached from elsewhere becomes the VM's).
pub fn confine(
    state_dir: &Path,
    name: &str,
    range: &RangeInclusive<u32>,
    spec: &mut MachineSpec,
) -> Result<(), String> {
    let id = vm_id(state_dir, name, range)?;
    let dir = vm_dir(state_dir, name);
    let jail = dir.join("jail");
    let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
    std::fs::create_dir_all(&jail).map_err(|e| io(&jail, e))?;
    std::os::unix::fs::chown(&dir, Some(0), Some(id)).map_err(|e| io(&dir, e))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1770))
        .map_err(|e| io(&dir, e))?;
    let logs = ["console.log", "console.log.1"].map(|f| dir.join(f));
    let volumes = spec.disks.iter().filter(|d| !d.readonly).map(|d| &d.path);
    for file in volumes.chain(logs.iter()) {
        if !file.exists() && logs.contains(file) {
            continue;
        }
        std::os::unix::fs::chown(file, Some(id), Some(id)).map_err(|e| io(file, e))?;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io(file, e))?;
    }
    readable_inputs(state_dir, spec, id)?;
    spec.seccomp = SeccompMode::Strict;
    spec.jail = Some(JailSpec {
        dir: jail,
        uid: id,
        gid: id,
        netns: None,
    });
    Ok(())
}

/// The files the VM only reads (kernel, initrd, overlay bases, read-only disks) must be
/// readable by its jailed uid. The daemon's own (image blobs, mode 0400) are opened to all:
/// they are shared read-only content, reachable only through the root-only state directory
/// or bound into the jails of the VMs made from them. Others are the user's to fix.
fn readable_inputs(state_dir: &Path, spec: &MachineSpec, id: u32) -> Result<(), String> {
    let mut inputs: Vec<&Path> = vec![&spec.kernel];
    inputs.extend(spec.initrd.as_deref());
    for d in &spec.disks {
        inputs.extend(d.base.as_deref());
        if d.readonly {
            inputs.push(&d.path);
        }
    }
    for f in inputs {
        // A missing file is the monitor's to report, with its own words.
        let Ok(meta) = std::fs::metadata(f) else {
            continue;
        };
        let mode = meta.permissions().mode();
        if mode & 0o004 != 0 {
            continue;
        }
        if !f.starts_with(state_dir) {
            return Err(format!(
                "{} is not readable by the VM's jailed monitor (uid {id}): make it readable \
                 by all (chmod a+r)",
                f.display()
            ));
        }
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode | 0o444))
            .map_err(|e| format!("{}: {e}", f.display()))?;
    }
    Ok(())
}

/// Why a monitor's exit is a security event, if it is: its seccomp filter ended it (the
/// guest, or a bug it triggered, made the monitor try a syscall it never needs). The text
/// continues "the monitor ..." in the VM's reason.
pub fn security_event(status: &std::process::ExitStatus) -> Option<String> {
    (status.code() == Some(SECCOMP_EXIT)).then(security_reason)
}

fn security_reason() -> String {
    format!(
        "was killed by its seccomp filter (exit status {SECCOMP_EXIT}): SECURITY EVENT, the \
         monitor attempted a forbidden system call (possibly a guest escape attempt); the VM \
         was ended, its log names the syscall"
    )
}

/// [`security_event`] for a monitor whose exit status is lost (one a restarted daemon
/// adopted): its seccomp handler's last words in its log say the same.
pub fn security_event_in_log(log: &Path) -> Option<String> {
    let tail = crate::daemon::tail(log);
    tail.lines()
        .any(|l| l.starts_with("vme-vmm: seccomp: thread "))
        .then(security_reason)
}

/// Publishes a security event about VM `vm` (`type: security` on `/1.0/events`).
pub fn publish(events: &Events, vm: &crate::store::VmId, why: &str) {
    events.publish_vm(
        Kind::Security,
        &vm.key,
        serde_json::json!({
            "vm": vm.name,
            "project": vm.project,
            "reason": format!("the monitor {why}"),
        }),
    );
}

/// The process that runs VM `pid`'s guest: a jailed monitor's only child (which runs in the
/// jail's PID namespace, see vme-vmm --jail; an unjailed monitor has none), else `pid`
/// itself. For the per-process counters in /proc.
pub fn vm_process(pid: u32) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut it = children.split_whitespace();
    match (it.next().and_then(|c| c.parse::<u32>().ok()), it.next()) {
        (Some(child), None) => child,
        _ => pid,
    }
}

/// The parent of `pid`, from /proc (0 when unknown).
pub fn parent(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        assert_eq!(parse_range("10-20").unwrap(), 10..=20);
        assert_eq!(parse_range(DEFAULT_RANGE).unwrap(), 1_000_000..=1_065_535);
        for bad in ["0-5", "5-4", "x", "1-4294967295", "-"] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_are_unique_per_vm_and_kept() {
        let dir = std::env::temp_dir().join(format!("vmed-jail-ids-{}", std::process::id()));
        for vm in ["a", "b"] {
            std::fs::create_dir_all(vm_dir(&dir, vm)).unwrap();
        }
        let a = vm_id(&dir, "a", &(5..=6)).unwrap();
        let b = vm_id(&dir, "b", &(5..=6)).unwrap();
        assert_eq!((a, b), (5, 6));
        assert_eq!(vm_id(&dir, "a", &(5..=6)).unwrap(), 5);
        std::fs::create_dir_all(vm_dir(&dir, "c")).unwrap();
        assert!(vm_id(&dir, "c", &(5..=6)).unwrap_err().contains("widen"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
