//! One cgroup per VM: `ROOT/vm-NAME` (ROOT is the `cgroup_root` setting, by default
//! `vme.slice` under the host's cgroup2 mount). The monitor enters it between fork and exec,
//! so none of the guest's code runs outside it; its limits are the CPU allowance (else the
//! VM's vCPU count), memory (guest memory plus the monitor's allowance, no swap) and io
//! when the VM asks for it. The cgroups are removed once the monitor has exited.
//!
//! Each controller is used where the host offers it ([`v1`] lists the files):
//! - cgroup v2 when the cgroup2 hierarchy at ROOT hands it down (a unified host);
//! - else a cgroup v1 hierarchy that carries it (a hybrid or v1 host, found in
//!   /proc/self/mountinfo): the VM gets the same relative path in it (`vme.slice/vm-NAME`
//!   under `/sys/fs/cgroup/memory`, ...) and the monitor joins that cgroup too. With the
//!   cpu controller in v1 it also joins cpuacct, whose counters accounting reads where there
//!   is no cgroup v2 directory.
//! - else the limit cannot be enforced: one the VM asked for (`cpu_allowance`, `io_max`)
//!   fails the start; the implicit ones (memory, the default CPU quota) fail it only with
//!   `require_controllers`.
//!
//! No setting picks the version: per controller, v2 where it exists is what the host's
//! administrator chose; v1 is used only for what v2 lacks.
//!
//! In a v1 hierarchy the VMs' slice sits at the same path below the hierarchy's root as in
//! v2, not below the daemon's own v1 cgroup (a service or container cgroup such as
//! `memory:/process_api/...`): monitors outlive the daemon by design, so the limits of
//! the daemon's cgroup are not theirs, and a service manager that empties that cgroup on
//! a restart of vmed must not take the VMs with it.

mod apply;
mod counters;
mod mounts;
pub mod v1;
mod weight;

use apply::apply;
pub use apply::cpu_max;
pub use counters::{cpu_usage, memory_usage, oom_killed};
pub use mounts::Mounts;
pub use weight::rebalance_above;

use crate::limits::{IoMax, VmLimits};
use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `statfs` magic of a cgroup2 filesystem.
const CGROUP2_MAGIC: i64 = 0x6367_7270;
/// `cpu.max` and `cpu.cfs_period_us` period, µs (the kernel's default).
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
    Mounts::read().v2
}

/// The default `cgroup_root`: `vme.slice` under the cgroup2 mount (`/sys/fs/cgroup` on a
/// unified host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn default_root() -> PathBuf {
    cgroup2_mount()
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
        .join("vme.slice")
}

/// A controller as cgroup v2 names it, its v1 name, and what it enforces.
const CONTROLLERS: [(&str, &str, &str); 3] = [
    ("cpu", "cpu", "the CPU allowance"),
    ("memory", "memory", "the memory limit"),
    ("io", "blkio", "io_max"),
];

/// Where a controller's limits go.
#[derive(Debug, Clone, PartialEq)]
enum Via {
    V2,
    /// The v1 hierarchy's mount.
    V1(PathBuf),
    Missing,
}

/// Where controller `v2name` would be used for cgroups under `root`, from what the cgroup2
/// mount offers (its root's `cgroup.controllers`) and the v1 mounts.
fn via(m: &Mounts, root: &Path, v2name: &str, v1name: &str) -> Via {
    let on_v2 = m.v2.as_ref().is_some_and(|v2| {
        root.starts_with(v2)
            && words(&v2.join("cgroup.controllers"))
                .iter()
                .any(|c| c == v2name)
    });
    match (on_v2, m.v1_for(v1name)) {
        (true, _) => Via::V2,
        (false, Some(h)) => Via::V1(h.path.clone()),
        (false, None) => Via::Missing,
    }
}

/// The daemon's startup note: which cgroup version enforces each limit on this host, and
/// what happens to limits no hierarchy can enforce.
pub fn startup_note(cfg: &CgroupConfig) -> Option<String> {
    if !cfg.enabled {
        return None;
    }
    let m = Mounts::read();
    if m.relative(&cfg.root).is_none() {
        return Some(format!(
            "cgroup_root {} is under no cgroup mount of this host (cgroup2: {}, v1: {}): every \
             start will fail until it is, or cgroups = false",
            cfg.root.display(),
            m.v2.as_ref()
                .map_or("none".into(), |p| p.display().to_string()),
            m.v1.len()
        ));
    }
    let mut missing = Vec::new();
    let each: Vec<String> = CONTROLLERS
        .iter()
        .map(|(v2, v1, what)| match via(&m, &cfg.root, v2, v1) {
            Via::V2 => format!("{v2}: cgroup v2"),
            Via::V1(p) => format!("{v2}: cgroup v1 at {}", p.display()),
            Via::Missing => {
                missing.push(*what);
                format!("{v2}: none")
            }
        })
        .collect();
    let mut note = format!("cgroups under {}: {}", cfg.root.display(), each.join(", "));
    if !missing.is_empty() {
        note.push_str(&format!(
            "; no hierarchy offers {}: VMs asking for it cannot start{}",
            missing.join(", "),
            if cfg.require_controllers {
                ", and with require_controllers no VM can"
            } else {
                "; the implicit limits are skipped"
            }
        ));
    }
    Some(note)
}

