//! One guest ↔ host stream: its host-side Unix socket, its state, and the credit accounting
//! of virtio-vsock (§5.10.6.3), in which each side tells the other how much it may send.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

/// What we let the guest have in flight towards the host per connection: bytes the host
/// socket has not taken yet wait in [`Conn::to_host`], so this bounds our memory per
/// connection.
pub const BUF_ALLOC: u32 = 256 << 10;
/// Longest `CONNECT <port>\n` line a host client may send.
const MAX_CONNECT_LINE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A host client connected to the device's socket and has not yet said which guest port.
    AwaitingConnect,
    /// We sent the guest a REQUEST for a host client and wait for its RESPONSE.
    Connecting,
    Established,
}

pub struct Conn {
    pub stream: UnixStream,
    pub state: State,
    /// The host side's port (the guest sees it as the source port of our packets).
    pub local_port: u32,
    /// The guest side's port.
    pub peer_port: u32,
    /// Partial `CONNECT` line while [`State::AwaitingConnect`].
    line: Vec<u8>,
    /// Bytes from the host read past the `CONNECT` line, sent to the guest first.
    pub from_host: Vec<u8>,
    /// Bytes from the guest the host socket has not accepted yet.
    pub to_host: Vec<u8>,
    /// Guest → host accounting: bytes received from the guest, and forwarded to the host.
    pub rx_cnt: u32,
    pub fwd_cnt: u32,
    /// `fwd_cnt` as the guest last heard it.
    pub fwd_cnt_told: u32,
    /// Host → guest accounting: bytes sent to the guest, and the guest's view of its buffer.
    pub tx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// The host closed its sending side (read returned 0) or hung up entirely.
    pub host_eof: bool,
    pub host_hup: bool,
    /// The guest will send no more: shut the host's reading side once `to_host` drains.
    pub guest_done_sending: bool,
    /// A packet for this connection is already queued; further ones would be redundant.
    pub credit_update_queued: bool,
    /// Epoll events currently registered (0 when not registered).
    pub interest: u32,
    /// This connection's epoll token, given by the device when it adds the connection.
    pub token: u64,
}

impl Conn {
    pub fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Conn {
        Conn {
            stream,
            state,
            local_port,
            peer_port,
            line: Vec::new(),
            from_host: Vec::new(),
            to_host: Vec::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_eof: false,
            host_hup: false,
            guest_done_sending: false,
            credit_update_queued: false,
            interest: 0,
            token: 0,
        }
    }

    /// Bytes the guest can still take (its receive buffer minus what is in flight).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host data should be read now: established, the host still sends, the guest
    /// has room.
    pub fn wants_host_data(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_credit() > 0
    }

    /// Reads the host client's `CONNECT <port>\n` line. `Ok(None)` while incomplete; an
    /// error for a malformed line or a client that hung up.
    pub fn read_connect_line(&mut self) -> io::Result<Option<u32>> {
        let mut buf = [0u8; 256];
        loop {
            let n = match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client hung up before sending CONNECT <port>",
                    ));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let data = &buf[..n];
            let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                self.line.extend_from_slice(data);
                if self.line.len() > MAX_CONNECT_LINE {
                    return Err(bad_line("the CONNECT line is too long"));
                }
                continue;
            };
            self.line.extend_from_slice(&data[..nl]);
            self.from_host.extend_from_slice(&data[nl + 1..]);
            let line = std::str::from_utf8(&self.line)
                .map_err(|_| bad_line("the CONNECT line is not text"))?;
            let port = line
                .trim_end_matches('\r')
                .strip_prefix("CONNECT ")
                .and_then(|p| p.trim().parse::<u32>().ok())
                .ok_or_else(|| bad_line("expected `CONNECT <port>` with a decimal port"))?;
            return Ok(Some(port));
        }
    }

    /// Takes guest bytes for the host: written now as far as the socket accepts, the rest
    /// kept in order. An error means the host side is gone.
    pub fn send_to_host(&mut self, data: &[u8]) -> io::Result<()> {
        self.rx_cnt = self.rx_cnt.wrapping_add(data.len() as u32);
        if self.to_host.is_empty() {
            let n = write_some(&mut self.stream, data)?;
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
            self.to_host.extend_from_slice(&data[n..]);
        } else {
            self.to_host.extend_from_slice(data);
        }
        Ok(())
    }

    /// Writes what waits for the host socket.
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        if !self.to_host.is_empty() {
            let n = write_some(&mut self.stream, &self.to_host)?;
            self.to_host.drain(..n);
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        }
        if self.to_host.is_empty() && self.guest_done_sending {
            // The host reads EOF after the last byte, as from a socket its peer shut down.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Whether the guest sent more than the credit we gave it.
    pub fn over_credit(&self, more: u32) -> bool {
        u64::from(self.rx_cnt.wrapping_sub(self.fwd_cnt)) + u64::from(more) > u64::from(BUF_ALLOC)
    }

    /// Whether the guest should hear our `fwd_cnt` now: as far as it knows, less than a
    /// quarter of our buffer is free, but we have forwarded more since. (Telling it after
    /// every packet would double the packets.)
    pub fn credit_update_due(&self) -> bool {
        let believed_used = self.rx_cnt.wrapping_sub(self.fwd_cnt_told);
        BUF_ALLOC.saturating_sub(believed_used) < BUF_ALLOC / 4 && self.fwd_cnt != self.fwd_cnt_told
    }

    /// Reads host bytes for the guest into `buf`; 0 means the host sends no more.
    pub fn read_from_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.from_host.is_empty() {
            let n = self.from_host.len().min(buf.len());
            buf[..n].copy_from_slice(&self.from_host[..n]);
            self.from_host.drain(..n);
            return Ok(n);
        }
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

fn bad_line(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// Writes as much as the non-blocking socket takes now.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
