//! Just enough HTTP/1.1 to talk to vmed over its Unix socket or over TLS (`--remote`): one
//! request per connection (`Connection: close`), a body read to the end. The CLI needs no
//! async runtime for that.

use crate::remote::{Remote, TlsStream};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Who the requests are from and which project they act in (`--token`/VME_TOKEN,
/// `--project`), set once at startup.
#[derive(Debug, Default)]
pub struct Identity {
    pub token: Option<String>,
    pub project: Option<String>,
}

static IDENTITY: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();

/// Sets the identity every request carries (the first call wins).
pub fn set_identity(id: Identity) {
    let _ = IDENTITY.set(id);
}

/// `Authorization: Bearer TOKEN\r\n`, or nothing (the daemon then goes by the socket's
/// peer uid, or the TLS certificate).
fn auth_header() -> String {
    match IDENTITY.get().and_then(|i| i.token.as_deref()) {
        Some(t) => format!("Authorization: Bearer {t}\r\n"),
        None => String::new(),
    }
}

/// `path` with `project=P` added to its query when a project is chosen.
pub fn with_project(path: &str) -> String {
    match IDENTITY.get().and_then(|i| i.project.as_deref()) {
        Some(p) => {
            let sep = if path.contains('?') { '&' } else { '?' };
            let enc: String = p
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("{path}{sep}project={enc}")
        }
        None => path.to_string(),
    }
}

/// Where the daemon is.
pub enum Endpoint {
    Unix(PathBuf),
    Tls(Box<Remote>),
}

impl Endpoint {
    fn connect(&self) -> io::Result<Stream> {
        Ok(match self {
            Endpoint::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
            Endpoint::Tls(r) => Stream::Tls(Box::new(r.connect()?)),
        })
    }
}

/// A connection to the daemon, either kind.
pub enum Stream {
    Unix(UnixStream),
    Tls(Box<TlsStream>),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.sock.set_read_timeout(t),
        }
    }

    /// The connection as a local socket that can be cloned for a reader and a writer
    /// thread (a TLS one through a relay thread).
    pub fn into_unix(self) -> io::Result<UnixStream> {
        match self {
            Stream::Unix(s) => Ok(s),
            Stream::Tls(s) => crate::remote::into_unix(*s),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            // A daemon that closes without TLS's close_notify has still sent its whole
            // reply (HTTP's framing says where it ends): take that as the end.
            Stream::Tls(s) => match s.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// How long the daemon may take to answer an attach.
const TIMEOUT: Duration = Duration::from_secs(300);

/// Sends one request; returns the status code and the body. `timeout` bounds the wait for
/// the reply (a stop waits out the guest's power-off; an exec, its command).
pub fn request_within(
    ep: &Endpoint,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let mut s = ep.connect()?;
    let (path, auth) = (&with_project(path), auth_header());
    s.set_read_timeout(Some(timeout))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: vme\r\n{auth}Connection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    s.flush()?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    parse(&reply)
}

/// A GET that asks to switch the connection to `protocol`. On `101 Switching Protocols`
/// returns the connection, now raw both ways; otherwise the status code and the body.
pub fn upgrade(
    ep: &Endpoint,
    path: &str,
    protocol: &str,
) -> io::Result<Result<Stream, (u16, String)>> {
    let mut s = ep.connect()?;
    let (path, auth) = (&with_project(path), auth_header());
    s.set_read_timeout(Some(TIMEOUT))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: vme\r\n{auth}Connection: upgrade\r\nUpgrade: {protocol}\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    s.flush()?;
    // Byte by byte up to the end of the head: what follows a 101 is the raw stream.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 << 10 {
            return Err(bad("the reply's head is too long"));
        }
        match s.read(&mut byte)? {
            0 => return Err(bad("the daemon closed the connection before replying")),
            _ => head.push(byte[0]),
        }
    }
    let code: u16 = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("the reply has no status code"))?;
    if code == 101 {
        s.set_read_timeout(None)?;
        return Ok(Ok(s));
    }
    // The connection stays open (no `Connection: close` here): read just the body.
    let len = String::from_utf8_lossy(&head)
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<u64>().ok())?
        })
        .ok_or_else(|| bad("the refusal has no Content-Length"))?;
    let mut rest = Vec::new();
    Read::by_ref(&mut s).take(len).read_to_end(&mut rest)?;
    head.extend_from_slice(&rest);
    Ok(Err(parse(&head)?))
}

/// Sends one GET whose reply is a stream of lines (chunked, as `/1.0/events` sends them)
/// and hands each line to `line` until it returns false or the daemon ends the stream. No
/// timeout: a stream may be quiet for long. A reply that is no stream (an error) comes back
/// whole, as `Some((code, body))`.
pub fn stream_lines(
    ep: &Endpoint,
    path: &str,
    mut line: impl FnMut(&str) -> io::Result<bool>,
) -> io::Result<Option<(u16, String)>> {
    let mut s = ep.connect()?;
    let (path, auth) = (&with_project(path), auth_header());
    let req = format!("GET {path} HTTP/1.1\r\nHost: vme\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes())?;
    s.flush()?;
    let mut r = io::BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            return Err(bad("the reply has no end of headers"));
        }
        if l == "\r\n" {
            break;
        }
        head.push_str(&l);
    }
    let code: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("the reply has no status code"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if code != 200 || !chunked {
        let mut rest = Vec::new();
        r.read_to_end(&mut rest)?;
        let mut whole = format!("{head}\r\n").into_bytes();
        whole.extend(rest);
        return parse(&whole).map(Some);
    }
    let mut pending = Vec::new();
    loop {
        let mut size = String::new();
        if r.read_line(&mut size)? == 0 {
            return Ok(None);
        }
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            return Ok(None);
        }
        let mut chunk = vec![0; size + 2];
        r.read_exact(&mut chunk)?;
        pending.extend_from_slice(&chunk[..size]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let l: Vec<u8> = pending.drain(..=end).collect();
            if !line(String::from_utf8_lossy(&l[..end]).trim_end())? {
                return Ok(None);
            }
        }
    }
}

