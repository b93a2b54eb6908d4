//! The cgroup v1 side: a VM's directory in each v1 hierarchy that carries a controller the
//! cgroup2 mount lacks, the limits in their v1 files, and the v1 counters accounting reads.
//!
//! | limit | v2 | v1 |
//! |---|---|---|
//! | CPU allowance | `cpu.max` | `cpu.cfs_period_us` + `cpu.cfs_quota_us` |
//! | memory | `memory.max`, `memory.swap.max` = 0 | `memory.limit_in_bytes`, `memory.memsw.limit_in_bytes` = the same |
//! | io | `io.max` | `blkio.throttle.{read,write}_{bps,iops}_device` |

use super::{PERIOD_US, words, write};
use crate::limits::IoMax;
use std::fs;
use std::path::Path;

/// Creates a VM's directory in a v1 hierarchy (and the slice above it), or reuses an
/// empty leftover. True when it was created now.
pub fn create(dir: &Path) -> Result<bool, String> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(|e| {
            format!(
                "cannot create the cgroup {}: {e}; run vmed as root",
                parent.display()
            )
        })?;
    }
    match fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let left = words(&dir.join("cgroup.procs"));
            if left.is_empty() {
                Ok(false)
            } else {
                Err(format!(
                    "the cgroup {} still holds processes (pids {}): end them, then start again",
                    dir.display(),
                    left.join(" ")
                ))
            }
        }
        Err(e) => Err(format!("cannot create the cgroup {}: {e}", dir.display())),
    }
}

/// The CFS bandwidth of an allowance of `cpus` CPUs: the same quota per period as `cpu.max`.
pub fn set_cpu(dir: &Path, cpus: f64) -> Result<(), String> {
    let quota = super::apply::cpu_quota(cpus);
    // Period first: a quota is checked against the period in force.
    write(dir, "cpu.cfs_period_us", &PERIOD_US.to_string())?;
    write(dir, "cpu.cfs_quota_us", &quota.to_string())
}

/// `memory.limit_in_bytes`, and the same for memory+swap where swap accounting is on, so
/// none of the guest's memory goes to swap behind its back.
pub fn set_memory(dir: &Path, bytes: u64) -> Result<(), String> {
    let memsw = dir.join("memory.memsw.limit_in_bytes").exists();
    // The kernel keeps memsw >= limit at every step: lift memsw first (a reused cgroup may
    // hold a lower one), then set both.
    if memsw {
        write(dir, "memory.memsw.limit_in_bytes", "-1")?;
    }
    write(dir, "memory.limit_in_bytes", &bytes.to_string())?;
    if memsw {
        write(dir, "memory.memsw.limit_in_bytes", &bytes.to_string())?;
    } else if dir.join("memory.swappiness").exists() {
        // Without swap accounting (swapaccount=0) the next best: reclaim no anonymous memory.
        write(dir, "memory.swappiness", "0")?;
    }
    Ok(())
}

const THROTTLE: [&str; 4] = [
    "blkio.throttle.read_bps_device",
    "blkio.throttle.write_bps_device",
    "blkio.throttle.read_iops_device",
    "blkio.throttle.write_iops_device",
];

/// The four throttle files, one `MAJ:MIN VALUE` line per device; 0 removes a device's rule
/// (a reused cgroup may hold one from an earlier start).
pub fn io_lines(l: &IoMax) -> [(&'static str, String); 4] {
    let v = |x: Option<u64>| format!("{} {}", l.device, x.unwrap_or(0));
    let [rb, wb, ri, wi] = THROTTLE;
    [
        (rb, v(l.rbps)),
        (wb, v(l.wbps)),
        (ri, v(l.riops)),
        (wi, v(l.wiops)),
    ]
}

pub fn set_io(dir: &Path, limits: &[IoMax]) -> Result<(), String> {
    // A reused cgroup's rules for other devices go first.
    for file in THROTTLE {
        let old = fs::read_to_string(dir.join(file)).unwrap_or_default();
        for dev in old.lines().filter_map(|l| l.split_whitespace().next()) {
            write(dir, file, &format!("{dev} 0"))?;
        }
    }
    for l in limits {
        for (file, line) in io_lines(l) {
            write(dir, file, &line)?;
        }
    }
    Ok(())
}

fn number(p: &Path) -> Option<u64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// CPU time in µs (total, user, system) from a cpuacct directory.
pub fn cpu_usage(dir: &Path) -> Option<(u64, u64, u64)> {
    let ns = |f: &str| number(&dir.join(f)).map(|n| n / 1000);
    Some((
        ns("cpuacct.usage")?,
        ns("cpuacct.usage_user").unwrap_or(0),
        ns("cpuacct.usage_sys").unwrap_or(0),
    ))
}

/// Memory in bytes (now, peak) from a memory directory.
pub fn memory_usage(dir: &Path) -> Option<(u64, u64)> {
    let now = number(&dir.join("memory.usage_in_bytes"))?;
    Some((
        now,
        number(&dir.join("memory.max_usage_in_bytes")).unwrap_or(now),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lines() {
        let l = IoMax {
            device: "8:0".into(),
            requested: "/dev/sda".into(),
            rbps: Some(1 << 20),
            wbps: None,
            riops: None,
            wiops: Some(100),
        };
        let lines = io_lines(&l);
        assert_eq!(
            lines[0],
            ("blkio.throttle.read_bps_device", "8:0 1048576".into())
        );
        assert_eq!(lines[1].1, "8:0 0");
        assert_eq!(
            lines[3],
            ("blkio.throttle.write_iops_device", "8:0 100".into())
        );
    }
}
