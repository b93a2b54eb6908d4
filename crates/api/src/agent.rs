//! The guest agent's protocol (`vme-agent`, listening on vsock port [`AGENT_PORT`]) and its
//! host-side client, which reaches the agent through the monitor's vsock Unix socket.
//!
//! One connection carries any number of request/reply exchanges, each a frame:
//! a 4-byte big-endian length and that many bytes of JSON (a [`Request`] or a [`Reply`]),
//! then a 4-byte big-endian length and that many bytes of raw data (stdin, file contents,
//! command output; often empty). Data stays binary and is never inflated by JSON escaping.

pub use crate::identity::{IdentityApplied, MacChange, Seed};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Largest JSON part of a frame.
pub const MAX_JSON: u32 = 64 << 10;
/// Largest data part of a frame: stdin, a file, or a command's stdout and stderr together.
pub const MAX_DATA: u32 = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The agent's version; a cheap liveness check.
    Ping,
    /// Runs `argv` (no shell) with the frame's data as stdin; waits for it to end.
    Exec {
        argv: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        env: Vec<(String, String)>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
        /// Killed (SIGKILL) after this long; 0 waits forever.
        #[serde(default)]
        timeout_ms: u64,
    },
    /// The file's contents as the reply's data.
    ReadFile { path: String },
    /// Replaces the file with the frame's data (created with `mode` when new).
    WriteFile {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
    },
    /// What the guest says about itself: uptime, load, memory.
    Stats,
    /// A clone's new identity (sent by the monitor after `--restore DIR --clone`): mix
    /// `seed` into the kernel's random pool and reseed its CRNG, and give each interface
    /// whose MAC is a change's `old` its `new` one.
    Identity {
        seed: Seed,
        #[serde(default)]
        macs: Vec<MacChange>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Pong {
        version: String,
    },
    /// The data holds stdout followed by stderr.
    Exited {
        /// The exit status, or `None` when a signal ended the command.
        code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        stdout_len: u64,
        timed_out: bool,
        /// Output past [`MAX_DATA`] was dropped.
        truncated: bool,
    },
    File {
        mode: u32,
    },
    Written {
        bytes: u64,
    },
    Stats(GuestStats),
    Identity(IdentityApplied),
    Error {
        message: String,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    pub uptime_s: f64,
    pub load_1m: f64,
    pub mem_total_kib: u64,
    pub mem_free_kib: u64,
    pub mem_available_kib: u64,
    pub processes: u64,
    pub kernel: String,
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, json: &impl Serialize, data: &[u8]) -> io::Result<()> {
    let json = serde_json::to_vec(json).map_err(io::Error::other)?;
    let too_big = |what, len, max| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} is {len} bytes; a frame carries at most {max}"),
        )
    };
    if json.len() > MAX_JSON as usize {
        return Err(too_big("the request", json.len(), MAX_JSON));
    }
    if data.len() > MAX_DATA as usize {
        return Err(too_big("the data", data.len(), MAX_DATA));
    }
    let mut head = Vec::with_capacity(8 + json.len());
    head.extend_from_slice(&(json.len() as u32).to_be_bytes());
    head.extend_from_slice(&json);
    head.extend_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&head)?;
    w.write_all(data)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of stream (between frames).
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> io::Result<Option<(T, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let json_len = u32::from_be_bytes(len);
    if json_len > MAX_JSON {
        return Err(bad(format!(
            "a frame announces {json_len} bytes of JSON; at most {MAX_JSON} are allowed"
        )));
    }
    let mut json = vec![0u8; json_len as usize];
    r.read_exact(&mut json)?;
    let value = serde_json::from_slice(&json).map_err(|e| bad(format!("bad frame JSON: {e}")))?;
    r.read_exact(&mut len)?;
    let data_len = u32::from_be_bytes(len);
    if data_len > MAX_DATA {
        return Err(bad(format!(
            "a frame announces {data_len} bytes of data; at most {MAX_DATA} are allowed"
        )));
    }
    let mut data = Vec::new();
    r.take(u64::from(data_len)).read_to_end(&mut data)?;
    if data.len() != data_len as usize {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some((value, data)))
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// What a command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
    pub truncated: bool,
}

/// The status a command's runner exits with: the command's own; 128 + N for a signal N
/// (as shells report it); 124 when its timeout killed it (as timeout(1)); 255 when neither
/// is known (as ssh reports its own failures).
impl ExecOutput {
    pub const TIMED_OUT: u8 = 124;
    pub const UNKNOWN: u8 = 255;

    pub fn status(&self) -> u8 {
        match (self.timed_out, self.code, self.signal) {
            (true, _, _) => Self::TIMED_OUT,
            (false, Some(code), _) => code as u8,
            (false, None, Some(sig)) => 128u8.wrapping_add(sig as u8),
            (false, None, None) => Self::UNKNOWN,
        }
    }
}

/// A connection to a guest's agent.
pub struct AgentClient {
    stream: UnixStream,
}

