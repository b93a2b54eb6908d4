//! One cgroup v2 per VM: `ROOT/vm-NAME` (ROOT is the `cgroup_root` setting, by default
//! `vme.slice` under the host's cgroup2 mount). The monitor enters it between fork and exec,
//! so none of the guest's code runs outside it; its limits are `cpu.max` (the VM's CPU
//! allowance, else its vCPU count), `memory.max` (guest memory plus the monitor's allowance,
//! no swap) and `io.max` when the VM asks for it. The cgroup is removed once the monitor
//! has exited.
//!
//! A host that keeps a controller under cgroup v1 (a hybrid layout) does not offer it here:
//! a limit the VM asked for (`cpu_allowance`, `io_max`) then fails the start; the implicit
//! ones (`memory.max`, the default `cpu.max`) fail it only with `require_controllers`.

use crate::limits::{IoMax, VmLimits};
use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `statfs` magic of a cgroup2 filesystem.
const CGROUP2_MAGIC: i64 = 0x6367_7270;
/// `cpu.max` period, µs (the kernel's default).
const PERIOD_US: u64 = 100_000;

/// The cgroup settings in force.
#[derive(Debug, Clone, PartialEq)]
pub struct CgroupConfig {
    /// False: monitors run in the daemon's cgroup, without limits.
    pub enabled: bool,
    pub root: PathBuf,
    /// Memory the monitor may use beyond the guest's (its code, device buffers, threads).
    pub monitor_memory: u64,
    /// Fail a start when an implicit limit's controller is missing, instead of skipping it.
    pub require_controllers: bool,
}

/// The host's cgroup2 mount point (from /proc/self/mountinfo), if any.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPEROPTIONS
        let (pre, post) = l.split_once(" - ")?;
        if post.split(' ').next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(pre.split(' ').nth(4)?))
    })
}

/// The default `cgroup_root`: `vme.slice` under the cgroup2 mount (`/sys/fs/cgroup` on a
/// unified host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn default_root() -> PathBuf {
    cgroup2_mount()
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
        .join("vme.slice")
}

/// A note for the daemon's log when the host's cgroup2 hierarchy lacks controllers the
/// limits need (a hybrid host keeps them under cgroup v1); None when all are there.
pub fn startup_note(cfg: &CgroupConfig) -> Option<String> {
    if !cfg.enabled {
        return None;
    }
    let Some(mount) = cgroup2_mount() else {
        return Some(
            "no cgroup v2 hierarchy is mounted: every start will fail until one is, or \
             cgroups = false"
                .into(),
        );
    };
    let offered = words(&mount.join("cgroup.controllers"));
    let missing: Vec<&str> = ["cpu", "memory", "io"]
        .into_iter()
        .filter(|c| !offered.iter().any(|o| o == c))
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "the cgroup v2 hierarchy at {} lacks the {} controller(s): VMs asking for what they \
         enforce (cpu_allowance, io_max) cannot start; {}",
        mount.display(),
        missing.join(", "),
        if cfg.require_controllers {
            "with require_controllers, no VM can start"
        } else {
            "the implicit limits (memory.max, the default cpu.max) are skipped"
        }
    ))
}

/// The cgroup of VM `name`.
pub fn vm_path(root: &Path, name: &str) -> PathBuf {
    root.join(format!("vm-{name}"))
}

fn is_cgroup2(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statfs; both outlive the call.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type as i64 == CGROUP2_MAGIC
}

