//! The migration transport: a handshake, then length-prefixed frames.
//!
//! ```text
//! hello (both sides, 41 bytes): "VMEMIGR1"  keyed (u8: 0 or 1)  nonce (32 random bytes)
//! frame: body length (u32 LE, at most MAX_BODY)  body
//!   plain body: kind (u8)  payload
//!   keyed body: ChaCha20-Poly1305(kind payload), nonce = frame counter (u64 LE, 4 zero
//!               bytes), associated data = the length prefix
//! ```
//!
//! With a pre-shared key, each direction has its own key, both derived by HKDF-SHA256 from
//! the key with both sides' fresh nonces as salt; so every session has new keys and nothing
//! recorded from another session, or sent the other way, decrypts. The source proves it
//! holds the key with its first frame, the destination answers with its own; the frame
//! counter makes a replayed, dropped or reordered frame fail to decrypt. Without a key
//! (loopback only) frames are plain, with the same bounds.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"VMEMIGR1";
const HELLO: usize = 8 + 1 + 32;
/// Largest frame body: a run of pages and its header, with room for the AEAD tag. Anything
/// larger is refused before it is read, so a peer cannot make us allocate at will.
pub const MAX_BODY: usize = MAX_PAGES * PAGE + 64;
/// Pages per `Pages` frame.
pub const MAX_PAGES: usize = 256;
pub const PAGE: usize = 4096;
const TAG: usize = 16;
const INFO: &[u8] = b"vme-vmm live migration v1";
const SOURCE_PROOF: &[u8] = b"vme-vmm migration source";
const DEST_PROOF: &[u8] = b"vme-vmm migration destination";

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Key proof (keyed sessions only).
    Proof = 1,
    /// Source: the VM's architecture (ASCII) after its RAM size (u64 LE).
    Begin = 2,
    /// Source: first page (u64 LE), then whole pages.
    Pages = 3,
    /// Source: first page (u64 LE), count (u64 LE): these pages are now zero.
    Zeros = 4,
    /// Source: a piece of the state file.
    State = 5,
    /// Source: the state file is complete; build the machine.
    StateEnd = 6,
    /// Destination: the machine is built; waiting for commit.
    Ready = 7,
    /// Source: run it (the source's guest will never run again).
    Commit = 8,
    /// Destination: running.
    Started = 9,
    /// Either side: the migration failed, and why (UTF-8).
    Error = 10,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        [
            Proof, Begin, Pages, Zeros, State, StateEnd, Ready, Commit, Started, Error,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

/// Which end of the connection this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

struct Keys {
    tx: ChaCha20Poly1305,
    rx: ChaCha20Poly1305,
    sent: u64,
    received: u64,
}

/// Caps the send rate: after each frame, sleeps until the bytes sent so far fit the rate.
struct Limiter {
    bytes_per_sec: f64,
    since: Instant,
    sent: u64,
}

/// One end of an established migration connection.
pub struct Conn<S: Read + Write> {
    stream: S,
    keys: Option<Keys>,
    limit: Option<Limiter>,
    /// Bytes written, framing included.
    pub bytes_sent: u64,
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&counter.to_le_bytes());
    Nonce::from(n)
}

fn random_nonce() -> Result<[u8; 32], String> {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(|e| format!("cannot read /dev/urandom for a handshake nonce: {e}"))?;
    Ok(n)
}

/// The two directions' keys from the pre-shared key and both nonces.
fn derive(psk: &[u8], source: &[u8; 32], dest: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(source);
    salt[32..].copy_from_slice(dest);
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt), psk);
    let mut okm = [0u8; 64];
    // 64 bytes is far below HKDF-SHA256's limit of 255 * 32: expand cannot fail.
    let _ = hk.expand(INFO, &mut okm);
    let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
    a.copy_from_slice(&okm[..32]);
    b.copy_from_slice(&okm[32..]);
    (a, b)
}

