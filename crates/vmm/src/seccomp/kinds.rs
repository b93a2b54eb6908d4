//! The allow-list of each thread kind, derived from what the monitor was seen to call
//! (`strace -f` and `--seccomp audit` over riscv64 and x86_64 workloads: boot, virtio-blk,
//! vsock agent, console socket, pause/resume/snapshot/stop). A syscall is listed with the
//! argument values it may take where that matters (ioctl requests, socket families).

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use std::collections::BTreeMap;
use std::fmt;

/// The kinds of monitor thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The main thread: builds the VM, starts the others, waits for the end, tears down.
    Main = 0,
    /// vCPU threads (KVM vCPUs on x86_64, interpreted harts on riscv64): the guest's
    /// device accesses are handled on them.
    Vcpu,
    /// Device workers: virtio notification, receive (tap, vsock) and refill threads.
    Device,
    /// The control socket: its listener and connection threads (pause, snapshot, ...).
    Api,
    /// The console: the console socket's listener and input threads, the stdin pump.
    Console,
    /// The thread that turns SIGTERM/SIGINT into a stop.
    Signals,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Main,
        Kind::Vcpu,
        Kind::Device,
        Kind::Api,
        Kind::Console,
        Kind::Signals,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Main => "main",
            Kind::Vcpu => "vcpu",
            Kind::Device => "device",
            Kind::Api => "api",
            Kind::Console => "console",
            Kind::Signals => "signals",
        }
    }

    /// The kind whose `as u8` is `v`; kinds are numbered from 0 but the SIGSYS handler's
    /// thread-local uses 0 for "none", so it stores `kind + 1`.
    pub fn from_u8(v: u8) -> Option<Kind> {
        v.checked_sub(1)
            .and_then(|i| Kind::ALL.get(i as usize).copied())
    }

    /// The syscalls allowed whatever their arguments.
    fn plain(self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = BASE.to_vec();
        match self {
            // Harts (riscv64) are started from the main thread after it installed its own
            // filter, and a restart rebuilds devices and their workers: the main thread
            // allows what those children need as well as its own.
            Kind::Main => {
                v.extend(MAIN);
                v.extend(VCPU);
                v.extend(DEVICE);
            }
            Kind::Vcpu => v.extend(VCPU),
            Kind::Device => v.extend(DEVICE),
            Kind::Api => v.extend(API),
            Kind::Console => v.extend(CONSOLE),
            Kind::Signals => v.extend(SIGNALS),
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The ioctl requests allowed besides KVM's ([`Kind::kvm`]).
    fn ioctls(self) -> Vec<(u64, &'static str)> {
        let mut v = vec![(libc::FIONBIO, "FIONBIO"), (libc::FIOCLEX, "FIOCLEX")];
        match self {
            Kind::Main => {
                v.extend(TTY);
                v.extend(TUN);
            }
            Kind::Console => v.extend(TTY),
            Kind::Device => v.extend(TUN),
            // The guest's virtio-net driver negotiates its offloads on a vCPU.
            Kind::Vcpu => v.push((libc::TUNSETOFFLOAD, "TUNSETOFFLOAD")),
            _ => {}
        }
        v
    }

    /// The KVM ioctl requests allowed, each by number (see [`super::kvm`]).
    fn kvm(self) -> Vec<(u64, &'static str)> {
        super::kvm::requests(self)
    }

    /// Whether the thread may signal other threads of the monitor (vCPU kicks on pause and
    /// stop); every thread may still signal itself with SIGABRT (abort on a panic).
    fn kicks(self) -> bool {
        matches!(self, Kind::Main | Kind::Vcpu | Kind::Api | Kind::Signals)
    }

    /// Whether the thread may open Unix sockets (vsock backends, the clone announcer).
    fn unix_sockets(self) -> bool {
        matches!(self, Kind::Main | Kind::Vcpu | Kind::Device | Kind::Api)
    }

    /// The filter's rules: syscall number to its allowed argument patterns (none: any).
    pub fn rules(self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
        let mut map = BTreeMap::new();
        for name in self.plain() {
            let nr = number(name).ok_or_else(|| format!("unknown syscall {name} in a filter"))?;
            map.insert(nr, Vec::new());
        }
        for (name, rules) in self.conditional() {
            let nr = number(name).ok_or_else(|| format!("unknown syscall {name} in a filter"))?;
            let mut built = Vec::new();
            for conds in rules {
                let conds = conds
                    .into_iter()
                    .map(|(arg, op, value)| {
                        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("bad seccomp condition for {name}: {e}"))?;
                built.push(
                    SeccompRule::new(conds)
                        .map_err(|e| format!("bad seccomp rule for {name}: {e}"))?,
                );
            }
            map.insert(nr, built);
        }
        Ok(map)
    }

    /// Syscalls allowed only with some arguments: each rule a list of (argument index,
    /// comparison, value) that must all hold.
    #[allow(clippy::type_complexity)]
    fn conditional(self) -> Vec<(&'static str, Vec<Vec<(u8, SeccompCmpOp, u64)>>)> {
        use SeccompCmpOp::{Eq, MaskedEq};
        let no_exec = vec![vec![(2, MaskedEq(libc::PROT_EXEC as u64), 0)]];
        let ioctl: Vec<Vec<_>> = self
            .ioctls()
            .into_iter()
            .chain(self.kvm())
            .map(|(req, _)| vec![(1, Eq, req)])
            .collect();
        let mut tgkill = vec![vec![(2, Eq, libc::SIGABRT as u64)]];
        if self.kicks() {
            tgkill.push(vec![(2, Eq, libc::SIGRTMIN() as u64)]);
        }
        let mut v = vec![
            ("mmap", no_exec.clone()),
            ("mprotect", no_exec),
            (
                "prctl",
                vec![
                    vec![(0, Eq, libc::PR_SET_NAME as u64)],
                    vec![(0, Eq, libc::PR_SET_NO_NEW_PRIVS as u64)],
                ],
            ),
            (
                "seccomp",
                vec![vec![(0, Eq, libc::SECCOMP_SET_MODE_FILTER as u64)]],
            ),
            ("tgkill", tgkill),
            ("ioctl", ioctl),
        ];
        if self.unix_sockets() {
            v.push(("socket", vec![vec![(0, Eq, libc::AF_UNIX as u64)]]));
        }
        v
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What every thread needs: memory, locks, its own signal state, time, exiting, logging to
/// stderr (and the SIGSYS handler's write and _exit), installing a further filter.
const BASE: &[&str] = &[
    "brk",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "exit",
    "exit_group",
    "futex",
    "getpid",
    "getrandom",
    "gettid",
    "madvise",
    "mremap",
    "munmap",
    "nanosleep",
    "restart_syscall",
    "rseq",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sched_getaffinity",
    "sched_yield",
    "set_robust_list",
    "sigaltstack",
    "write",
];

/// Guest device work: disk I/O, vsock (a riscv64 hart polls the vsock device's host side
/// when the guest kicks it, and so accepts the clients waiting there) and console output (a
/// console log's rotation swaps its two open segments: renameat2, ftruncate), event waits.
const VCPU: &[&str] = &[
    "accept4",
    "connect",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_wait",
    "fallocate",
    "fdatasync",
    "fsync",
    "ftruncate",
    "lseek",
    "poll",
    "ppoll",
    "pread64",
    "preadv",
    "pwrite64",
    "pwritev",
    "read",
    "readv",
    "recvfrom",
    "recvmsg",
    "renameat2",
    "sendmsg",
    "sendto",
    "shutdown",
    "writev",
];

const DEVICE: &[&str] = &[
    "accept4",
    "connect",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_wait",
    "fallocate",
    "fdatasync",
    "fsync",
    "lseek",
    "poll",
    "ppoll",
    "pread64",
    "preadv",
    "pwrite64",
    "pwritev",
    "read",
    "readv",
    "recvfrom",
    "recvmsg",
    "sendmsg",
    "sendto",
    "shutdown",
    "writev",
];

/// Control requests: snapshots write directories of files (a diff snapshot resolves its
/// parent's path: readlink), clones and migration connect.
const API: &[&str] = &[
    "accept4",
    "clone",
    "clone3",
    "connect",
    "epoll_ctl",
    "epoll_wait",
    "fcntl",
    "fdatasync",
    "flock",
    "fstat",
    "fsync",
    "ftruncate",
    "getdents64",
    "lseek",
    "mkdir",
    "newfstatat",
    "openat",
    "poll",
    "pread64",
    "pwrite64",
    "read",
    "readlink",
    "readv",
    "recvfrom",
    "recvmsg",
    "rename",
    "sendmsg",
    "sendto",
    "setsockopt",
    "shutdown",
    "statx",
    "unlink",
    "writev",
];

const CONSOLE: &[&str] = &[
    "accept4", "clone", "clone3", "fcntl", "poll", "read", "readv", "recvfrom", "sendto",
    "shutdown", "writev",
];

const SIGNALS: &[&str] = &["rt_sigtimedwait"];

/// The main thread's own needs after its filter is in: waiting, tearing down (removing its
/// sockets), and a guest reboot with `--on-reboot restart` rebuilding the machine (which
/// makes the spec's paths absolute for snapshots: getcwd).
const MAIN: &[&str] = &[
    "bind",
    "clone",
    "clone3",
    "epoll_create1",
    "eventfd2",
    "fcntl",
    "flock",
    "fstat",
    "getcwd",
    "listen",
    "memfd_create",
    "newfstatat",
    "openat",
    "prlimit64",
    "statx",
    "unlink",
];

/// Terminal ioctls: raw mode for a stdio console.
const TTY: &[(u64, &str)] = &[
    (libc::TCGETS, "TCGETS"),
    (libc::TCSETS, "TCSETS"),
    (libc::TCSETSW, "TCSETSW"),
    (libc::TCSETSF, "TCSETSF"),
    (libc::TIOCGWINSZ, "TIOCGWINSZ"),
];

/// Tap ioctls (opened on the main thread; a restart opens them again).
const TUN: &[(u64, &str)] = &[
    (libc::TUNSETIFF, "TUNSETIFF"),
    (libc::TUNSETOFFLOAD, "TUNSETOFFLOAD"),
    (libc::TUNSETVNETHDRSZ, "TUNSETVNETHDRSZ"),
];

/// Syscall numbers by name: every syscall the filters name, and the ones escape drills try.
const TABLE: &[(&str, i64)] = &[
    ("accept4", libc::SYS_accept4),
    ("bind", libc::SYS_bind),
    ("brk", libc::SYS_brk),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("clone", libc::SYS_clone),
    ("clone3", libc::SYS_clone3),
    ("close", libc::SYS_close),
    ("connect", libc::SYS_connect),
    ("epoll_create1", libc::SYS_epoll_create1),
    ("epoll_ctl", libc::SYS_epoll_ctl),
    ("epoll_pwait", libc::SYS_epoll_pwait),
    ("epoll_wait", libc::SYS_epoll_wait),
    ("eventfd2", libc::SYS_eventfd2),
    ("execve", libc::SYS_execve),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
    ("fallocate", libc::SYS_fallocate),
    ("fcntl", libc::SYS_fcntl),
    ("fdatasync", libc::SYS_fdatasync),
    ("flock", libc::SYS_flock),
    ("fork", libc::SYS_fork),
    ("fstat", libc::SYS_fstat),
    ("fsync", libc::SYS_fsync),
    ("ftruncate", libc::SYS_ftruncate),
    ("futex", libc::SYS_futex),
    ("getcwd", libc::SYS_getcwd),
    ("getdents64", libc::SYS_getdents64),
    ("getpid", libc::SYS_getpid),
    ("getrandom", libc::SYS_getrandom),
    ("gettid", libc::SYS_gettid),
    ("ioctl", libc::SYS_ioctl),
    ("kill", libc::SYS_kill),
    ("listen", libc::SYS_listen),
    ("lseek", libc::SYS_lseek),
    ("madvise", libc::SYS_madvise),
    ("memfd_create", libc::SYS_memfd_create),
    ("mkdir", libc::SYS_mkdir),
    ("mmap", libc::SYS_mmap),
    ("mount", libc::SYS_mount),
    ("mprotect", libc::SYS_mprotect),
    ("mremap", libc::SYS_mremap),
    ("munmap", libc::SYS_munmap),
    ("nanosleep", libc::SYS_nanosleep),
    ("newfstatat", libc::SYS_newfstatat),
    ("open", libc::SYS_open),
    ("openat", libc::SYS_openat),
    ("poll", libc::SYS_poll),
    ("ppoll", libc::SYS_ppoll),
    ("prctl", libc::SYS_prctl),
    ("pread64", libc::SYS_pread64),
    ("preadv", libc::SYS_preadv),
    ("prlimit64", libc::SYS_prlimit64),
    ("ptrace", libc::SYS_ptrace),
    ("pwrite64", libc::SYS_pwrite64),
    ("pwritev", libc::SYS_pwritev),
    ("read", libc::SYS_read),
    ("readlink", libc::SYS_readlink),
    ("readv", libc::SYS_readv),
    ("recvfrom", libc::SYS_recvfrom),
    ("recvmsg", libc::SYS_recvmsg),
    ("rename", libc::SYS_rename),
    ("renameat2", libc::SYS_renameat2),
    ("restart_syscall", libc::SYS_restart_syscall),
    ("rseq", libc::SYS_rseq),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("rt_sigtimedwait", libc::SYS_rt_sigtimedwait),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("sched_yield", libc::SYS_sched_yield),
    ("seccomp", libc::SYS_seccomp),
    ("sendmsg", libc::SYS_sendmsg),
    ("sendto", libc::SYS_sendto),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("setsockopt", libc::SYS_setsockopt),
    ("shutdown", libc::SYS_shutdown),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("socket", libc::SYS_socket),
    ("statx", libc::SYS_statx),
    ("tgkill", libc::SYS_tgkill),
    ("unlink", libc::SYS_unlink),
    ("write", libc::SYS_write),
    ("writev", libc::SYS_writev),
];

pub fn number(name: &str) -> Option<i64> {
    TABLE.iter().find(|(n, _)| *n == name).map(|(_, nr)| *nr)
}

/// A syscall's name by number; no allocation (the SIGSYS handler calls it).
pub fn name(nr: i64) -> Option<&'static str> {
    TABLE.iter().find(|(_, n)| *n == nr).map(|(name, _)| *name)
}

/// The allow-lists as Markdown, with the count of syscalls per kind.
pub fn describe() -> String {
    let mut out = String::from(
        "# Monitor seccomp filters\n\n\
         Generated by `vme-vmm --print-seccomp` from crates/vmm/src/seccomp/kinds.rs and \
         kvm.rs; do not edit by hand.\n\n\
         `vme-vmm --seccomp audit|strict` (or `seccomp = \"strict\"` in a machine file) \
         installs one filter per thread kind. strict: a syscall outside the list ends the \
         monitor with status 159 and a line on stderr naming the thread kind and the \
         syscall. audit: the kernel logs it and it goes on. A thread started by a filtered \
         thread is bound by both filters. `ioctl` is allowed only with the listed requests: \
         each KVM request by its exact number, none by KVM's type byte alone.\n\n\
         | thread kind | syscalls allowed | KVM ioctls allowed |\n|---|---|---|\n",
    );
    for kind in Kind::ALL {
        let n = kind.plain().len() + kind.conditional().len();
        out += &format!("| {kind} | {n} | {} |\n", kind.kvm().len());
    }
    out += &format!(
        "\nRestoring a snapshot or an incoming migration sets saved state before the main \
         thread installs its filter; these KVM requests are therefore allowed to no thread: \
         {}.\n",
        super::kvm::RESTORE_ONLY
            .iter()
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    );
    for kind in Kind::ALL {
        out += &format!("\n## {kind}\n\n");
        let mut lines: Vec<String> = kind.plain().iter().map(|s| format!("- `{s}`")).collect();
        let ioctls: Vec<&str> = kind.ioctls().iter().map(|(_, n)| *n).collect();
        for (name, _) in kind.conditional() {
            lines.push(match name {
                "mmap" | "mprotect" => format!("- `{name}` without PROT_EXEC"),
                "prctl" => "- `prctl` PR_SET_NAME, PR_SET_NO_NEW_PRIVS".into(),
                "seccomp" => "- `seccomp` SECCOMP_SET_MODE_FILTER".into(),
                "tgkill" if kind.kicks() => "- `tgkill` SIGABRT, SIGRTMIN (vCPU kicks)".into(),
                "tgkill" => "- `tgkill` SIGABRT".into(),
                "socket" => "- `socket` AF_UNIX".into(),
                "ioctl" if !kind.kvm().is_empty() => format!(
                    "- `ioctl` {}, and the KVM requests below",
                    ioctls.join(", ")
                ),
                "ioctl" => format!("- `ioctl` {}", ioctls.join(", ")),
                other => format!("- `{other}` (with argument checks)"),
            });
        }
        lines.sort();
        out += &lines.join("\n");
        out += "\n";
        let kvm = kind.kvm();
        if !kvm.is_empty() {
            out += &format!("\nKVM ioctl requests ({}):\n\n", kvm.len());
            for (nr, name) in kvm {
                out += &format!("- `{name}` ({nr:#x})\n");
            }
        }
    }
    out
}