impl AgentClient {
    /// Connects through the monitor's vsock socket `uds` to guest port `port`, waiting up
    /// to `timeout` for each step (the agent may still be starting: callers retry).
    pub fn connect(uds: &Path, port: u32, timeout: Duration) -> io::Result<AgentClient> {
        let ctx = |e: io::Error, what: &str| {
            io::Error::new(
                e.kind(),
                format!("vsock socket {}: {what}: {e}", uds.display()),
            )
        };
        let mut stream = UnixStream::connect(uds).map_err(|e| {
            ctx(
                e,
                "cannot connect (is the VM running with --vsock ...,uds=this path?)",
            )
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(|e| ctx(e, "cannot send CONNECT"))?;
        // Byte by byte, so nothing after the line is consumed here.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            match stream.read(&mut byte) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!(
                            "vsock socket {}: nothing listens on guest port {port} (is the \
                             guest up and its agent started?)",
                            uds.display()
                        ),
                    ));
                }
                Ok(_) => line.push(byte[0]),
                Err(e) => return Err(ctx(e, "no answer to CONNECT")),
            }
            if line.len() > 64 {
                return Err(bad("the vsock socket answered CONNECT with garbage".into()));
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(bad(format!(
                "the vsock socket answered CONNECT with {:?}",
                String::from_utf8_lossy(&line)
            )));
        }
        Ok(AgentClient { stream })
    }

    /// Waits (up to `within`) until the agent answers, e.g. while the guest boots.
    pub fn wait(uds: &Path, within: Duration) -> io::Result<AgentClient> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let attempt = AgentClient::connect(uds, AGENT_PORT, Duration::from_secs(10))
                .and_then(|mut c| c.ping().map(|_| c));
            match attempt {
                Ok(c) => return Ok(c),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Changes how long each read and write may take (long commands need more).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)
    }

    fn call(&mut self, req: &Request, data: &[u8]) -> io::Result<(Reply, Vec<u8>)> {
        write_frame(&mut self.stream, req, data)?;
        match read_frame::<Reply>(&mut self.stream)? {
            Some((Reply::Error { message }, _)) => {
                Err(io::Error::other(format!("the guest agent says: {message}")))
            }
            Some(r) => Ok(r),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the guest agent closed the connection without replying",
            )),
        }
    }

    pub fn ping(&mut self) -> io::Result<String> {
        match self.call(&Request::Ping, &[])? {
            (Reply::Pong { version }, _) => Ok(version),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Runs `argv` in the guest with `stdin`; `timeout` 0 waits forever.
    pub fn exec(
        &mut self,
        argv: &[String],
        stdin: &[u8],
        timeout: Duration,
    ) -> io::Result<ExecOutput> {
        self.exec_env(argv, &[], stdin, timeout)
    }

    /// [`Self::exec`] with variables added to the command's environment.
    pub fn exec_env(
        &mut self,
        argv: &[String],
        env: &[(String, String)],
        stdin: &[u8],
        timeout: Duration,
    ) -> io::Result<ExecOutput> {
        let req = Request::Exec {
            argv: argv.to_vec(),
            env: env.to_vec(),
            cwd: None,
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.call(&req, stdin)? {
            (
                Reply::Exited {
                    code,
                    signal,
                    stdout_len,
                    timed_out,
                    truncated,
                },
                mut data,
            ) => {
                let split = (stdout_len as usize).min(data.len());
                let stderr = data.split_off(split);
                Ok(ExecOutput {
                    code,
                    signal,
                    stdout: data,
                    stderr,
                    timed_out,
                    truncated,
                })
            }
            (other, _) => Err(unexpected(&other)),
        }
    }

    pub fn read_file(&mut self, path: &str) -> io::Result<Vec<u8>> {
        match self.call(&Request::ReadFile { path: path.into() }, &[])? {
            (Reply::File { .. }, data) => Ok(data),
            (other, _) => Err(unexpected(&other)),
        }
    }

    pub fn write_file(&mut self, path: &str, data: &[u8], mode: Option<u32>) -> io::Result<()> {
        let req = Request::WriteFile {
            path: path.into(),
            mode,
        };
        match self.call(&req, data)? {
            (Reply::Written { .. }, _) => Ok(()),
            (other, _) => Err(unexpected(&other)),
        }
    }

    pub fn stats(&mut self) -> io::Result<GuestStats> {
        match self.call(&Request::Stats, &[])? {
            (Reply::Stats(s), _) => Ok(s),
            (other, _) => Err(unexpected(&other)),
        }
    }
}

impl AgentClient {
    /// Gives a clone its new identity (see [`Request::Identity`]).
    pub fn identity(&mut self, seed: Seed, macs: &[MacChange]) -> io::Result<IdentityApplied> {
        let req = Request::Identity {
            seed,
            macs: macs.to_vec(),
        };
        match self.call(&req, &[])? {
            (Reply::Identity(applied), _) => Ok(applied),
            (other, _) => Err(unexpected(&other)),
        }
    }
}

fn unexpected(r: &Reply) -> io::Error {
    bad(format!("the guest agent sent an unexpected reply: {r:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_frames_are_refused() {
        let mut buf = Vec::new();
        let req = Request::Exec {
            argv: vec!["cat".into()],
            env: vec![],
            cwd: None,
            timeout_ms: 5,
        };
        write_frame(&mut buf, &req, b"stdin\0bytes").unwrap();
        write_frame(&mut buf, &Request::Ping, &[]).unwrap();
        let mut r = &buf[..];
        let (got, data) = read_frame::<Request>(&mut r).unwrap().unwrap();
        assert_eq!((got, data.as_slice()), (req, &b"stdin\0bytes"[..]));
        assert_eq!(
            read_frame::<Request>(&mut r).unwrap().unwrap().0,
            Request::Ping
        );
        assert!(
            read_frame::<Request>(&mut r).unwrap().is_none(),
            "clean end"
        );

        let mut huge = (MAX_JSON + 1).to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(read_frame::<Request>(&mut &huge[..]).is_err());
        let mut junk = 3u32.to_be_bytes().to_vec();
        junk.extend_from_slice(b"{x}\0\0\0\0");
        assert!(read_frame::<Request>(&mut &junk[..]).is_err());
        let mut cut = Vec::new();
        write_frame(&mut cut, &Request::Stats, b"12345").unwrap();
        cut.truncate(cut.len() - 2);
        assert!(read_frame::<Request>(&mut &cut[..]).is_err(), "short data");
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"read_file","path":"/a","x":1}"#).is_err(),
            "unknown fields are refused"
        );
    }
}