fn io_err(what: &str, e: std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => format!(
            "the peer closed the connection while we were {what} (it stopped, failed or \
             refused us: see its messages)"
        ),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("the peer did not answer in time while we were {what}")
        }
        _ => format!("connection failed while {what}: {e}"),
    }
}

impl<S: Read + Write> Conn<S> {
    /// Runs the handshake on `stream` as `side`. With `psk`, both sides prove they hold it
    /// and every frame after is authenticated and encrypted; the peer must agree.
    pub fn handshake(mut stream: S, side: Side, psk: Option<&[u8]>) -> Result<Conn<S>, String> {
        let ours = random_nonce()?;
        let mut hello = Vec::with_capacity(HELLO);
        hello.extend_from_slice(MAGIC);
        hello.push(psk.is_some() as u8);
        hello.extend_from_slice(&ours);
        stream
            .write_all(&hello)
            .and_then(|()| stream.flush())
            .map_err(|e| io_err("greeting the peer", e))?;
        // The magic first, so that a peer speaking something else is named at once.
        let mut theirs = [0u8; HELLO];
        let wait = |e| io_err("waiting for the peer's greeting", e);
        stream.read_exact(&mut theirs[..8]).map_err(wait)?;
        if &theirs[..8] != MAGIC {
            return Err(
                "the peer is not a vme-vmm migration endpoint of this version \
                 (wrong greeting): check the address and that both sides run the same vme-vmm"
                    .into(),
            );
        }
        stream.read_exact(&mut theirs[8..]).map_err(wait)?;
        let peer_keyed = theirs[8] == 1;
        let mut peer_nonce = [0u8; 32];
        peer_nonce.copy_from_slice(&theirs[9..]);
        let mut conn = Conn {
            stream,
            keys: None,
            limit: None,
            bytes_sent: HELLO as u64,
        };
        match (psk, peer_keyed) {
            (None, false) => return Ok(conn),
            (Some(_), false) => {
                return Err(
                    "this side has a pre-shared key but the peer has none: give both \
                     sides the same key file (--key on the sender, --migrate-key on the \
                     destination)"
                        .into(),
                );
            }
            (None, true) => {
                return Err(
                    "the peer requires a pre-shared key but this side has none: give \
                     both sides the same key file (--key on the sender, --migrate-key on the \
                     destination)"
                        .into(),
                );
            }
            (Some(_), true) => {}
        }
        let psk = psk.unwrap_or_default();
        let (src_nonce, dst_nonce) = match side {
            Side::Source => (&ours, &peer_nonce),
            Side::Destination => (&peer_nonce, &ours),
        };
        let (to_dest, to_source) = derive(psk, src_nonce, dst_nonce);
        let (tx, rx) = match side {
            Side::Source => (to_dest, to_source),
            Side::Destination => (to_source, to_dest),
        };
        conn.keys = Some(Keys {
            tx: ChaCha20Poly1305::new(Key::from_slice(&tx)),
            rx: ChaCha20Poly1305::new(Key::from_slice(&rx)),
            sent: 0,
            received: 0,
        });
        let wrong_key = "the pre-shared keys differ: the peer's proof does not match this \
                         side's key; give both sides the same key file";
        // The source proves first; the destination answers only a valid proof, so it never
        // encrypts anything for someone without the key.
        match side {
            Side::Source => {
                conn.send(Kind::Proof, SOURCE_PROOF)?;
                let (kind, proof) = conn.recv().map_err(|e| {
                    format!(
                        "the destination did not accept our key proof ({e}); most likely \
                         the pre-shared keys differ: give both sides the same key file"
                    )
                })?;
                if kind != Kind::Proof || proof != DEST_PROOF {
                    return Err(wrong_key.into());
                }
            }
            Side::Destination => {
                let (kind, proof) = conn.recv().map_err(|_| wrong_key.to_string())?;
                if kind != Kind::Proof || proof != SOURCE_PROOF {
                    return Err(wrong_key.into());
                }
                conn.send(Kind::Proof, DEST_PROOF)?;
            }
        }
        Ok(conn)
    }

