//! The receive side's own thread: it sleeps in `poll(2)` on the backend and on a wake-up
//! eventfd, and when frames arrive it kicks the receive queue through the transport (which
//! takes the same lock as the vCPUs, so the device never runs on two threads at once).
//!
//! It watches the backend only while the device can take frames ([`RxSignal`]'s watch flag:
//! off while the guest has posted no buffers, the device is reset or broken, or the VM is
//! paused), so a readable backend nobody drains never makes it spin.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Shared by a net device, its worker and the VM's run-state control.
pub struct RxSignal {
    wake: EventFd,
    /// Bit 0: watch the backend. The rest counts the times watching was turned on, so the
    /// worker's "stop watching" never overrides a newer "start" from the device.
    watch: AtomicU64,
    paused: AtomicBool,
    stopped: AtomicBool,
}

impl RxSignal {
    pub(crate) fn new() -> io::Result<RxSignal> {
        Ok(RxSignal {
            wake: EventFd::new(EFD_NONBLOCK)?,
            watch: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        })
    }

    fn wake(&self) {
        // Fails only when the counter is saturated, and then the worker wakes anyway.
        let _ = self.wake.write(1);
    }

    /// Whether the worker should poll the backend (the device can take frames).
    pub(crate) fn set_watch(&self, on: bool) {
        let old = self
            .watch
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                Some(if on { (w | 1).wrapping_add(2) } else { w & !1 })
            })
            .unwrap_or_default();
        if on && old & 1 == 0 {
            self.wake();
        }
    }

    pub fn watching(&self) -> bool {
        self.watch.load(Ordering::SeqCst) & 1 != 0
    }

    /// While paused no frame is delivered (the guest's memory must not change) and the
    /// worker sleeps.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.wake();
    }

    /// Ends the worker for good.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.wake();
    }
}

/// What a worker needs from its device, taken before the device moves into its transport.
pub struct RxSource {
    signal: Arc<RxSignal>,
    /// Our own descriptor of the backend, so the thread never polls a number the device
    /// closed and the kernel reused.
    backend: OwnedFd,
}

impl RxSource {
    pub(crate) fn new(signal: Arc<RxSignal>, backend: RawFd) -> io::Result<RxSource> {
        // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor and touches no memory.
        let dup = unsafe { libc::fcntl(backend, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh descriptor that nothing else owns.
        let backend = unsafe { OwnedFd::from_raw_fd(dup) };
        Ok(RxSource { signal, backend })
    }

    pub fn signal(&self) -> &Arc<RxSignal> {
        &self.signal
    }

    /// Starts the thread. `kick` must serve the receive queue through the transport, under
    /// the lock the vCPUs take, and return what [`super::mmio::MmioTransport::kick`] returns.
    pub fn spawn(self, name: &str, kick: Box<dyn FnMut() -> bool + Send>) -> io::Result<RxWorker> {
        let RxSource { signal, backend } = self;
        let s = signal.clone();
        let thread = std::thread::Builder::new()
            .name(format!("rx-{name}"))
            .spawn(move || {
                crate::thread_started();
                run(&s, &backend, kick)
            })?;
        Ok(RxWorker {
            signal,
            thread: Some(thread),
        })
    }
}

/// A running receive worker; dropping it stops and joins the thread.
pub struct RxWorker {
    signal: Arc<RxSignal>,
    thread: Option<JoinHandle<()>>,
}

impl RxWorker {
    pub fn signal(&self) -> &Arc<RxSignal> {
        &self.signal
    }
}

impl Drop for RxWorker {
    fn drop(&mut self) {
        self.signal.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(s: &RxSignal, backend: &OwnedFd, mut kick: Box<dyn FnMut() -> bool + Send>) {
    let mut fds = [
        libc::pollfd {
            fd: s.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: backend.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if s.stopped.load(Ordering::SeqCst) {
            return;
        }
        let watch = s.watch.load(Ordering::SeqCst);
        let polling_backend = watch & 1 != 0 && !s.paused.load(Ordering::SeqCst);
        let n = if polling_backend { 2 } else { 1 };
        fds.iter_mut().for_each(|f| f.revents = 0);
        // SAFETY: `fds` holds `n` (at most 2) initialised pollfds and outlives the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("virtio-net: the receive worker cannot poll: {e}; receiving stops");
            return;
        }
        if fds[0].revents != 0 {
            let _ = s.wake.read();
        }
        if polling_backend
            && fds[1].revents != 0
            && !s.paused.load(Ordering::SeqCst)
            && !s.stopped.load(Ordering::SeqCst)
            && !kick()
        {
            // The device cannot take frames (reset, broken, queue not ready): stop watching
            // until it is set up again, unless it already changed its mind meanwhile.
            let _ = s
                .watch
                .compare_exchange(watch, watch & !1, Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}
