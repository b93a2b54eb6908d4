//! The API over HTTPS on TCP (`vmed --https ADDR:PORT`): the same router as on the Unix
//! socket, behind TLS 1.3 with a mandatory client certificate. Anyone who reaches the port
//! could otherwise control every VM, so a client must show a certificate (and prove it holds
//! its key, which the handshake checks) whose fingerprint is in the trust store
//! (`STATE/tls/trusted/`, read at each connection: `vmed trust add` takes effect at once).
//! A client with an unknown certificate completes the handshake but gets 403 on every
//! request, with its fingerprint and how to trust it.

use crate::tls;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::DigitallySignedStruct;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a client has to complete the TLS handshake: a silent one must not hold a task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request's headers may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks every client for a certificate and checks it proves possession of its key; whether
/// the certificate is trusted is decided after the handshake, so that an unknown client
/// can be told how to become trusted instead of seeing a bare TLS alert.
#[derive(Debug)]
struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCert {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Self-signed, pinned by fingerprint: no chain, no expiry to check; only that it
        // parses (the signature check below needs its key).
        rustls::server::ParsedCertificate::try_from(end_entity)?;
        Ok(ClientCertVerified::assertion())
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

/// The TLS side of the server: its certificate, TLS 1.3 only, client certificates asked.
pub fn server_config(id: &tls::Identity) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyClientCert {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(|e| {
            format!(
                "the server key does not fit {}: {e}; remove both files to make new ones",
                id.cert_path.display()
            )
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Serves `app` over TLS on `listener` until the process ends; one task per connection.
pub async fn serve(
    listener: TcpListener,
    cfg: rustls::ServerConfig,
    state_dir: PathBuf,
    app: Router,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: wait for some to be freed.
                eprintln!("vmed: cannot accept an HTTPS connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, state_dir, app) = (acceptor.clone(), state_dir.clone(), app.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                // A failed handshake is the client's to report; the daemon stays quiet.
                _ => return,
            };
            let fp = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| tls::fingerprint(c));
            let known = match fp.clone() {
                Some(fp) => {
                    let sd = state_dir;
                    tokio::task::spawn_blocking(move || tls::is_trusted(&sd, &fp))
                        .await
                        .unwrap_or(false)
                }
                None => false,
            };
            let app = if known {
                // The certificate identifies the client's user (see crate::authz).
                app.layer(axum::Extension(crate::authz::Peer {
                    uid: None,
                    cert: fp.clone(),
                    source: format!("tcp:{peer}"),
                }))
            } else {
                refusal(&peer.to_string(), fp.as_deref().unwrap_or("none"))
            };
            // A client that stops sending mid-request must not hold its connection: its
            // headers have a deadline, and an untrusted client gets one reply and the close.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(known)
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                .with_upgrades();
            let _ = conn.await;
        });
    }
}

/// Answers every request of an untrusted client with 403, saying how to become trusted.
fn refusal(peer: &str, fp: &str) -> Router {
    eprintln!("vmed: refused HTTPS client {peer}: certificate {fp} is not trusted");
    let msg = format!(
        "this client's certificate (SHA-256 {fp}) is not trusted by vmed: on the server, run \
         `vmed trust add FILE` with the certificate `vme remote cert` names on this client"
    );
    Router::new().fallback(move || {
        let body = serde_json::json!({"type": "error", "error_code": 403, "error": msg});
        async move { (StatusCode::FORBIDDEN, axum::Json(body)).into_response() }
    })
}
