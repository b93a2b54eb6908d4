//! The thread that resumes rate-limited queues: a device whose bucket ran dry leaves its
//! chains in the ring and arms the timer; when the tokens are back the thread serves that
//! queue through the transport's `kick`, as a driver notify would. It sleeps on a condition
//! variable with a timeout (no polling, no spinning), does nothing while the VM is paused
//! (the guest's memory must not change). Every disk and network device has one, limited or
//! not, because limits can be set while the VM runs; unarmed, it costs a sleeping thread.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

#[derive(Default)]
struct State {
    /// Per queue index: when to serve it again.
    due: Vec<Option<Instant>>,
    paused: bool,
    stopped: bool,
}

/// Shared by a limited device (which arms it), its thread and the VM's run-state control.
#[derive(Default)]
pub struct RefillTimer {
    state: Mutex<State>,
    cond: Condvar,
}

impl RefillTimer {
    pub fn new() -> Arc<RefillTimer> {
        Arc::new(RefillTimer::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serve queue `queue` at `at` (or earlier, if it is already due earlier).
    pub fn arm(&self, queue: usize, at: Instant) {
        let mut s = self.lock();
        if s.due.len() <= queue {
            s.due.resize(queue + 1, None);
        }
        let slot = &mut s.due[queue];
        *slot = Some(slot.map_or(at, |t| t.min(at)));
        self.cond.notify_all();
    }

    /// When queue `queue` is due, if armed (for tests and diagnostics).
    pub fn due(&self, queue: usize) -> Option<Instant> {
        self.lock().due.get(queue).copied().flatten()
    }

    /// Takes the queues due at `now`, for a caller that serves them (the thread, or a test).
    pub fn take_due(&self, now: Instant) -> Vec<usize> {
        let mut s = self.lock();
        let mut out = Vec::new();
        for (q, due) in s.due.iter_mut().enumerate() {
            if due.is_some_and(|t| t <= now) {
                *due = None;
                out.push(q);
            }
        }
        out
    }

    /// While paused nothing is served; the deadlines are kept for the resume.
    pub fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
        self.cond.notify_all();
    }

    /// Ends the thread for good.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.cond.notify_all();
    }

    /// Starts the thread. `kick(queue)` must serve the queue through the transport, under the
    /// lock the vCPUs take ([`super::mmio::MmioTransport::kick`]).
    pub fn spawn(
        self: &Arc<Self>,
        name: &str,
        kick: Box<dyn FnMut(u32) -> bool + Send>,
    ) -> std::io::Result<RefillWorker> {
        let t = self.clone();
        let thread = std::thread::Builder::new()
            .name(format!("refill-{name}"))
            .spawn(move || {
                crate::thread_started();
                t.run(kick)
            })?;
        Ok(RefillWorker {
            timer: self.clone(),
            thread: Some(thread),
        })
    }

    fn run(&self, mut kick: Box<dyn FnMut(u32) -> bool + Send>) {
        let mut s = self.lock();
        loop {
            if s.stopped {
                return;
            }
            let next = s.due.iter().flatten().min().copied();
            let now = Instant::now();
            match next {
                _ if s.paused => {
                    s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                None => s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(t) if t > now => {
                    s = self
                        .cond
                        .wait_timeout(s, t - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                Some(_) => {
                    drop(s);
                    // The device may re-arm from inside the kick: the lock is not held here.
                    for q in self.take_due(now) {
                        // A device that cannot serve (reset, not running) needs no retry:
                        // the driver's next notify serves the queue.
                        kick(q as u32);
                    }
                    s = self.lock();
                }
            }
        }
    }
}

/// A running refill thread; dropping it stops and joins the thread.
pub struct RefillWorker {
    timer: Arc<RefillTimer>,
    thread: Option<JoinHandle<()>>,
}

impl RefillWorker {
    pub fn timer(&self) -> &Arc<RefillTimer> {
        &self.timer
    }
}

impl Drop for RefillWorker {
    fn drop(&mut self) {
        self.timer.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