fn words(p: &Path) -> Vec<String> {
    fs::read_to_string(p)
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// A VM's cgroup made ready for its monitor.
pub struct Prepared {
    pub dir: PathBuf,
    /// `cgroup.procs`, open for the child to write itself into.
    procs: fs::File,
    /// Limits that could not be applied (their controller is missing), for the log.
    pub skipped: Vec<String>,
}

impl Prepared {
    /// The descriptor the `pre_exec` hook writes "0" to ([`enter`]).
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// Makes `cmd`'s child enter this cgroup before it executes anything.
    pub fn attach(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let fd = self.procs_fd();
        // SAFETY: the hook runs in the forked child before exec and only calls write(2),
        // which is async-signal-safe; `fd` stays open in the parent (in `self`) until the
        // spawn has returned.
        unsafe {
            cmd.pre_exec(move || enter(fd));
        }
    }
}

/// VM `vm`'s cgroup made ready when cgroups are on; limits it had to skip are noted in the
/// monitor's `log`.
pub fn for_vm(
    cfg: &CgroupConfig,
    vm: &crate::store::VmRecord,
    log: &mut fs::File,
) -> Result<Option<Prepared>, String> {
    if !cfg.enabled {
        return Ok(None);
    }
    let g = prepare(
        cfg,
        &vm.name,
        vm.spec.vcpus,
        vm.spec.memory.bytes(),
        &vm.limits,
    )?;
    if !g.skipped.is_empty() {
        let _ = writeln!(
            log,
            "vmed: limits not enforced (the cgroup lacks their controller): {}",
            g.skipped.join(", ")
        );
    }
    Ok(Some(g))
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `fd`. Runs in the
/// forked child before exec: only async-signal-safe calls (one write).
pub fn enter(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: write(2) from a static one-byte buffer to a descriptor the parent opened and
    // keeps open across the fork; async-signal-safe.
    let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Creates (or reuses an empty leftover of) VM `name`'s cgroup and sets its limits.
pub fn prepare(
    cfg: &CgroupConfig,
    name: &str,
    vcpus: u32,
    guest_memory: u64,
    limits: &VmLimits,
) -> Result<Prepared, String> {
    let hint = "set cgroup_root to a directory under the host's cgroup2 mount, or cgroups = false \
                to run VMs without cgroups";
    let mount = cgroup2_mount()
        .ok_or_else(|| format!("this host has no cgroup v2 hierarchy mounted; {hint}"))?;
    if !cfg.root.starts_with(&mount) {
        return Err(format!(
            "cgroup_root {} is not under the cgroup2 mount {}; {hint}",
            cfg.root.display(),
            mount.display()
        ));
    }
    fs::create_dir_all(&cfg.root).map_err(|e| {
        format!(
            "cannot create the cgroup {}: {e}; run vmed as root, or {hint}",
            cfg.root.display()
        )
    })?;
    if !is_cgroup2(&cfg.root) {
        return Err(format!(
            "{} is not a cgroup v2 directory; {hint}",
            cfg.root.display()
        ));
    }
    let mut wanted = vec!["cpu", "memory"];
    if !limits.io_max.is_empty() {
        wanted.push("io");
    }
    // Each level down to the root hands the controllers on to its children.
    let mut levels: Vec<&Path> = cfg
        .root
        .ancestors()
        .take_while(|a| a.starts_with(&mount))
        .collect();
    levels.reverse();
    for dir in levels {
        let offered = words(&dir.join("cgroup.controllers"));
        let on = words(&dir.join("cgroup.subtree_control"));
        for c in wanted.iter().filter(|c| offered.iter().any(|o| o == *c)) {
            if on.iter().any(|o| o == c) {
                continue;
            }
            let p = dir.join("cgroup.subtree_control");
            fs::write(&p, format!("+{c}")).map_err(|e| {
                format!(
                    "cannot enable the {c} controller in {}: {e}; a cgroup with processes of \
                     its own cannot hand controllers down: choose a cgroup_root whose parents \
                     hold no processes",
                    p.display()
                )
            })?;
        }
    }
    let dir = vm_path(&cfg.root, name);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if !words(&dir.join("cgroup.procs")).is_empty() {
                return Err(format!(
                    "the cgroup {} still holds processes (pids {}): end them, then start again",
                    dir.display(),
                    words(&dir.join("cgroup.procs")).join(" ")
                ));
            }
        }
        Err(e) => return Err(format!("cannot create the cgroup {}: {e}", dir.display())),
    }
    let result = apply(cfg, &dir, vcpus, guest_memory, limits);
    let skipped = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_dir(&dir);
            return Err(e);
        }
    };
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
        .map_err(|e| {
            let _ = fs::remove_dir(&dir);
            format!("cannot open {}/cgroup.procs: {e}", dir.display())
        })?;
    Ok(Prepared {
        dir,
        procs,
        skipped,
    })
}

/// `cpu.max` for an allowance of `cpus` CPUs.
pub fn cpu_max(cpus: f64) -> String {
    let quota = (cpus * PERIOD_US as f64).round().max(1000.0) as u64;
    format!("{quota} {PERIOD_US}")
}

