//! `--jail DIR` (`[jail]`): the monitor confines itself before the guest runs, in this order
//! (each step needs the privileges the later ones take away):
//!
//! 1. a new PID namespace, then a fork: the child is PID 1 of it and runs the VM; the parent
//!    (the pid the supervisor sees) only waits for it, forwards SIGTERM/SIGINT/SIGHUP, and
//!    exits with its status. The child dies with the parent (`PR_SET_PDEATHSIG`), so a
//!    `kill -9` of the supervised pid still ends the VM;
//! 2. the child joins the jail's network namespace, if one is given, and opens the VM's taps
//!    there while it still may create one (CAP_NET_ADMIN): no `/dev/net/tun` in the jail;
//! 3. new mount, IPC and UTS namespaces; DIR becomes the root (`pivot_root`, the old root
//!    detached) holding only: the VM's kernel, initrd, snapshot and base images (read-only
//!    binds), its volumes (read-write binds), the directories of its sockets and console log
//!    (read-write binds, so the host reaches the sockets at their usual paths), a private
//!    /dev (tmpfs) with /dev/kvm (x86_64, owned by the jail's uid) and /dev/urandom, and a
//!    /proc that shows only the jail's own processes. Every path is where it is on the host,
//!    so the spec needs no rewriting; the root itself is read-only;
//! 4. rlimits (open files sized to the devices, no core dumps, few processes);
//! 5. the jail's gid and uid, no supplementary groups, every capability set emptied
//!    (bounding and ambient too), `no_new_privs`.
//!
//! The seccomp filters come after all of this (main.rs): they do not allow any of it.

mod mounts;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use vme_api::jail::JailSpec;
use vme_api::{Arch, MachineSpec, SerialSpec};

/// Confines this process as `jail` says (see the module doc). Returns in the jailed child
/// only; the parent waits for it and exits with its status. `spec`'s paths are made absolute
/// (the jail's working directory is its root). `restore`: the snapshot directory a restore
/// reads from.
pub fn enter(
    jail: &JailSpec,
    spec: &mut MachineSpec,
    restore: Option<&Path>,
) -> Result<(), String> {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "--jail needs root (it creates namespaces and mounts, then drops to \
                    --jail-uid): run vme-vmm as root, or without --jail"
                .into(),
        );
    }
    single_threaded()?;
    absolutize(spec)?;
    let layout = mounts::Layout::of(spec, restore);
    // Opened before anything changes, so a bad path is reported while it still can be.
    let netns = match &jail.netns {
        Some(p) => Some(std::fs::File::open(p).map_err(|e| {
            format!(
                "network namespace {}: {e}: create it first (ip netns add NAME)",
                p.display()
            )
        })?),
        None => None,
    };
    std::fs::create_dir_all(&jail.dir).map_err(|e| {
        format!(
            "cannot create the jail directory {}: {e}",
            jail.dir.display()
        )
    })?;
    check(
        // SAFETY: unshare(2) with a flag; it changes only which namespace our children get.
        unsafe { libc::unshare(libc::CLONE_NEWPID) },
        "unshare(CLONE_NEWPID)",
    )?;
    let (alive_r, alive_w) = pipe()?;
    // SAFETY: the process is single-threaded (checked above), so the child gets a consistent
    // copy of every lock and allocation; it continues as the VM's monitor.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid > 0 {
        drop(alive_r);
        keeper(pid, jail, alive_w);
    }
    drop(alive_w);
    in_child(jail, spec, &layout, netns, alive_r)
}