    pub fn authenticated(&self) -> bool {
        self.keys.is_some()
    }

    /// Caps sending at `bytes_per_sec` from now on.
    pub fn limit_rate(&mut self, bytes_per_sec: u64) {
        self.limit = Some(Limiter {
            bytes_per_sec: bytes_per_sec as f64,
            since: Instant::now(),
            sent: 0,
        });
    }

    /// Sends one frame.
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), String> {
        self.send_parts(kind, &[payload])
    }

    /// Sends one frame whose payload is `parts` one after the other.
    pub fn send_parts(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), String> {
        let plain_len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
        let len = plain_len + if self.keys.is_some() { TAG } else { 0 };
        if len > MAX_BODY {
            return Err(format!(
                "internal error: a {kind:?} frame of {len} bytes exceeds {MAX_BODY}"
            ));
        }
        let prefix = (len as u32).to_le_bytes();
        let mut body = Vec::with_capacity(4 + len);
        body.extend_from_slice(&prefix);
        body.push(kind as u8);
        for p in parts {
            body.extend_from_slice(p);
        }
        if let Some(k) = &mut self.keys {
            let sealed =
                k.tx.encrypt(
                    &nonce(k.sent),
                    Payload {
                        msg: &body[4..],
                        aad: &prefix,
                    },
                )
                .map_err(|_| "cannot encrypt a frame (internal error)".to_string())?;
            k.sent += 1;
            body.truncate(4);
            body.extend_from_slice(&sealed);
        }
        self.stream
            .write_all(&body)
            .map_err(|e| io_err(&format!("sending a {kind:?} frame"), e))?;
        self.bytes_sent += body.len() as u64;
        if let Some(l) = &mut self.limit {
            l.sent += body.len() as u64;
            let due = Duration::from_secs_f64(l.sent as f64 / l.bytes_per_sec);
            if let Some(wait) = due.checked_sub(l.since.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    /// Receives one frame: its kind and payload. A frame that is too large, fails its
    /// authentication or has an unknown kind is an error; an `Error` frame from the peer
    /// is returned as an error with its text.
    pub fn recv(&mut self) -> Result<(Kind, Vec<u8>), String> {
        let mut prefix = [0u8; 4];
        self.stream
            .read_exact(&mut prefix)
            .map_err(|e| io_err("waiting for a frame", e))?;
        let len = u32::from_le_bytes(prefix) as usize;
        let min = 1 + if self.keys.is_some() { TAG } else { 0 };
        if !(min..=MAX_BODY).contains(&len) {
            return Err(format!(
                "the peer sent a frame of {len} bytes, outside {min}..={MAX_BODY}: the stream \
                 is corrupted or not from vme-vmm"
            ));
        }
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .map_err(|e| io_err("reading a frame", e))?;
        if let Some(k) = &mut self.keys {
            body =
                k.rx.decrypt(
                    &nonce(k.received),
                    Payload {
                        msg: &body,
                        aad: &prefix,
                    },
                )
                .map_err(|_| {
                    "a frame failed authentication (corrupted, replayed, reordered or forged): \
                     the migration is abandoned"
                        .to_string()
                })?;
            k.received += 1;
        }
        let Some(kind) = Kind::from_u8(body[0]) else {
            return Err(format!(
                "the peer sent a frame of unknown kind {}: not the same vme-vmm version?",
                body[0]
            ));
        };
        body.remove(0);
        if kind == Kind::Error {
            return Err(format!(
                "the peer failed: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok((kind, body))
    }

    /// Receives a frame that must be of `want` kind.
    pub fn expect(&mut self, want: Kind) -> Result<Vec<u8>, String> {
        let (kind, payload) = self.recv()?;
        if kind != want {
            return Err(format!(
                "protocol error: expected a {want:?} frame, got {kind:?}"
            ));
        }
        Ok(payload)
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
