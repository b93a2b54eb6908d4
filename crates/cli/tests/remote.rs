//! `vme --remote` against a real daemon serving HTTPS on 127.0.0.1 (`vmed --https`), with a
//! real riscv64 VM: an untrusted client is refused with 403, `vmed trust add` of the CLI's
//! certificate lets it in, the server certificate is made once and kept across restarts,
//! and a remade one is refused by the CLI naming both fingerprints.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VME: &str = env!("CARGO_BIN_EXE_vme");

#[path = "../../vmed/tests/support/mod.rs"]
mod support;
use support::{bin, gather, kill_all};

struct Vmed {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    /// How many times it was started (each start's stderr goes to its own file).
    starts: u32,
}

impl Vmed {
    fn new(test: &str) -> Vmed {
        let dir = std::env::temp_dir().join(format!("vme-remote-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("home")).unwrap();
        // A free port: bound to learn it, released for vmed.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Vmed {
            child: None,
            dir,
            port,
            starts: 0,
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Starts vmed with HTTPS; returns what it printed up to serving HTTPS.
    fn start(&mut self) -> String {
        self.starts += 1;
        let log = self.dir.join(format!("vmed-{}.log", self.starts));
        let socket = self.dir.join("vme.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(bin("vmed"))
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(self.state())
            .arg("--https")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["--stop-timeout", "3", "--cgroups", "false"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&socket).is_err()
            || TcpStream::connect(("127.0.0.1", self.port)).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "vmed did not serve: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::read_to_string(&log).unwrap()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `vme ARGS` with this test's HOME; `remote` adds `--remote URL`.
    fn vme(&self, remote: bool, args: &[&str]) -> Output {
        let mut c = Command::new(VME);
        c.env("HOME", self.dir.join("home"))
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("VME_REMOTE")
            // A stray socket setting must not matter with --remote.
            .env("VME_SOCKET", "/nonexistent/vme.sock")
            .stdin(Stdio::null());
        if remote {
            c.args(["--remote", &self.url()]);
        }
        c.args(args).output().unwrap()
    }

    /// `vme --remote URL ARGS` left running, its stdio piped; its stdout gathered.
    fn spawn_remote(&self, args: &[&str]) -> (Child, Arc<Mutex<Vec<u8>>>) {
        let mut child = Command::new(VME)
            .env("HOME", self.dir.join("home"))
            .env_remove("XDG_CONFIG_HOME")
            .args(["--remote", &self.url()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = gather(child.stdout.take().unwrap());
        (child, out)
    }

    fn vmed(&self, args: &[&str]) -> Output {
        Command::new(bin("vmed"))
            .arg("--state-dir")
            .arg(self.state())
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Vmed {
    fn drop(&mut self) {
        self.stop();
        // Monitors outlive the daemon by design: end any a failed test left behind.
        kill_all(&format!("{}/", self.dir.display()));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn image(file: &str) -> String {
    support::image(file).display().to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The stderr of a command that must fail.
fn fails(out: Output) -> String {
    assert!(!out.status.success(), "succeeded: {}", text(&out.stdout));
    text(&out.stderr)
}

/// The server fingerprint in vmed's startup lines, and whether it was just made.
fn server_fingerprint(log: &str) -> (String, bool) {
    let line = log
        .lines()
        .find(|l| l.contains("server certificate"))
        .unwrap_or_else(|| panic!("vmed printed no certificate line: {log}"));
    let fp = line.rsplit(' ').next().unwrap().to_string();
    assert_eq!(fp.len(), 64, "{line}");
    (fp, line.contains("made the"))
}

/// Accepts any server certificate: the test's bare TLS client checks only the server side
/// of client authentication.
#[derive(Debug)]
struct AnyServer(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A TLS client with no certificate asks for the VM list: the reply, or the error.
fn request_without_client_cert(port: u16) -> Result<String, String> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = std::sync::Arc::new(AnyServer(provider.signature_verification_algorithms));
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), "localhost".try_into().unwrap())
            .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut reply = String::new();
    tls.write_all(b"GET /1.0/vms HTTP/1.1\r\nHost: vme\r\nConnection: close\r\n\r\n")
        .and_then(|()| tls.read_to_string(&mut reply))
        .map_err(|e| e.to_string())?;
    Ok(reply)
}

#[test]
fn remote_cli_over_https_with_client_certificates_and_a_pinned_server() {
    let mut d = Vmed::new("https");
    let (server_fp, made) = server_fingerprint(&d.start());
    assert!(made, "the first start makes the certificate");
    let tls = d.state().join("tls");
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(tls.join("server.key")), 0o600);

    // The client's identity, made on first use.
    let cert = ok(d.vme(false, &["remote", "cert"]));
    let mut lines = cert.lines();
    let cert_path = lines.next().unwrap().to_string();
    let client_fp = lines
        .next()
        .unwrap()
        .trim_start_matches("SHA-256 ")
        .to_string();
    let config = d.dir.join("home/.config/vme");
    assert_eq!(cert_path, config.join("client.crt").display().to_string());
    assert_eq!(mode(config.join("client.key")), 0o600);
    // Asked again: the same certificate.
    assert_eq!(ok(d.vme(false, &["remote", "cert"])), cert);

    // Untrusted: 403, saying how to be trusted; the server pinned on first contact.
    let e = fails(d.vme(true, &["list"]));
    assert!(
        e.contains("HTTP 403") && e.contains("vmed trust add"),
        "{e}"
    );
    assert!(e.contains(&client_fp), "{e}");
    assert!(
        e.contains(&format!("pinned its certificate, SHA-256 {server_fp}")),
        "{e}"
    );
    // Without a client certificate at all, no request gets through.
    let e = request_without_client_cert(d.port).unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // Trusted: every command works (the daemon need not restart).
    let added = ok(d.vmed(&["trust", "add", &cert_path]));
    assert_eq!(added.trim(), format!("trusted {client_fp}"));
    assert!(ok(d.vmed(&["trust", "list"])).contains(&client_fp));
    assert!(ok(d.vme(true, &["list"])).starts_with("NAME"));
    // The event stream over TLS, followed while the VM comes and goes.
    let (mut events, seen) = d.spawn_remote(&["events", "--type", "lifecycle"]);
    let (kernel, initrd) = (image("Image"), image("initramfs.cpio"));
    let launched = ok(d.vme(
        true,
        &[
            "launch", "r1", "--arch", "riscv64", "--kernel", &kernel, "--initrd", &initrd,
            "--memory", "128M",
        ],
    ));
    assert_eq!(launched.trim(), "r1: running");
    let list = ok(d.vme(true, &["list", "--format", "json"]));
    assert!(list.contains("\"running\""), "{list}");
    // Through VME_REMOTE as well.
    let info = Command::new(VME)
        .env("HOME", d.dir.join("home"))
        .env_remove("XDG_CONFIG_HOME")
        .env("VME_REMOTE", d.url())
        .args(["info", "r1"])
        .output()
        .unwrap();
    assert!(ok(info).contains("riscv64"));

    // The console over TLS (through the CLI's relay): keystrokes in, output out, Ctrl-a q.
    let (mut console, screen) = d.spawn_remote(&["console", "r1"]);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !text(&screen.lock().unwrap()).contains("tls-42") {
        assert!(
            Instant::now() < deadline,
            "no answer on the console: {}",
            text(&screen.lock().unwrap())
        );
        let keys = console.stdin.as_mut().unwrap();
        keys.write_all(b"echo tls-$((6*7))\n").unwrap();
        keys.flush().unwrap();
        std::thread::sleep(Duration::from_secs(2));
    }
    console.stdin.as_mut().unwrap().write_all(b"\x01q").unwrap();
    let out = console.wait_with_output().unwrap();
    assert!(
        out.status.success() && text(&out.stderr).contains("Detached"),
        "{}",
        text(&out.stderr)
    );

    assert_eq!(
        ok(d.vme(true, &["stop", "r1", "--force"])).trim(),
        "r1: stopped"
    );
    assert_eq!(ok(d.vme(true, &["rm", "r1"])).trim(), "r1: deleted");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text(&seen.lock().unwrap()).contains("r1: stopped -> - (delete)") {
        assert!(
            Instant::now() < deadline,
            "events: {}",
            text(&seen.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = events.kill();
    let _ = events.wait();
    let seen = text(&seen.lock().unwrap());
    assert!(seen.contains("r1: starting -> running (start)"), "{seen}");

    // A restart keeps the certificate: the pin still holds.
    d.stop();
    let (again, made) = server_fingerprint(&d.start());
    assert_eq!((again.as_str(), made), (server_fp.as_str(), false));
    ok(d.vme(true, &["list"]));

    // A remade certificate is refused, naming both fingerprints...
    d.stop();
    std::fs::remove_file(tls.join("server.crt")).unwrap();
    std::fs::remove_file(tls.join("server.key")).unwrap();
    let (new_fp, made) = server_fingerprint(&d.start());
    assert!(made && new_fp != server_fp);
    let e = fails(d.vme(true, &["list"]));
    assert!(
        e.contains("changed") && e.contains(&server_fp) && e.contains(&new_fp),
        "{e}"
    );
    // ... unless the user says which one to expect.
    ok(d.vme(true, &["--server-fingerprint", &new_fp, "list"]));
    let e = fails(d.vme(true, &["--server-fingerprint", &server_fp, "list"]));
    assert!(e.contains(&new_fp), "{e}");

    // Trust withdrawn: refused again.
    ok(d.vmed(&["trust", "remove", &client_fp]));
    let e = fails(d.vme(true, &["--server-fingerprint", &new_fp, "list"]));
    assert!(e.contains("HTTP 403"), "{e}");
}

/// A trusted certificate bound to a user is that user over HTTPS (unbound, it is root, as
/// before access control); a token still takes precedence.
#[test]
fn a_client_certificate_bound_to_a_user_is_that_user() {
    let mut d = Vmed::new("cert-user");
    d.start();
    let cert = ok(d.vme(false, &["remote", "cert"]));
    let mut lines = cert.lines();
    let cert_path = lines.next().unwrap().to_string();
    let client_fp = lines
        .next()
        .unwrap()
        .trim_start_matches("SHA-256 ")
        .to_string();
    ok(d.vmed(&["trust", "add", &cert_path]));
    assert!(ok(d.vme(true, &["whoami"])).starts_with("root"));
    let sock = d.dir.join("vme.sock").display().to_string();
    let local = |args: &[&str]| {
        let mut all = vec!["--socket", sock.as_str()];
        all.extend_from_slice(args);
        ok(d.vme(false, &all))
    };
    local(&[
        "user",
        "add",
        "carl",
        "--project",
        "default",
        "--cert",
        &client_fp,
    ]);
    let me = ok(d.vme(true, &["whoami"]));
    assert!(
        me.starts_with("carl (clearance unclassified; roles default:user"),
        "{me}"
    );
    let e = fails(d.vme(true, &["user", "list"]));
    assert!(e.contains("HTTP 403") || e.contains("admin"), "{e}");
    let root_token = local(&["token", "create", "root"]);
    let me = ok(d.vme(true, &["--token", root_token.trim(), "whoami"]));
    assert!(
        me.starts_with("root"),
        "the token wins over the certificate: {me}"
    );
}