/// Writes the limits into the VM's cgroup; returns those skipped for a missing controller.
fn apply(
    cfg: &CgroupConfig,
    dir: &Path,
    vcpus: u32,
    guest_memory: u64,
    limits: &VmLimits,
) -> Result<Vec<String>, String> {
    let offered = words(&dir.join("cgroup.controllers"));
    let has = |c: &str| offered.iter().any(|o| o == c);
    let missing = |c: &str, what: &str| {
        format!(
            "the cgroup {} has no {c} controller, needed for {what}: this host keeps it under \
             cgroup v1 or its parents do not hand it down; boot with a unified cgroup \
             hierarchy (systemd.unified_cgroup_hierarchy=1)",
            dir.display()
        )
    };
    let write = |file: &str, value: &str| -> Result<(), String> {
        let p = dir.join(file);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| format!("cannot open {}: {e}", p.display()))?;
        f.write_all(value.as_bytes())
            .map_err(|e| format!("the kernel refused {value:?} in {}: {e}", p.display()))
    };
    let mut skipped = Vec::new();
    let cpus = limits.cpu_allowance.unwrap_or(f64::from(vcpus));
    if has("cpu") {
        write("cpu.max", &cpu_max(cpus))?;
    } else if limits.cpu_allowance.is_some() || cfg.require_controllers {
        return Err(missing("cpu", "the CPU allowance (cpu.max)"));
    } else {
        skipped.push(format!("cpu.max {}", cpu_max(cpus)));
    }
    let memory = guest_memory.saturating_add(cfg.monitor_memory);
    if has("memory") {
        write("memory.max", &memory.to_string())?;
        // The guest's memory must not be pushed to swap behind its back.
        if dir.join("memory.swap.max").exists() {
            write("memory.swap.max", "0")?;
        }
    } else if cfg.require_controllers {
        return Err(missing("memory", "memory.max"));
    } else {
        skipped.push(format!("memory.max {memory}"));
    }
    if !limits.io_max.is_empty() {
        if !has("io") {
            return Err(missing("io", "io_max"));
        }
        for l in &limits.io_max {
            write("io.max", &io_line(l))?;
        }
    }
    Ok(skipped)
}

/// One `io.max` line: `MAJ:MIN rbps=N wbps=N riops=N wiops=N` (absent ones as `max`).
pub fn io_line(l: &IoMax) -> String {
    let v = |x: Option<u64>| x.map_or("max".to_string(), |n| n.to_string());
    format!(
        "{} rbps={} wbps={} riops={} wiops={}",
        l.device,
        v(l.rbps),
        v(l.wbps),
        v(l.riops),
        v(l.wiops)
    )
}

/// Whether process `pid` is in the cgroup `dir` (from /proc/PID/cgroup's v2 line).
pub fn contains(dir: &Path, pid: u32) -> bool {
    let Some(mount) = cgroup2_mount() else {
        return false;
    };
    let Ok(rel) = dir.strip_prefix(&mount) else {
        return false;
    };
    let want = format!("0::/{}", rel.display());
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|t| t.lines().any(|l| l.trim_end() == want))
}

/// Removes a VM's cgroup once its processes are gone (an exited monitor leaves it within
/// moments). A missing cgroup is fine.
pub fn remove(dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                return Err(format!(
                    "cannot remove the cgroup {}: {e} (pids left: {})",
                    dir.display(),
                    words(&dir.join("cgroup.procs")).join(" ")
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_lines() {
        assert_eq!(cpu_max(0.5), "50000 100000");
        assert_eq!(cpu_max(2.0), "200000 100000");
        assert_eq!(cpu_max(0.2), "20000 100000");
        // The kernel's smallest quota is 1 ms.
        assert_eq!(cpu_max(0.001), "1000 100000");
    }

    #[test]
    fn io_lines() {
        let l = IoMax {
            device: "8:0".into(),
            requested: "/dev/sda".into(),
            rbps: Some(1 << 20),
            wbps: None,
            riops: None,
            wiops: Some(100),
        };
        assert_eq!(io_line(&l), "8:0 rbps=1048576 wbps=max riops=max wiops=100");
    }

    #[test]
    fn this_host_has_a_cgroup2_mount() {
        let m = cgroup2_mount().expect("no cgroup2 mount in /proc/self/mountinfo");
        assert!(is_cgroup2(&m), "{}", m.display());
        assert!(!is_cgroup2(Path::new("/")));
        assert!(default_root().starts_with(&m));
    }
}