/// Sends a request whose body, `len` bytes of `content_type`, streams from `body`; returns
/// the status code and the reply. A daemon that refuses the body early replies before
/// reading it all: that reply is returned, not the broken pipe.
pub fn upload(
    ep: &Endpoint,
    path: &str,
    content_type: &str,
    len: u64,
    body: &mut dyn Read,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let mut s = ep.connect()?;
    let (path, auth) = (&with_project(path), auth_header());
    s.set_read_timeout(Some(timeout))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: vme\r\n{auth}Connection: close\r\n\
         Content-Type: {content_type}\r\nContent-Length: {len}\r\n\r\n"
    );
    let sent = s
        .write_all(head.as_bytes())
        .and_then(|()| io::copy(body, &mut s).map(drop))
        .and_then(|()| s.flush());
    let mut reply = Vec::new();
    let read = s.read_to_end(&mut reply);
    match (parse(&reply), sent) {
        (Ok(r), _) => Ok(r),
        (Err(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(read.err().unwrap_or(e)),
    }
}

/// A GET whose reply body, on 200, is streamed to `out` (de-chunked); its length in bytes.
/// Any other status: the code and the (error) body.
pub fn download(
    ep: &Endpoint,
    path: &str,
    out: &mut dyn Write,
) -> io::Result<Result<u64, (u16, String)>> {
    let mut s = ep.connect()?;
    let (path, auth) = (&with_project(path), auth_header());
    s.set_read_timeout(Some(TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: vme\r\n{auth}Connection: close\r\n\r\n"
    )?;
    s.flush()?;
    let mut r = io::BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("the reply has no end of headers"));
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let code: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("the reply has no status code"))?;
    let lower = head.to_ascii_lowercase();
    let chunked = lower
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    if code != 200 {
        let mut rest = Vec::new();
        r.read_to_end(&mut rest)?;
        let text = String::from_utf8_lossy(&rest).into_owned();
        return Ok(Err((code, if chunked { dechunk(&text)? } else { text })));
    }
    if !chunked {
        return io::copy(&mut r, out).map(Ok);
    }
    let mut total = 0u64;
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let size = u64::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size: the download was cut short"))?;
        if size == 0 {
            return Ok(Ok(total));
        }
        let n = io::copy(&mut (&mut r).take(size), out)?;
        if n != size {
            return Err(bad("the download was cut short"));
        }
        total += n;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Splits a whole HTTP response into its status code and body (de-chunked if need be).
fn parse(reply: &[u8]) -> io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(reply);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("the reply has no end of headers"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("the reply has no status code"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> io::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").ok_or_else(|| bad("truncated chunk"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or_else(|| bad("truncated chunk"))?;
        out.push_str(chunk);
        s = rest.get(size + 2..).ok_or_else(|| bad("truncated chunk"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_replies() {
        let r = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse(r).unwrap(), (404, "{}".into()));
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse(r).unwrap(), (200, "{\"a\":1}".into()));
        assert!(parse(b"garbage").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nab").is_err());
    }

    /// Serves one canned reply on a fresh socket; returns its path.
    fn serve(reply: &'static [u8]) -> std::path::PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vme-http-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // The whole request first: a reply and close after its first part would make
            // the client's next write fail (EPIPE).
            let mut req = Vec::new();
            let mut buf = [0; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(reply);
        });
        path
    }

    #[test]
    fn streamed_lines() {
        // Lines split across chunks, two in one chunk, a final empty chunk.
        let p = serve(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              4\r\n{\"a\"\r\n7\r\n:1}\n{}\n\r\n3\r\n[]\n\r\n0\r\n\r\n",
        );
        let mut got = Vec::new();
        let end = stream_lines(&Endpoint::Unix(p), "/1.0/events", |l| {
            got.push(l.to_string());
            Ok(true)
        })
        .unwrap();
        assert_eq!(end, None);
        assert_eq!(got, ["{\"a\":1}", "{}", "[]"]);

        // The reader may stop early.
        let p = serve(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\na\nb\n\r\n");
        let mut n = 0;
        stream_lines(&Endpoint::Unix(p), "/", |_| {
            n += 1;
            Ok(false)
        })
        .unwrap();
        assert_eq!(n, 1);

        // An error reply comes back whole.
        let p = serve(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}");
        let r = stream_lines(&Endpoint::Unix(p), "/", |_| Ok(true)).unwrap();
        assert_eq!(r, Some((400, "{}".to_string())));
    }
}
