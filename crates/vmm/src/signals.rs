//! SIGTERM, SIGINT and SIGHUP end the VM in order (the same path as `stop`): they are blocked
//! in every thread and received by one thread with `sigwait`, so no handler runs in a vCPU
//! thread and no async-signal-safety rules bind the stop path.

use crate::control::{ExitReason, VmControl};
use std::sync::Arc;

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    set
}

/// Must run before any other thread is spawned, so every thread inherits the mask.
pub fn stop_on_termination(control: Arc<VmControl>) {
    let set = termination_set();
    // SAFETY: blocks signals in the calling thread with a valid set; no old mask is wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::Kind::Signals);
            loop {
                let mut sig = 0;
                // SAFETY: `set` is valid and `sig` is a writable int.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    log::info!("signal {sig} received: stopping the VM");
                    control.request_exit(ExitReason::Stopped);
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the signal thread ({e}); SIGTERM will not stop the VM in order");
    }
}
