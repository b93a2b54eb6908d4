//! Per-thread seccomp filters (`--seccomp audit|strict`): each kind of monitor thread may
//! make only the syscalls it was seen to need, so a guest that takes over a thread through a
//! device bug finds almost nothing it can ask the kernel for.
//!
//! Each thread installs its kind's filter itself, before it does guest-influenced work
//! ([`enter`]); threads another crate starts (harts, device workers) do it through that
//! crate's thread-start hook, set by [`init`]. Filters stack: a thread started by an already
//! filtered thread is bound by both, so the main thread (which the riscv64 harts are started
//! from after it installed its own) also allows what its children need, and every kind allows
//! installing a further filter. Lists are in [`kinds`] (KVM ioctl requests in [`kvm`]);
//! `vme-vmm --print-seccomp` prints them (docs/seccomp.md is that output).
//!
//! strict: a forbidden syscall traps into a SIGSYS handler that names the thread kind and the
//! syscall on stderr and ends the monitor with [`EXIT_STATUS`]. audit: the kernel logs it
//! (`type=1326` audit records) and the syscall goes on.

mod kinds;
mod kvm;

pub use kinds::Kind;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
use std::cell::Cell;
use std::sync::OnceLock;
use vme_api::spec::SeccompMode;

/// The monitor's exit status after a strict filter stopped a forbidden syscall (distinct from
/// the 0..3 of main.rs, so a supervisor can tell a security event from a crash).
pub const EXIT_STATUS: i32 = 159;

/// Whether the strict filters are in force (set once by [`init`]).
static STRICT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True when the monitor runs with `--seccomp strict`: a request that needs a syscall the
/// filters refuse is then refused with an error instead of ending the monitor.
pub fn is_strict() -> bool {
    STRICT.load(std::sync::atomic::Ordering::Relaxed)
}

/// The compiled filter of each kind, indexed by `Kind as usize`; set once by [`init`].
static PROGRAMS: OnceLock<Vec<BpfProgram>> = OnceLock::new();

