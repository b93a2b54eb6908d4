//! `vme console NAME`: the user's terminal on the guest's serial port, through the daemon's
//! upgraded connection. The terminal goes raw (every key, Ctrl-C included, goes to the
//! guest) and is restored when the session ends, however it ends. Ctrl-a q detaches;
//! Ctrl-a Ctrl-a sends one Ctrl-a; Ctrl-a followed by anything else sends both.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const CTRL_A: u8 = 0x01;

/// The escape sequence's state across reads.
#[derive(Default)]
pub struct Escape {
    after_ctrl_a: bool,
}

impl Escape {
    /// What of `input` goes to the guest, and whether the user asked to detach (what
    /// follows the detach is dropped).
    pub fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    b'q' | b'Q' => return (out, true),
                    CTRL_A => out.push(CTRL_A),
                    other => out.extend([CTRL_A, other]),
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// The terminal on stdin in raw mode until dropped (a no-op when stdin is no terminal).
struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    fn enter() -> RawTerminal {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return RawTerminal { saved: None };
        }
        // SAFETY: termios is plain data, all zeroes is a valid value to be overwritten.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and `saved` a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return RawTerminal { saved: None };
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd is a terminal and `raw` a fully initialised termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return RawTerminal { saved: None };
        }
        RawTerminal { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restores the settings read from the same terminal in `enter`.
            unsafe { libc::tcsetattr(io::stdin().as_raw_fd(), libc::TCSANOW, saved) };
        }
    }
}

/// Runs the session until the user detaches, stdin ends, or the console closes (the VM
/// stopped, or another client took over). Returns whether the user detached.
pub fn session(conn: UnixStream, name: &str) -> io::Result<bool> {
    let writer = conn.try_clone()?;
    let raw = RawTerminal::enter();
    // In raw mode a newline does not return the carriage: say it.
    eprint!("Connected to the console of {name}; detach with Ctrl-a q\r\n");
    let detached = Arc::new(AtomicBool::new(false));
    let flag = detached.clone();
    std::thread::spawn(move || pump_input(writer, &flag));
    let mut out = io::stdout().lock();
    let mut conn = conn;
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.write_all(&buf[..n])?;
                out.flush()?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                drop(raw);
                return Err(e);
            }
        }
    }
    drop(raw);
    // The input side may still wait for a key when the console closed under it: leave it.
    Ok(detached.load(Ordering::SeqCst))
}

/// Keystrokes to the console; shuts the connection on detach (first setting `detached`) or
/// at the end of stdin, which ends the output side too.
fn pump_input(mut conn: UnixStream, detached: &AtomicBool) {
    let mut stdin = io::stdin().lock();
    let mut esc = Escape::default();
    let mut buf = [0u8; 1024];
    let detach = loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => break false,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break false,
        };
        let (bytes, detach) = esc.filter(&buf[..n]);
        if conn.write_all(&bytes).is_err() {
            break false;
        }
        if detach {
            break true;
        }
    };
    detached.store(detach, Ordering::SeqCst);
    let _ = conn.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_q_detaches_and_ctrl_a_ctrl_a_sends_one() {
        let mut e = Escape::default();
        assert_eq!(e.filter(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(e.filter(b"a\x01\x01b"), (b"a\x01b".to_vec(), false));
        assert_eq!(e.filter(b"x\x01qrest"), (b"x".to_vec(), true));
        // Split across reads.
        let mut e = Escape::default();
        assert_eq!(e.filter(b"\x01"), (vec![], false));
        assert_eq!(e.filter(b"q"), (vec![], true));
        let mut e = Escape::default();
        assert_eq!(e.filter(b"\x01c"), (b"\x01c".to_vec(), false));
    }
}
