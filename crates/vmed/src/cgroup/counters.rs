//! What a VM's cgroups count, for accounting and for the reason of a crash: CPU time and
//! memory (v2 files where the VM has them, else their v1 equivalents) and OOM kills.

use super::{v1, v1_dir};
use std::fs;
use std::path::{Path, PathBuf};

/// CPU time in µs (total, user, system) of VM cgroup `dir`: v2's `cpu.stat` (there whether
/// or not the cpu controller is), else v1's cpuacct.
pub fn cpu_usage(dir: &Path) -> Option<(u64, u64, u64)> {
    if let Ok(stat) = fs::read_to_string(dir.join("cpu.stat")) {
        let f = |k: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.trim().parse().ok())
        };
        if let Some(total) = f("usage_usec") {
            return Some((
                total,
                f("user_usec").unwrap_or(0),
                f("system_usec").unwrap_or(0),
            ));
        }
    }
    v1::cpu_usage(&v1_dir(dir, "cpuacct")?)
}

/// Memory in bytes (now, peak) of VM cgroup `dir`: v2's `memory.current`/`memory.peak`, else
/// v1's `memory.usage_in_bytes`/`memory.max_usage_in_bytes`.
pub fn memory_usage(dir: &Path) -> Option<(u64, u64)> {
    let num = |p: PathBuf| -> Option<u64> { fs::read_to_string(p).ok()?.trim().parse().ok() };
    if let Some(now) = num(dir.join("memory.current")) {
        return Some((now, num(dir.join("memory.peak")).unwrap_or(now)));
    }
    v1::memory_usage(&v1_dir(dir, "memory")?)
}

/// Why the VM in cgroup `dir` lost its monitor, if the kernel's OOM killer did it: the count
/// in v2's `memory.events` or v1's `memory.oom_control`, with the limit it hit.
pub fn oom_killed(dir: &Path) -> Option<String> {
    let kills = |p: &Path| -> Option<u64> {
        fs::read_to_string(p)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
    };
    let (n, limit) = match kills(&dir.join("memory.events")) {
        Some(n) => (n, dir.join("memory.max")),
        None => {
            let d = v1_dir(dir, "memory")?;
            (
                kills(&d.join("memory.oom_control"))?,
                d.join("memory.limit_in_bytes"),
            )
        }
    };
    (n > 0).then(|| {
        format!(
            "the kernel's OOM killer ended it: the VM reached its cgroup memory limit ({} = {} \
             bytes: guest memory + monitor_memory); give the daemon a larger monitor_memory, \
             or make the guest use less",
            limit.display(),
            fs::read_to_string(&limit).unwrap_or_default().trim()
        )
    })
}