thread_local! {
    /// The calling thread's kind plus one once it installed its filter (0: none), read by the SIGSYS
    /// handler. Const-initialised without a destructor, so reading it there is a plain load.
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Compiles every kind's filter, installs the SIGSYS handler (strict) and the other crates'
/// thread-start hooks. Must run before the monitor starts any thread. Nothing for `off`.
pub fn init(mode: SeccompMode) -> Result<(), String> {
    let action = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Audit => SeccompAction::Log,
        SeccompMode::Strict => SeccompAction::Trap,
    };
    let mut programs = Vec::new();
    for kind in Kind::ALL {
        let filter = SeccompFilter::new(
            kind.rules()?,
            action.clone(),
            SeccompAction::Allow,
            std::env::consts::ARCH.try_into().map_err(|e| {
                format!("seccomp filters are not available on this architecture: {e}")
            })?,
        )
        .map_err(|e| format!("cannot build the seccomp filter of {kind} threads: {e}"))?;
        let program: BpfProgram = filter
            .try_into()
            .map_err(|e| format!("cannot compile the seccomp filter of {kind} threads: {e}"))?;
        programs.push(program);
    }
    if PROGRAMS.set(programs).is_err() {
        return Err("seccomp filters initialised twice (a bug in the monitor)".into());
    }
    if mode == SeccompMode::Strict {
        install_sigsys_handler()?;
        STRICT.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    vme_riscv::set_thread_start_hook(hook);
    vme_devices::set_thread_start_hook(hook);
    Ok(())
}

/// The other crates' thread-start hook: they name their threads' kind.
fn hook(kind: &'static str) {
    match kind {
        "vcpu" => enter(Kind::Vcpu),
        _ => enter(Kind::Device),
    }
}

/// Confines the calling thread to `kind`'s allow-list (nothing when the filters are off, or
/// when this thread already has that filter). A thread that cannot install its filter ends
/// the monitor: running unconfined when confinement was asked for is not an option.
pub fn enter(kind: Kind) {
    let Some(programs) = PROGRAMS.get() else {
        return;
    };
    if KIND.with(Cell::get) == kind as u8 + 1 {
        return;
    }
    if let Err(e) = seccompiler::apply_filter(&programs[kind as usize]) {
        eprintln!(
            "vme-vmm: cannot install the seccomp filter of {kind} threads: {e}; \
             run without --seccomp or on a kernel with seccomp filters"
        );
        std::process::exit(1);
    }
    KIND.with(|k| k.set(kind as u8 + 1));
    #[cfg(feature = "seccomp-drill")]
    drill(kind);
}

/// Test builds only (cargo feature `seccomp-drill`, off by default and never in a release
/// of the monitor): `VME_SECCOMP_DRILL=KIND:SYSCALL` makes the first thread of KIND make
/// SYSCALL with zero arguments right after its filter is in. Drill only syscalls that fail
/// harmlessly on null arguments (execve, mount, socket), not ptrace (PTRACE_TRACEME is 0).
#[cfg(feature = "seccomp-drill")]
fn drill(kind: Kind) {
    let Ok(want) = std::env::var("VME_SECCOMP_DRILL") else {
        return;
    };
    let Some((k, name)) = want.split_once(':') else {
        return;
    };
    if k != kind.name() {
        return;
    }
    if let Some(nr) = kinds::number(name) {
        // SAFETY: a raw syscall with zero (null) arguments; the filter is expected to stop
        // it, and the drilled syscalls fail on null arguments without changing anything.
        unsafe { libc::syscall(nr, 0, 0, 0, 0, 0, 0) };
    }
}

fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: a zeroed sigaction is valid; we fill in the handler, flags and an empty mask.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigsys;
    sa.sa_sigaction = handler as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa.sa_mask` is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: installs a handler for SIGSYS with a valid sigaction; no old action is wanted.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(format!(
            "cannot install the SIGSYS handler for --seccomp strict: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Offset of `si_syscall` in a SIGSYS siginfo on 64-bit Linux: signo, errno, code and
/// padding (16 bytes), then the `void *_call_addr` (8), then `int _syscall`.
const SI_SYSCALL_OFFSET: usize = 24;

/// Writes "vme-vmm: seccomp: thread KIND made forbidden syscall N (NAME)" (for an ioctl,
/// with " request 0x..." after it) and exits with
/// [`EXIT_STATUS`]. Async-signal-safe: no allocation or locks, only write(2) and _exit(2),
/// which every kind allows.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS (SA_SIGINFO); `si_syscall` is an
    // int at SI_SYSCALL_OFFSET of it, read unaligned to make no assumption.
    let nr =
        unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>()) };
    let mut line = Line::default();
    line.push(b"vme-vmm: seccomp: thread ");
    line.push(
        Kind::from_u8(KIND.with(Cell::get))
            .map_or("unconfined", Kind::name)
            .as_bytes(),
    );
    line.push(b" made forbidden syscall ");
    line.push_number(nr as i64);
    if let Some(name) = kinds::name(nr as i64) {
        line.push(b" (");
        line.push(name.as_bytes());
        line.push(b")");
    }
    if i64::from(nr) == libc::SYS_ioctl {
        if let Some(req) = ioctl_request(ctx) {
            line.push(b" request ");
            line.push_hex(req);
        }
    }
    line.push(b"\n");
    // SAFETY: writes our stack buffer to stderr, then ends the process; both are
    // async-signal-safe and allowed by every filter.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_STATUS);
    }
}

/// The request (second argument) of the ioctl a SIGSYS stopped, from the interrupted
/// registers: the kernel leaves the syscall's arguments in place.
#[cfg(target_arch = "x86_64")]
fn ioctl_request(ctx: *mut libc::c_void) -> Option<u64> {
    if ctx.is_null() {
        return None;
    }
    // SAFETY: with SA_SIGINFO the third handler argument is the interrupted context, a valid
    // ucontext_t; RSI holds a syscall's second argument on x86_64.
    let rsi =
        unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize] };
    Some(rsi as u64)
}

#[cfg(not(target_arch = "x86_64"))]
fn ioctl_request(_ctx: *mut libc::c_void) -> Option<u64> {
    None
}

/// A fixed stack buffer: the SIGSYS handler may not allocate.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_hex(&mut self, v: u64) {
        self.push(b"0x");
        let digits = b"0123456789abcdef";
        let mut started = false;
        for shift in (0..16).rev() {
            let d = ((v >> (shift * 4)) & 0xf) as usize;
            if d != 0 || started || shift == 0 {
                started = true;
                self.push(&digits[d..d + 1]);
            }
        }
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut v = n.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The allow-lists as Markdown (`vme-vmm --print-seccomp`; docs/seccomp.md).
pub fn describe() -> String {
    kinds::describe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_both_modes() {
        for action in [SeccompAction::Log, SeccompAction::Trap] {
            for kind in Kind::ALL {
                let rules = kind.rules().unwrap();
                let f = SeccompFilter::new(
                    rules,
                    action.clone(),
                    SeccompAction::Allow,
                    std::env::consts::ARCH.try_into().unwrap(),
                )
                .unwrap();
                let p: BpfProgram = f.try_into().unwrap();
                assert!(p.len() > 10, "{kind}");
            }
        }
    }

    #[test]
    fn the_handler_line_formats_numbers() {
        let mut l = Line::default();
        l.push_number(0);
        l.push(b" ");
        l.push_number(1234);
        l.push(b" ");
        l.push_number(-7);
        assert_eq!(&l.buf[..l.len], b"0 1234 -7");
        let mut l = Line::default();
        l.push_hex(0);
        l.push(b" ");
        l.push_hex(0xc008_ae88);
        assert_eq!(&l.buf[..l.len], b"0x0 0xc008ae88");
    }
}
