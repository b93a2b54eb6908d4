//! The host side of the device: epoll interest per connection, new clients and their
//! `CONNECT` lines, readiness of host sockets, and connections the guest opens to
//! `PATH_<port>`.

use super::conn::{Conn, State};
use super::packet::*;
use super::{FIRST_LOCAL_PORT, Key, MAX_CONNS, TOKEN_LISTENER, TOKEN_WAKE, Vsock};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

impl Vsock {
    /// Makes epoll watch what connection `key` can act on now.
    pub(super) fn update_interest(&mut self, key: Key) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if conn.host_hup {
            // Hung-up sockets are read until EOF without epoll (it reports HUP regardless
            // of interest, which would spin).
            if conn.wants_host_data() && !self.readable.contains(&key) {
                self.readable.push_back(key);
                let _ = self.wake.write(1);
            }
            return;
        }
        let mut want = 0;
        match conn.state {
            State::AwaitingConnect => want |= EventSet::IN.bits(),
            State::Connecting => {}
            State::Established => {
                if conn.wants_host_data() {
                    want |= EventSet::IN.bits();
                }
                if !conn.to_host.is_empty() {
                    want |= EventSet::OUT.bits();
                }
            }
        }
        if want == conn.interest {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let token = conn.token;
        let op = match (conn.interest, want) {
            (0, _) => ControlOperation::Add,
            (_, 0) => ControlOperation::Delete,
            _ => ControlOperation::Modify,
        };
        let ev = EpollEvent::new(EventSet::from_bits_truncate(want), token);
        match self.epoll.ctl(op, fd, ev) {
            Ok(()) => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.interest = want;
                }
            }
            Err(e) => {
                log::warn!("virtio-vsock: cannot watch a host socket ({e}); resetting it");
                self.reset_conn(key);
            }
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.0 == p) {
                return p;
            }
        }
    }

    /// Takes what the host side has for us: new clients, CONNECT lines, writable and
    /// readable sockets.
    pub(super) fn poll_host(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("virtio-vsock: epoll failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_LISTENER => self.accept_clients(),
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                    }
                    token => {
                        if let Some(&key) = self.tokens.get(&token) {
                            self.host_event(key, ev.event_set());
                        }
                    }
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept_clients(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!(
                        "virtio-vsock: accept on {} failed: {e}",
                        self.path.display()
                    );
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNS {
                log::warn!(
                    "virtio-vsock: {MAX_CONNS} connections are open; refusing a host client"
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let local = self.alloc_local_port();
            let key = (local, 0);
            self.insert(key, Conn::new(stream, State::AwaitingConnect, local, 0));
            self.update_interest(key);
        }
    }

    fn host_event(&mut self, key: Key, ev: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.state {
            State::AwaitingConnect => match conn.read_connect_line() {
                Ok(None) => {}
                Ok(Some(port)) => self.host_connect(key, port),
                Err(e) => {
                    log::debug!("virtio-vsock: dropping a host client: {e}");
                    self.remove(key);
                }
            },
            State::Connecting => {
                if ev.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    self.reset_conn(key);
                }
            }
            State::Established => {
                if ev.contains(EventSet::OUT) {
                    if conn.flush_to_host().is_err() {
                        self.reset_conn(key);
                        return;
                    }
                    if conn.credit_update_due() {
                        self.queue_ctrl(key, OP_CREDIT_UPDATE, 0);
                    }
                }
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                if ev.intersects(EventSet::HANG_UP | EventSet::ERROR) && !conn.host_hup {
                    conn.host_hup = true;
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        conn.stream.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    conn.interest = 0;
                }
                if ev.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
                    && !self.readable.contains(&key)
                {
                    self.readable.push_back(key);
                }
                self.update_interest(key);
            }
        }
    }

    /// A host client asked for guest port `port`: ask the guest.
    fn host_connect(&mut self, old: Key, port: u32) {
        let Some(mut conn) = self.remove(old) else {
            return;
        };
        let key = (conn.local_port, port);
        conn.peer_port = port;
        conn.state = State::Connecting;
        self.insert(key, conn);
        self.queue_ctrl(key, OP_REQUEST, 0);
    }

    /// The guest connects to host port `h.dst_port`: reach the Unix socket `PATH_<port>`.
    pub(super) fn guest_connect(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.len() >= MAX_CONNS {
            log::warn!("virtio-vsock: {MAX_CONNS} connections are open; refusing the guest's");
            self.queue_ctrl(key, OP_RST, 0);
            return;
        }
        let path = format!("{}_{}", self.path.display(), h.dst_port);
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("virtio-vsock: the guest's connection to {path} failed: {e}");
                self.queue_ctrl(key, OP_RST, 0);
                return;
            }
        };
        let mut conn = Conn::new(stream, State::Established, h.dst_port, h.src_port);
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        self.insert(key, conn);
        self.queue_ctrl(key, OP_RESPONSE, 0);
        self.update_interest(key);
    }
}

impl Conn {
    /// Tells a host client its connection is up (`OK <host port>\n`).
    pub(super) fn reply_ok(&mut self) -> io::Result<()> {
        use std::io::Write;
        // The socket's buffer is empty at this point, so the short line goes at once.
        let line = format!("OK {}\n", self.local_port);
        self.stream.write_all(line.as_bytes())
    }
}

/// Connects to a Unix stream socket without ever blocking (a listener with a full backlog
/// is refused like an absent one).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is too long", path.display()),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is an initialised sockaddr_un of `len` bytes that outlives the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}