/// The jailed child's steps 2 to 5. An error here ends the child with status 1 (through
/// main), which the parent passes on.
fn in_child(
    jail: &JailSpec,
    spec: &MachineSpec,
    layout: &mounts::Layout,
    netns: Option<std::fs::File>,
    alive: OwnedFd,
) -> Result<(), String> {
    check(
        // SAFETY: prctl(2) with integer arguments: a parent that dies during the setup takes
        // us along (set again after the credentials change, which clears it).
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
        "PR_SET_PDEATHSIG",
    )?;
    retitle();
    if let Some(ns) = netns {
        check(
            // SAFETY: setns(2) with a descriptor we own; it moves only this process.
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            "setns(the jail's network namespace)",
        )?;
    }
    for net in &spec.nets {
        crate::taps::open(&net.tap).map_err(|e| format!("tap {}: {e}", net.tap))?;
    }
    check(
        // SAFETY: unshare(2) with flags; it changes only this process's namespaces.
        unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) },
        "unshare(mount, IPC, UTS namespaces)",
    )?;
    let host = b"vme-jail";
    check(
        // SAFETY: sethostname(2) reads `host.len()` bytes from a live buffer; our own UTS
        // namespace, so the host's name is untouched.
        unsafe { libc::sethostname(host.as_ptr().cast(), host.len()) },
        "sethostname",
    )?;
    mounts::build(&jail.dir, layout, jail.uid, jail.gid)?;
    limits(spec)?;
    drop_privileges(jail.uid, jail.gid)?;
    check(
        // SAFETY: prctl(2) with integer arguments; asks for SIGKILL when our parent exits.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
        "PR_SET_PDEATHSIG",
    )?;
    // The parent may have died before the line above (the death signal is set only now:
    // a change of credentials clears it): its end of the pipe is then closed.
    let mut p = libc::pollfd {
        fd: alive.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd that outlives the call; a zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    if r != 0 {
        // SAFETY: _exit(2) ends the process at once; nothing of ours needs to run.
        unsafe { libc::_exit(1) };
    }
    drop(alive);
    log::info!(
        "jailed in {} as {}:{}",
        jail.dir.display(),
        jail.uid,
        jail.gid
    );
    Ok(())
}

/// Renames the jailed child in /proc/PID/cmdline to `vme-vmm (jailed)`: the keeper alone
/// keeps the command line that names the VM's machine file, so whoever looks for a VM's
/// monitor by it (the daemon after a restart, `ps`, scripts) finds one process per VM, the
/// one to supervise. Best effort: without it, both processes carry the same line.
fn retitle() {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command (which may hold spaces); arg_start and arg_end are the
    // 48th and 49th of the line, the 46th and 47th after the command.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<usize> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let (Some(&start), Some(&end)) = (f.get(45), f.get(46)) else {
        return;
    };
    let title = b"vme-vmm (jailed)";
    if start == 0 || end <= start + title.len() {
        return;
    }
    // SAFETY: [start, end) is this process's argument area on its initial stack, which the
    // kernel reports for us and which stays mapped for the life of the process. Nothing
    // reads it after startup (the flags were parsed into owned values before any jail),
    // so overwriting it with a shorter NUL-terminated title and zeros is sound.
    unsafe {
        std::ptr::write_bytes(start as *mut u8, 0, end - start);
        std::ptr::copy_nonoverlapping(title.as_ptr(), start as *mut u8, title.len());
    }
}

/// The parent after the fork: waits for the jailed child and ends with its status. It keeps
/// no privilege: it only forwards termination signals and reaps.
fn keeper(child: libc::pid_t, jail: &JailSpec, alive: OwnedFd) -> ! {
    CHILD.store(child, Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs a handler that only calls kill(2), which is async-signal-safe.
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
    // No core files, no privileges: the keeper holds nothing worth stealing either.
    let _ = set_limit(libc::RLIMIT_CORE, 0);
    if let Err(e) = drop_privileges(jail.uid, jail.gid) {
        eprintln!("vme-vmm: jail keeper: {e}");
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) on our own child with a valid out-pointer.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(1);
        }
    }
    drop(alive);
    if libc::WIFEXITED(status) {
        std::process::exit(libc::WEXITSTATUS(status));
    }
    let sig = libc::WTERMSIG(status);
    // The supervisor sees the same death: the signal again, by default action.
    // SAFETY: resets one signal's disposition and sends it to ourselves.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::kill(libc::getpid(), sig);
    }
    std::process::exit(128 + sig);
}

/// The jailed child's host pid, for [`forward`].
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe; the pid is our own child's.
        unsafe { libc::kill(child, sig) };
    }
}

/// A fork copies only the calling thread: one started earlier would be missing in the child
/// with whatever locks it held.
fn single_threaded() -> Result<(), String> {
    let n = std::fs::read_dir("/proc/self/task")
        .map_err(|e| format!("cannot count the monitor's threads in /proc/self/task: {e}"))?
        .count();
    if n != 1 {
        return Err(format!(
            "the monitor already runs {n} threads; it can only be jailed before any start \
             (with --migrate-listen, jail the receiving side from outside)"
        ));
    }
    Ok(())
}

