//! Making a vCPU leave `KVM_RUN` promptly from another thread (pause, stop).
//!
//! A kick sets `immediate_exit` in the vCPU's `kvm_run` page — so a vCPU about to enter the
//! guest returns at once — and, if the vCPU thread is inside `KVM_RUN`, sends it a real-time
//! signal whose handler does nothing: the signal alone makes `KVM_RUN` return `EINTR`. The
//! handler is installed without `SA_RESTART`, so the ioctl is not restarted.

use crate::{HypervisorError, Result};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub(crate) fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Installs the kick signal's handler once per process.
pub(crate) fn install_kick_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: an all-zero sigaction is a valid value to fill in (empty mask, no flags).
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = noop_handler as *const () as libc::sighandler_t;
        // No SA_RESTART: the whole point is that KVM_RUN returns EINTR.
        act.sa_flags = 0;
        // SAFETY: `act` is initialised; the handler is async-signal-safe (it does nothing).
        let rc = unsafe { libc::sigaction(kick_signal(), &act, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    });
    r.map_err(|e| HypervisorError::Signal(std::io::Error::from_raw_os_error(e)))
}

/// What a kick needs to reach one vCPU; shared by the vCPU and its kickers.
pub(crate) struct KickTarget {
    state: Mutex<KickState>,
}

struct KickState {
    /// `kvm_run.immediate_exit`; null once the vCPU (and its mapping) is gone.
    immediate_exit: *mut u8,
    /// The thread currently inside `KVM_RUN` for this vCPU.
    thread: Option<libc::pthread_t>,
}

// SAFETY: the pointer is only dereferenced under the mutex and is nulled (under the same
// mutex) before the mapping it points into is unmapped, so moving it between threads is sound.
unsafe impl Send for KickState {}

impl KickTarget {
    pub(crate) fn new(immediate_exit: *mut u8) -> Arc<Self> {
        Arc::new(KickTarget {
            state: Mutex::new(KickState {
                immediate_exit,
                thread: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, KickState> {
        // Every critical section only assigns fields: a panicked holder leaves them whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the calling thread as the one about to enter `KVM_RUN`.
    pub(crate) fn entering(&self) {
        // SAFETY: pthread_self has no preconditions.
        self.lock().thread = Some(unsafe { libc::pthread_self() });
    }

    pub(crate) fn left(&self) {
        self.lock().thread = None;
    }

    /// Clears a consumed kick (called by the vCPU thread after `KVM_RUN` returned `EINTR`).
    pub(crate) fn clear(&self) {
        let state = self.lock();
        if let Some(flag) = flag(&state) {
            flag.store(0, Ordering::SeqCst);
        }
    }

    /// Makes the next `KVM_RUN` return at once (after completing a pending exit).
    pub(crate) fn arm(&self) {
        let state = self.lock();
        if let Some(flag) = flag(&state) {
            flag.store(1, Ordering::SeqCst);
        }
    }

    /// Called when the vCPU is dropped: later kicks do nothing.
    pub(crate) fn detach(&self) {
        let mut state = self.lock();
        state.immediate_exit = std::ptr::null_mut();
        state.thread = None;
    }

    fn kick(&self) {
        let state = self.lock();
        if let Some(flag) = flag(&state) {
            flag.store(1, Ordering::SeqCst);
        }
        if let Some(thread) = state.thread {
            // SAFETY: `thread` is inside (or about to enter) KVM_RUN and clears itself from
            // the state under this mutex before it can exit, so it is alive; the signal's
            // handler is installed (a Vcpu is only created after `install_kick_handler`).
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

fn flag<'a>(state: &'a MutexGuard<'_, KickState>) -> Option<&'a AtomicU8> {
    if state.immediate_exit.is_null() {
        return None;
    }
    // SAFETY: non-null means the vCPU's kvm_run mapping is still mapped (see `detach`); the
    // byte is only ever accessed atomically by us, and the kernel reads it at KVM_RUN entry.
    Some(unsafe { AtomicU8::from_ptr(state.immediate_exit) })
}

/// Makes one vCPU return from `KVM_RUN` promptly with [`crate::VcpuExit::Interrupted`].
/// Cloneable and usable from any thread; kicking a vCPU that is gone does nothing.
#[derive(Clone)]
pub struct Kicker {
    target: Arc<KickTarget>,
}

impl Kicker {
    pub(crate) fn new(target: Arc<KickTarget>) -> Self {
        Kicker { target }
    }

    pub fn kick(&self) {
        self.target.kick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kick_sets_the_flag_until_cleared_and_ignores_a_detached_vcpu() {
        let byte = AtomicU8::new(0);
        let target = KickTarget::new(byte.as_ptr());
        let kicker = Kicker::new(target.clone());
        kicker.kick();
        assert_eq!(byte.load(Ordering::SeqCst), 1);
        target.clear();
        assert_eq!(byte.load(Ordering::SeqCst), 0);
        target.detach();
        kicker.kick();
        assert_eq!(byte.load(Ordering::SeqCst), 0);
    }
}
