//! `vme --remote https://HOST[:PORT]`: the daemon's API over TLS 1.3 on TCP (see vmed's
//! `https` module). Both sides are self-signed and trusted by SHA-256 fingerprint:
//!
//! - this client's certificate and key are made on first use in `~/.config/vme/`
//!   (`client.crt`, `client.key` mode 0600); `vme remote cert` names the certificate, which
//!   the daemon's admin trusts with `vmed trust add FILE`;
//! - the server's certificate is pinned on first contact (trust on first use) in
//!   `~/.config/vme/servers/HOST_PORT`, or given with `--server-fingerprint`; a certificate
//!   that later differs is refused, naming both fingerprints.

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vme_api::tls;
pub use vme_api::tls::{fingerprint, normalize_fingerprint};

/// The port when the URL names none (Incus' and LXD's).
pub const DEFAULT_PORT: u16 = 8443;

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// `$XDG_CONFIG_HOME/vme`, else `$HOME/.config/vme`.
pub fn config_dir() -> Result<PathBuf, String> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("vme"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".config/vme")),
        None => Err(
            "neither HOME nor XDG_CONFIG_HOME is set: vme keeps its client \
                     certificate under ~/.config/vme; set HOME"
                .into(),
        ),
    }
}

/// `client.crt` and `client.key` in the config dir, made on the first call; returns the
/// certificate's path.
pub fn client_cert(dir: &Path) -> Result<PathBuf, String> {
    let (cert, key) = (dir.join("client.crt"), dir.join("client.key"));
    if cert.exists() {
        return Ok(cert);
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    tls::make_self_signed(
        dir,
        &cert,
        &key,
        Vec::new(),
        &format!("vme client of {user}"),
    )?;
    Ok(cert)
}

/// `HOST` and `PORT` of `https://HOST[:PORT][/]` (an IPv6 host in brackets).
pub fn parse_url(url: &str) -> Result<(String, u16), String> {
    let bad = |why: &str| {
        format!("--remote {url:?} {why}: give https://HOST:PORT, like https://server:8443")
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("is no https:// URL"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return Err(bad("must be just a scheme, a host and a port"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("has an unclosed '['"))?;
        (h, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("has a bad port"))?,
        None => DEFAULT_PORT,
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    Ok((host.to_string(), port))
}

/// Accepts the server's certificate if it has the expected fingerprint (or, with none
/// expected, any: trust on first use), and notes what it saw for the caller.
#[derive(Debug)]
struct Pinned {
    expected: Option<String>,
    seen: Arc<Mutex<Option<String>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp.clone());
        match &self.expected {
            Some(want) if *want != fp => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// One remote daemon: where it is, this client's identity, and the server pin.
pub struct Remote {
    pub url: String,
    host: String,
    port: u16,
    /// The fingerprint given with --server-fingerprint.
    given: Option<String>,
    /// `servers/HOST_PORT`: the pinned fingerprint.
    pin_file: PathBuf,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl Remote {
    pub fn new(url: &str, server_fingerprint: Option<&str>) -> Result<Remote, String> {
        let (host, port) = parse_url(url)?;
        let given = server_fingerprint.map(normalize_fingerprint).transpose()?;
        let dir = config_dir()?;
        let cert_path = client_cert(&dir)?;
        let key_path = dir.join("client.key");
        let cert = CertificateDer::from_pem_file(&cert_path).map_err(|e| {
            format!(
                "cannot read the client certificate {}: {e}; remove it to make a new one",
                cert_path.display()
            )
        })?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
            format!(
                "cannot read the client key {}: {e}; remove {} to make a new pair",
                key_path.display(),
                cert_path.display()
            )
        })?;
        // File names keep to letters, digits, '.' and '-' ('_' comes before the port).
        let safe: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        Ok(Remote {
            url: url.to_string(),
            pin_file: dir.join("servers").join(format!("{safe}_{port}")),
            host,
            port,
            given,
            cert,
            key,
        })
    }

    /// The fingerprint pinned for this server, if any.
    fn pinned(&self) -> io::Result<Option<String>> {
        match std::fs::read_to_string(&self.pin_file) {
            Ok(t) => normalize_fingerprint(&t).map(Some).map_err(|e| {
                io::Error::other(format!(
                    "the pin file {} is damaged ({e}): remove it to pin the server anew",
                    self.pin_file.display()
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::other(format!(
                "cannot read the pin file {}: {e}",
                self.pin_file.display()
            ))),
        }
    }

    /// A TLS connection to the daemon, the handshake done and the server's certificate
    /// checked against its pin (pinned now if this is the first contact).
    pub fn connect(&self) -> io::Result<TlsStream> {
        let pinned = self.pinned()?;
        let expected = self.given.clone().or_else(|| pinned.clone());
        let seen = Arc::new(Mutex::new(None));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(Pinned {
            expected: expected.clone(),
            seen: seen.clone(),
            algorithms: provider.signature_verification_algorithms,
        });
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(|e| io::Error::other(format!("the client key is unusable: {e}")))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(self.host.clone()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{:?} is no host name or address", self.host),
            )
        })?;
        let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(io::Error::other)?;
        let tcp = self.tcp()?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
                return Err(match (expected, seen) {
                    (Some(want), Some(got)) if want != got => self.changed(&want, &got),
                    _ => io::Error::new(e.kind(), format!("the TLS handshake failed: {e}")),
                });
            }
        }
        if pinned.is_none() {
            let got = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(fp) = got {
                self.pin(&fp)?;
            }
        }
        Ok(tls)
    }

    fn tcp(&self) -> io::Result<TcpStream> {
        use std::net::ToSocketAddrs;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
        for addr in (self.host.as_str(), self.port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The refusal of a server whose certificate is not the expected one.
    fn changed(&self, want: &str, got: &str) -> io::Error {
        let msg = if self.given.is_some() {
            format!(
                "the server certificate is not the one --server-fingerprint names: expected \
                 SHA-256 {want}, the server showed {got}; check the fingerprint vmed printed \
                 at startup"
            )
        } else {
            format!(
                "the server certificate changed since it was pinned in {}: pinned SHA-256 \
                 {want}, the server showed {got}. Someone may be intercepting the connection; \
                 if the daemon's certificate was remade on purpose (compare with what vmed \
                 printed at startup), remove that file or pass --server-fingerprint {got}",
                self.pin_file.display()
            )
        };
        io::Error::new(io::ErrorKind::PermissionDenied, msg)
    }

    /// Records the fingerprint of a server met for the first time, and says so.
    fn pin(&self, fp: &str) -> io::Result<()> {
        if let Some(dir) = self.pin_file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        tls::write_new(&self.pin_file, format!("{fp}\n").as_bytes(), 0o644)
            .map_err(io::Error::other)?;
        eprintln!(
            "vme: first contact with {}: pinned its certificate, SHA-256 {fp} (check it \
             against what vmed printed at startup)",
            self.url
        );
        Ok(())
    }
}

/// A TLS connection as a local socket, for the console's two threads (one reading, one
/// writing), which a TLS session cannot be split into: a thread relays between the TLS
/// connection and one end of a socket pair, and the caller gets the other end.
pub fn into_unix(tls: TlsStream) -> io::Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair()?;
    std::thread::spawn(move || {
        let _ = relay(tls, ours);
    });
    Ok(theirs)
}

/// Moves bytes both ways until either side ends, waiting on both with poll(2).
fn relay(tls: TlsStream, mut local: UnixStream) -> io::Result<()> {
    let rustls::StreamOwned {
        mut conn, mut sock, ..
    } = tls;
    sock.set_read_timeout(None)?;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        // Plaintext the session already holds (read along with the upgrade's head) first.
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => local.write_all(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        let mut fds = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: local.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call's duration.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            if conn.read_tls(&mut sock)? == 0 {
                return Ok(());
            }
            conn.process_new_packets().map_err(io::Error::other)?;
        }
        if fds[1].revents != 0 {
            match local.read(&mut buf) {
                Ok(0) | Err(_) => {
                    // The user detached: end the session properly.
                    conn.send_close_notify();
                    while conn.wants_write() {
                        conn.write_tls(&mut sock)?;
                    }
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                    return Ok(());
                }
                Ok(n) => conn.writer().write_all(&buf[..n])?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("https://h:9000").unwrap(), ("h".into(), 9000));
        assert_eq!(parse_url("https://h/").unwrap(), ("h".into(), DEFAULT_PORT));
        assert_eq!(parse_url("https://[::1]:1").unwrap(), ("::1".into(), 1));
        for bad in [
            "http://h:1",
            "h:1",
            "https://",
            "https://h:0",
            "https://h:x",
            "https://h:1/x",
            "https://u@h:1",
            "https://[::1:1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