/// The cgroup of VM `name` (in v2, or the name its v1 cgroups mirror).
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

/// Writes `value` to a cgroup file (one write: the kernel takes each write as a whole).
fn write(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    let p = dir.join(file);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .map_err(|e| format!("cannot open {}: {e}", p.display()))?;
    f.write_all(value.as_bytes())
        .map_err(|e| format!("the kernel refused {value:?} in {}: {e}", p.display()))
}

/// Every directory VM cgroup `dir` has or may have: itself when it is a cgroup v2 one, and
/// its mirror in each v1 hierarchy.
pub fn locations(dir: &Path) -> Vec<PathBuf> {
    locations_in(dir, &Mounts::read())
}

/// [`locations`] in the mount table `m`.
fn locations_in(dir: &Path, m: &Mounts) -> Vec<PathBuf> {
    let mut all = Vec::new();
    if m.v2.as_ref().is_some_and(|v2| dir.starts_with(v2)) {
        all.push(dir.to_path_buf());
    }
    if let Some(rel) = m.relative(dir) {
        all.extend(m.v1.iter().map(|h| h.path.join(&rel)));
    }
    all
}

/// VM cgroup `dir`'s directory in the v1 hierarchy that carries `controller`, if it exists.
fn v1_dir(dir: &Path, controller: &str) -> Option<PathBuf> {
    let m = Mounts::read();
    let d = m.v1_for(controller)?.path.join(m.relative(dir)?);
    d.is_dir().then_some(d)
}

/// A VM's cgroups made ready for its monitor.
pub struct Prepared {
    /// Its cgroup v2 (or, without one, the path its v1 cgroups mirror): what [`remove`]
    /// takes.
    pub dir: PathBuf,
    /// `cgroup.procs` of each of its cgroups (v2 and v1), open for the child to write
    /// itself into.
    procs: Vec<fs::File>,
    /// Where each limit is enforced, for the monitor's log.
    pub placed: Vec<String>,
    /// Limits that could not be applied (their controller is missing), for the log.
    pub skipped: Vec<String>,
}

impl Prepared {
    /// The descriptors the `pre_exec` hook writes "0" to ([`enter`]).
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Makes `cmd`'s child enter these cgroups before it executes anything.
    pub fn attach(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let fds = self.procs_fds();
        // SAFETY: the hook runs in the forked child before exec and only iterates a vector
        // allocated before the fork and calls write(2), which is async-signal-safe; the fds
        // stay open in the parent (in `self`) until the spawn has returned.
        unsafe {
            cmd.pre_exec(move || fds.iter().try_for_each(|fd| enter(*fd)));
        }
    }
}

