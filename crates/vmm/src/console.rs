//! The guest's serial console on the host side: where its output goes (stdout, a file, nowhere)
//! and where its input comes from (stdin, when interactive). Output is also watched for a
//! kernel panic line, so the monitor can say why a guest died.

use crate::console_socket::{ConsoleHub, HubWriter};
use crate::control::VmControl;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vme_api::SerialSpec;
use vme_devices::serial::Serial;

const PANIC_MARK: &str = "Kernel panic - not syncing";
/// Longest console line kept for panic detection; longer lines are cut, not buffered.
const LINE_MAX: usize = 512;

/// The serial device's output side.
pub struct ConsoleOut {
    target: Option<Box<dyn Write + Send>>,
    line: Vec<u8>,
    control: Arc<VmControl>,
}

impl ConsoleOut {
    /// `hub` serves a socket console (made once per monitor by the caller).
    pub fn open(
        spec: &SerialSpec,
        hub: Option<&Arc<ConsoleHub>>,
        control: Arc<VmControl>,
    ) -> io::Result<ConsoleOut> {
        let target: Option<Box<dyn Write + Send>> = match spec {
            SerialSpec::Stdio => Some(Box::new(io::stdout())),
            SerialSpec::Socket { .. } => match hub {
                Some(h) => Some(Box::new(HubWriter(h.clone()))),
                None => return Err(io::Error::other("the socket console was not set up")),
            },
            SerialSpec::None => None,
            SerialSpec::File(p) => Some(Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot open serial output file {}: {e}", p.display()),
                        )
                    })?,
            )),
        };
        Ok(ConsoleOut {
            target,
            line: Vec::new(),
            control,
        })
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                if let Some(at) = line.find(PANIC_MARK) {
                    self.control.saw_panic(line[at..].trim_end().to_string());
                }
                self.line.clear();
            } else if self.line.len() < LINE_MAX {
                self.line.push(b);
            }
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        match &mut self.target {
            Some(t) => {
                t.write_all(buf)?;
                // The UART hands us a byte at a time; flushing keeps the console live.
                t.flush()?;
                Ok(buf.len())
            }
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.target.as_mut().map_or(Ok(()), |t| t.flush())
    }
}

/// Puts a terminal on stdin into raw mode for the guest's shell and restores it on drop.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Returns None when stdin is not a terminal (a pipe, /dev/null under CI).
    pub fn enter() -> Option<RawTerminal> {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid terminal descriptor.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side messages still start at column 0.
        raw.c_oflag |= libc::OPOST;
        // SAFETY: fd is a terminal and `raw` a fully initialised termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal in `enter`.
        unsafe { libc::tcsetattr(io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}

/// Feeds stdin to the guest's UART. The UART's FIFO is small, so input waits for room instead
/// of being dropped. Runs until stdin closes or the VM stops.
pub fn spawn_stdin_pump(serial: Arc<Mutex<Serial>>, control: Arc<VmControl>) {
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::Kind::Console);
            let mut stdin = File::from(
                // A duplicate, so closing ours never closes the process's stdin.
                match io::stdin().as_fd().try_clone_to_owned() {
                    Ok(fd) => fd,
                    Err(_) => return,
                },
            );
            let mut buf = [0u8; 64];
            while !control.should_stop() {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() && !control.should_stop() {
                    let taken = serial
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enqueue_input(pending);
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the console input thread ({e}); the guest gets no keyboard input");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_lines_are_noticed_even_when_split() {
        let ctl = Arc::new(VmControl::new());
        let mut out = ConsoleOut::open(&SerialSpec::None, None, ctl.clone()).unwrap();
        out.write_all(b"[ 1.0] Kernel pa").unwrap();
        out.write_all(b"nic - not syncing: Attempted to kill init! exitcode=0x00000100\r\n")
            .unwrap();
        vme_devices::VmEvents::reboot(&*ctl);
        match ctl.wait_for_exit() {
            crate::control::ExitReason::Panic(l) => {
                assert!(
                    l.starts_with("Kernel panic - not syncing: Attempted to kill init!"),
                    "{l}"
                )
            }
            other => panic!("expected a panic, got {other:?}"),
        }
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let ctl = Arc::new(VmControl::new());
        let mut out = ConsoleOut::open(&SerialSpec::None, None, ctl.clone()).unwrap();
        out.write_all(&[b'x'; 5000]).unwrap();
        out.write_all(b"\nVME-GUEST-READY uptime=1.00\n").unwrap();
        vme_devices::VmEvents::reboot(&*ctl);
        assert_eq!(ctl.wait_for_exit(), crate::control::ExitReason::Reboot);
    }
}