/// The spec's paths, resolved (no symlink, `.` or `..` left): each is bound at that very path
/// inside the jail, where the working directory is the root and host symlinks may point
/// nowhere. A socket or log that does not exist yet is resolved through its directory.
fn absolutize(spec: &mut MachineSpec) -> Result<(), String> {
    fn abs(p: &mut PathBuf) -> Result<(), String> {
        let real = match std::fs::canonicalize(&*p) {
            Ok(r) => r,
            Err(_) => {
                let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                    return Err(format!("path {} names no file", p.display()));
                };
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                std::fs::canonicalize(dir)
                    .map_err(|e| format!("directory of {}: {e}: create it first", p.display()))?
                    .join(name)
            }
        };
        *p = real;
        Ok(())
    }
    abs(&mut spec.kernel)?;
    if let Some(p) = &mut spec.initrd {
        abs(p)?;
    }
    if let Some(p) = &mut spec.control_socket {
        abs(p)?;
    }
    match &mut spec.serial {
        SerialSpec::File(p) => abs(p)?,
        SerialSpec::Socket { path, log, .. } => {
            abs(path)?;
            if let Some(l) = log {
                abs(l)?;
            }
        }
        SerialSpec::Stdio | SerialSpec::None => {}
    }
    for d in &mut spec.disks {
        abs(&mut d.path)?;
        if let Some(b) = &mut d.base {
            abs(b)?;
        }
    }
    if let Some(v) = &mut spec.vsock {
        abs(&mut v.uds)?;
    }
    Ok(())
}

/// rlimits: open files sized to the VM's devices (each disk, tap and queue takes a few, a
/// vsock device one per connection), no core dumps (guest memory would land in them), and a
/// cap on processes (threads count) for the jail's uid.
fn limits(spec: &MachineSpec) -> Result<(), String> {
    let devices = (spec.disks.len() + spec.nets.len()) as u64;
    let vsock = if spec.vsock.is_some() { 1024 } else { 0 };
    let files = 256 + 32 * devices + 16 * spec.vcpus as u64 + vsock;
    set_limit(libc::RLIMIT_NOFILE, files)?;
    set_limit(libc::RLIMIT_CORE, 0)?;
    // vCPU threads, device workers, console and control connections.
    set_limit(libc::RLIMIT_NPROC, 512 + 2 * spec.vcpus as u64)?;
    Ok(())
}

fn set_limit(which: libc::__rlimit_resource_t, value: u64) -> Result<(), String> {
    let r = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit(2) reads one valid rlimit.
    check(unsafe { libc::setrlimit(which, &r) }, "setrlimit")
}

/// Step 5: the jail's ids, and nothing else: no supplementary groups, no capability in any
/// set, no way to gain one back (no_new_privs also keeps setuid binaries inert).
fn drop_privileges(uid: u32, gid: u32) -> Result<(), String> {
    // The bounding set needs CAP_SETPCAP to shrink: before the uid changes.
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(63);
    for cap in 0..=last {
        // SAFETY: prctl(2) with integer arguments. EINVAL for caps this kernel lacks.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(format!(
                "PR_CAPBSET_DROP {cap}: {}",
                io::Error::last_os_error()
            ));
        }
    }
    // SAFETY: setgroups(2) with an empty list (a null pointer and a zero length).
    let rc = unsafe { libc::setgroups(0, std::ptr::null()) };
    check(rc, "setgroups")?;
    // SAFETY: setresgid(2) with plain ids.
    let rc = unsafe { libc::setresgid(gid, gid, gid) };
    check(rc, "setresgid")?;
    // SAFETY: setresuid(2) with plain ids.
    let rc = unsafe { libc::setresuid(uid, uid, uid) };
    check(rc, "setresuid")?;
    // A uid change from 0 clears the permitted and effective sets; inheritable and ambient
    // are cleared here explicitly.
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    check(
        // SAFETY: capset(2) reads a v3 header and two data structs, all live for the call.
        unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as i32 },
        "capset",
    )?;
    check(
        // SAFETY: prctl(2) with integer arguments.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        },
        "PR_CAP_AMBIENT_CLEAR_ALL",
    )?;
    check(
        // SAFETY: prctl(2) with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "PR_SET_NO_NEW_PRIVS",
    )?;
    // SAFETY: the getters take no arguments and cannot fail.
    let (ru, rg) = unsafe { (libc::getuid(), libc::getgid()) };
    if (ru, rg) != (uid, gid) {
        return Err(format!("still {ru}:{rg} after dropping to {uid}:{gid}"));
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    check(
        // SAFETY: pipe2(2) writes two descriptors into a live array.
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        "pipe2",
    )?;
    // SAFETY: the kernel just gave us these descriptors; nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(crate) fn check(rc: i32, what: &str) -> Result<(), String> {
    if rc < 0 {
        return Err(format!("{what}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether the VM needs /dev/kvm (and the host's PVM marker).
fn uses_kvm(spec: &MachineSpec) -> bool {
    spec.arch == Arch::X86_64
}