/// VM `vm`'s cgroups made ready when cgroups are on; where each limit went and those it had
/// to skip are noted in the monitor's `log`.
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
        &vm.key,
        vm.spec.vcpus,
        vm.spec.memory.bytes(),
        &vm.limits,
    )?;
    let _ = writeln!(log, "vmed: cgroup limits: {}", g.placed.join("; "));
    if !g.skipped.is_empty() {
        let _ = writeln!(
            log,
            "vmed: limits not enforced (no cgroup hierarchy offers their controller): {}",
            g.skipped.join(", ")
        );
    }
    Ok(Some(g))
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `fd` ("0" is the
/// writer, in v2 and v1 alike). Runs in the forked child before exec: only
/// async-signal-safe calls (one write).
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

/// Removes the cgroups `made` during a failed prepare (they hold no process yet).
fn undo(made: &[PathBuf]) {
    for d in made.iter().rev() {
        let _ = fs::remove_dir(d);
    }
}

/// Creates (or reuses empty leftovers of) VM `name`'s cgroups and sets its limits.
pub fn prepare(
    cfg: &CgroupConfig,
    name: &str,
    vcpus: u32,
    guest_memory: u64,
    limits: &VmLimits,
) -> Result<Prepared, String> {
    let m = Mounts::read();
    let hint = "set cgroup_root to a directory under the host's cgroup2 mount (or, on a host \
                without one, beside its cgroup v1 mounts), or cgroups = false to run VMs \
                without cgroups";
    let rel = m.relative(&cfg.root).ok_or_else(|| {
        format!(
            "cgroup_root {} is under no cgroup mount of this host; {hint}",
            cfg.root.display()
        )
    })?;
    let dir = vm_path(&cfg.root, name);
    let mut made = Vec::new();
    let mut procs = Vec::new();
    let mut v2_offered = Vec::new();
    if let Some(v2) = m.v2.as_ref().filter(|v2| cfg.root.starts_with(v2)) {
        let mut wanted = vec!["cpu", "memory"];
        if !limits.io_max.is_empty() {
            wanted.push("io");
        }
        v2_root(&cfg.root, v2, &wanted, hint)?;
        if v1::create(&dir)? {
            made.push(dir.clone());
        }
        v2_offered = words(&dir.join("cgroup.controllers"));
    }
    let mut result = apply(
        cfg,
        &dir,
        &rel,
        name,
        &m,
        &v2_offered,
        (vcpus, guest_memory),
        limits,
        &mut made,
    );
    if let Ok(dirs) = &result {
        let mut joined: Vec<&PathBuf> = Vec::new();
        if m.v2.as_ref().is_some_and(|v2| dir.starts_with(v2)) {
            joined.push(&dir);
        }
        joined.extend(&dirs.v1);
        for d in joined {
            match fs::OpenOptions::new()
                .write(true)
                .open(d.join("cgroup.procs"))
            {
                Ok(f) => procs.push(f),
                Err(e) => {
                    result = Err(format!("cannot open {}/cgroup.procs: {e}", d.display()));
                    break;
                }
            }
        }
    }
    if result.is_ok() {
        if let Err(e) = rebalance_above(&dir, &m) {
            result = Err(e);
        }
    }
    match result {
        Ok(a) => Ok(Prepared {
            dir,
            procs,
            placed: a.placed,
            skipped: a.skipped,
        }),
        Err(e) => {
            undo(&made);
            Err(e)
        }
    }
}

/// Makes `root` a cgroup v2 directory whose levels from the mount down hand the `wanted`
/// controllers they offer on to their children.
fn v2_root(root: &Path, mount: &Path, wanted: &[&str], hint: &str) -> Result<(), String> {
    fs::create_dir_all(root).map_err(|e| {
        format!(
            "cannot create the cgroup {}: {e}; run vmed as root, or {hint}",
            root.display()
        )
    })?;
    if !is_cgroup2(root) {
        return Err(format!(
            "{} is not a cgroup v2 directory; {hint}",
            root.display()
        ));
    }
    let mut levels: Vec<&Path> = root
        .ancestors()
        .take_while(|a| a.starts_with(mount))
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
    Ok(())
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

/// Whether process `pid` is in VM cgroup `dir` (from /proc/PID/cgroup: its v2 line, or on a
/// host without a cgroup v2 directory for it, a v1 line).
pub fn contains(dir: &Path, pid: u32) -> bool {
    let m = Mounts::read();
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    if let Some(rel) = m.v2.as_ref().and_then(|v2| dir.strip_prefix(v2).ok()) {
        let want = format!("0::/{}", rel.display());
        return text.lines().any(|l| l.trim_end() == want);
    }
    let Some(rel) = m.relative(dir) else {
        return false;
    };
    let want = format!("/{}", rel.display());
    text.lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .any(|p| p.trim_end() == want)
}

/// Removes VM cgroup `dir` and its v1 mirrors once their processes are gone (an exited
/// monitor leaves them within moments; v1 refuses the removal until then). Missing ones are
/// fine.
pub fn remove(dir: &Path) -> Result<(), String> {
    let m = Mounts::read();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut failed = Vec::new();
    for d in locations_in(dir, &m) {
        loop {
            match fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    failed.push(format!(
                        "cannot remove the cgroup {}: {e} (pids left: {})",
                        d.display(),
                        words(&d.join("cgroup.procs")).join(" ")
                    ));
                    break;
                }
            }
        }
    }
    if let Err(e) = rebalance_above(dir, &m) {
        failed.push(e);
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// Removes VM cgroup `dir` and its v1 mirrors where they are empty, at once (the leftovers
/// of a monitor that is gone; a live one keeps its cgroups).
pub fn remove_empty(dir: &Path) {
    for d in locations(dir) {
        let _ = fs::remove_dir(d);
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
        assert_eq!(apply::cpu_quota(0.5), 50_000);
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

    #[test]
    fn a_vm_cgroup_is_mirrored_in_each_v1_hierarchy() {
        let m = Mounts::read();
        let Some(v2) = &m.v2 else { return };
        let dir = v2.join("vme.slice/vm-a");
        let all = locations(&dir);
        assert_eq!(all[0], dir);
        for h in &m.v1 {
            assert!(all.contains(&h.path.join("vme.slice/vm-a")), "{all:?}");
        }
        assert_eq!(all.len(), 1 + m.v1.len());
    }
}
