//! The thread that serves virtio queue notifications the kernel caught for us: each queue's
//! notify address has an ioeventfd, so a guest's notification costs no exit to user space,
//! and this one thread per VM waits on all of them (epoll) and kicks the queue through its
//! transport, under the same lock the vCPUs take.
//!
//! It follows the VM's run state: while paused it leaves the eventfds unread (their counts
//! wait in the kernel) and serves nothing, and it ends with the VM.

use crate::virtio::Follows;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Shared by the worker and the VM's run-state control.
pub struct NotifySignal {
    wake: EventFd,
    paused: AtomicBool,
    stopped: AtomicBool,
}

impl NotifySignal {
    fn wake(&self) {
        // Fails only when the counter is saturated, and then the worker wakes anyway.
        let _ = self.wake.write(1);
    }
}

impl Follows for NotifySignal {
    fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.wake();
    }
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.wake();
    }
}

/// One queue's notification: the eventfd the kernel signals and what serving it means.
pub struct Notification {
    pub fd: Arc<EventFd>,
    pub kick: Box<dyn FnMut() + Send>,
}

/// The running thread; dropping it stops and joins it.
pub struct NotifyWorker {
    signal: Arc<NotifySignal>,
    thread: Option<JoinHandle<()>>,
}

impl NotifyWorker {
    pub fn spawn(queues: Vec<Notification>) -> io::Result<NotifyWorker> {
        let signal = Arc::new(NotifySignal {
            wake: EventFd::new(EFD_NONBLOCK)?,
            paused: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        });
        let epoll = Epoll::new()?;
        // Data 0 is the wake-up; queue i is data i + 1.
        epoll.ctl(
            ControlOperation::Add,
            signal.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        for (i, q) in queues.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                q.fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64 + 1),
            )?;
        }
        let s = signal.clone();
        let thread = std::thread::Builder::new()
            .name("virtio-notify".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::Kind::Device);
                run(&s, &epoll, queues)
            })?;
        Ok(NotifyWorker {
            signal,
            thread: Some(thread),
        })
    }

    pub fn signal(&self) -> &Arc<NotifySignal> {
        &self.signal
    }
}

impl Drop for NotifyWorker {
    fn drop(&mut self) {
        self.signal.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(s: &NotifySignal, epoll: &Epoll, mut queues: Vec<Notification>) {
    let mut events = vec![EpollEvent::default(); queues.len() + 1];
    loop {
        if s.stopped.load(Ordering::SeqCst) {
            return;
        }
        if s.paused.load(Ordering::SeqCst) {
            // Only the wake-up counts while paused: wait for it alone.
            let mut fd = libc::pollfd {
                fd: s.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one initialised pollfd that outlives the call.
            unsafe { libc::poll(&mut fd, 1, -1) };
            let _ = s.wake.read();
            continue;
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!(
                    "virtio: the notification thread cannot wait: {e}; queues are served only on exits"
                );
                return;
            }
        };
        for ev in &events[..n] {
            let Some(i) = (ev.data() as usize).checked_sub(1) else {
                let _ = s.wake.read();
                continue;
            };
            if s.paused.load(Ordering::SeqCst) || s.stopped.load(Ordering::SeqCst) {
                // Left unread: served after resume.
                break;
            }
            if let Some(q) = queues.get_mut(i) {
                if q.fd.read().is_ok() {
                    (q.kick)();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn kicks_the_notified_queue_and_holds_notifications_while_paused() {
        let fds: Vec<Arc<EventFd>> = (0..2)
            .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
            .collect();
        let counts: Arc<Vec<AtomicUsize>> = Arc::new((0..2).map(|_| AtomicUsize::new(0)).collect());
        let queues = fds
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                let c = counts.clone();
                Notification {
                    fd: fd.clone(),
                    kick: Box::new(move || {
                        c[i].fetch_add(1, Ordering::SeqCst);
                    }),
                }
            })
            .collect();
        let worker = NotifyWorker::spawn(queues).unwrap();
        fds[1].write(1).unwrap();
        wait_for("queue 1 kicked", || counts[1].load(Ordering::SeqCst) == 1);
        assert_eq!(counts[0].load(Ordering::SeqCst), 0);

        worker.signal().set_paused(true);
        std::thread::sleep(Duration::from_millis(50));
        fds[0].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(counts[0].load(Ordering::SeqCst), 0, "served while paused");
        worker.signal().set_paused(false);
        wait_for("queue 0 kicked after resume", || {
            counts[0].load(Ordering::SeqCst) == 1
        });
        drop(worker);
    }
}
