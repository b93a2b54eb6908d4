//! `--serial socket:PATH[,log=FILE][,log_size=N]`: the guest's serial console on a Unix
//! socket, so a supervisor (or anyone with access to the socket) can attach to it, detach
//! and attach again while the VM runs, and a daemon restart loses nothing: the endpoint
//! belongs to the monitor.
//!
//! One client at a time: a new connection takes over from the current one (which is told
//! so and closed), so a client that died without closing never locks the console. The
//! client's bytes go to the UART's receive FIFO; the guest's output goes to the bounded log
//! and to the client. Output is sent without waiting: a client that does not keep up loses
//! output (it stays in the log), the guest never blocks on it.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use vme_api::console_log::ConsoleLog;
use vme_devices::serial::Serial;

pub struct ConsoleHub {
    log: Mutex<Option<ConsoleLog>>,
    /// The attached client and its number (a reader thread only detaches its own).
    client: Mutex<Option<(u64, UnixStream)>>,
    next_client: AtomicU64,
    /// The UART of the machine that runs now (replaced when a reboot rebuilds it).
    serial: Mutex<Option<Arc<Mutex<Serial>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ConsoleHub {
    /// Binds the socket (mode 0600) and starts accepting clients.
    pub fn bind(path: &Path, log: Option<&Path>, log_size: u64) -> Result<Arc<ConsoleHub>, String> {
        let log = match log {
            Some(p) => Some(
                ConsoleLog::open(p, log_size)
                    .map_err(|e| format!("cannot open the console log {}: {e}", p.display()))?,
            ),
            None => None,
        };
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "console socket {} is in use by another running VM: choose another path",
                    path.display()
                ));
            }
            std::fs::remove_file(path).map_err(|e| {
                format!("cannot remove stale console socket {}: {e}", path.display())
            })?;
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("cannot create console socket {}: {e}", path.display()))?;
        // The console is a root shell in many guests: only the monitor's user may attach.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
        let hub = Arc::new(ConsoleHub {
            log: Mutex::new(log),
            client: Mutex::new(None),
            next_client: AtomicU64::new(0),
            serial: Mutex::new(None),
        });
        let me = hub.clone();
        let path: PathBuf = path.to_path_buf();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::Kind::Console);
                for conn in listener.incoming() {
                    match conn {
                        Ok(c) => me.attach(c),
                        Err(e) => log::warn!("console socket {}: {e}", path.display()),
                    }
                }
            })
            .map_err(|e| format!("cannot start the console socket thread: {e}"))?;
        Ok(hub)
    }

    /// Feeds input to `serial` from now on.
    pub fn set_serial(&self, serial: Arc<Mutex<Serial>>) {
        *lock(&self.serial) = Some(serial);
    }

    fn attach(self: &Arc<Self>, conn: UnixStream) {
        let Ok(reader) = conn.try_clone() else { return };
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        if let Some((_, old)) = lock(&self.client).replace((id, conn)) {
            let _ = send_now(
                &old,
                b"\r\n[vme: another client attached to this console]\r\n",
            );
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::Kind::Console);
                me.pump(reader);
                let mut client = lock(&me.client);
                if client.as_ref().is_some_and(|(i, _)| *i == id) {
                    *client = None;
                }
            });
        if spawned.is_err() {
            *lock(&self.client) = None;
        }
    }

    /// The client's bytes to the UART until it leaves. The UART's FIFO is small, so input
    /// waits for room instead of being dropped.
    fn pump(&self, mut conn: UnixStream) {
        let mut buf = [0u8; 256];
        loop {
            let n = match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut pending = &buf[..n];
            while !pending.is_empty() {
                let serial = lock(&self.serial).clone();
                let taken = match serial {
                    Some(s) => lock(&s).enqueue_input(pending),
                    None => 0,
                };
                pending = &pending[taken..];
                if !pending.is_empty() {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// The guest's output: to the log, and to the client if one is attached and keeps up.
    pub fn output(&self, buf: &[u8]) {
        {
            let mut log = lock(&self.log);
            if let Some(Err(e)) = log.as_mut().map(|l| l.write(buf)) {
                log::warn!("console log: {e}; it is no longer written");
                *log = None;
            }
        }
        let mut client = lock(&self.client);
        if let Some((_, c)) = client.as_ref() {
            match send_now(c, buf) {
                Ok(()) => {}
                // Full: this output is dropped for the client only.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => *client = None,
            }
        }
    }
}

/// Sends without blocking (and without SIGPIPE for a client gone).
fn send_now(c: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: send(2) reads `buf.len()` bytes from a live slice; the descriptor is the
        // stream's own, open for the call's length.
        let n = unsafe {
            libc::send(
                c.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// The serial device's writer for a socket console.
pub struct HubWriter(pub Arc<ConsoleHub>);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.output(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_the_log_and_the_latest_client_only() {
        let dir = std::env::temp_dir().join(format!("vme-console-hub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (sock, log) = (dir.join("c.sock"), dir.join("c.log"));
        let hub = ConsoleHub::bind(&sock, Some(&log), 4096).unwrap();
        hub.output(b"before ");
        let mut first = UnixStream::connect(&sock).unwrap();
        first
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // Wait until the hub has taken the client.
        while lock(&hub.client).is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        hub.output(b"one");
        let mut got = [0u8; 3];
        first.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one");
        let second = UnixStream::connect(&sock).unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        first.read_to_end(&mut rest).unwrap();
        assert!(
            String::from_utf8_lossy(&rest).contains("another client"),
            "{rest:?}"
        );
        while lock(&hub.client).as_ref().is_none_or(|(i, _)| *i != 1) {
            std::thread::sleep(Duration::from_millis(5));
        }
        hub.output(b"two");
        let mut got = [0u8; 3];
        (&second).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"two");
        assert_eq!(
            vme_api::console_log::read_tail(&log, 100).unwrap(),
            b"before onetwo"
        );
        // A second monitor cannot take a live console socket.
        assert!(ConsoleHub::bind(&sock, None, 4096).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
