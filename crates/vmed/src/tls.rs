//! The daemon's TLS identity and trust store, under `STATE/tls/`:
//!
//! - `server.crt`, `server.key` (mode 0600): a self-signed certificate made on the first
//!   start with `--https` and kept afterwards, so clients that pinned its fingerprint keep
//!   trusting it;
//! - `trusted/*.crt`: the client certificates allowed to use the API over TCP, each known
//!   by the SHA-256 fingerprint of its DER encoding (`vmed trust add|list|remove`).
//!
//! Both sides are self-signed: there is no CA, a certificate is trusted by fingerprint only.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use vme_api::tls;
pub use vme_api::tls::{fingerprint, normalize_fingerprint};

/// `STATE/tls`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("tls")
}

/// `STATE/tls/trusted`.
pub fn trusted_dir(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("trusted")
}

/// The server's certificate chain and key, made on the first call and read afterwards.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub cert_path: PathBuf,
    /// Whether this call made it.
    pub created: bool,
}

/// Loads `STATE/tls/server.{crt,key}`, making them first if the certificate is missing.
pub fn server_identity(state_dir: &Path) -> Result<Identity, String> {
    let dir = dir(state_dir);
    let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
    let created = !cert_path.exists();
    if created {
        let host = hostname();
        let names = vec![host.clone(), "localhost".to_string()];
        tls::make_self_signed(
            &dir,
            &cert_path,
            &key_path,
            names,
            &format!("vmed on {host}"),
        )?;
    }
    let cert = CertificateDer::from_pem_file(&cert_path).map_err(|e| {
        format!(
            "cannot read the server certificate {}: {e}; remove it and {} to make new ones",
            cert_path.display(),
            key_path.display()
        )
    })?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
        format!(
            "cannot read the server key {}: {e}; remove it and {} to make new ones",
            key_path.display(),
            cert_path.display()
        )
    })?;
    Ok(Identity {
        cert,
        key,
        cert_path,
        created,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// One trusted client certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct Trusted {
    pub fingerprint: String,
    pub file: PathBuf,
}

/// Every certificate in `STATE/tls/trusted/*.crt` (a file may hold several); files that
/// are no PEM certificates are skipped, with a note on stderr.
pub fn trusted(state_dir: &Path) -> Vec<Trusted> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(trusted_dir(state_dir)) else {
        return out;
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    files.sort();
    for file in files {
        let certs: Vec<_> = match std::fs::read(&file) {
            Ok(pem) => CertificateDer::pem_slice_iter(&pem)
                .filter_map(Result::ok)
                .collect(),
            Err(_) => Vec::new(),
        };
        if certs.is_empty() {
            eprintln!("vmed: {} holds no PEM certificate: ignored", file.display());
        }
        out.extend(certs.iter().map(|c| Trusted {
            fingerprint: fingerprint(c),
            file: file.clone(),
        }));
    }
    out
}

/// Whether the client certificate with this fingerprint may use the API.
pub fn is_trusted(state_dir: &Path, fp: &str) -> bool {
    trusted(state_dir).iter().any(|t| t.fingerprint == fp)
}

/// `vmed trust add FILE`: copies the (first) certificate in the PEM file `file` into the
/// trust store as `FINGERPRINT.crt`; returns its fingerprint.
pub fn add(state_dir: &Path, file: &Path) -> Result<String, String> {
    let pem = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let cert = CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| {
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----): give the file \
                 `vme remote cert` names",
                file.display()
            )
        })?;
    rustls::server::ParsedCertificate::try_from(&cert)
        .map_err(|e| format!("{} holds no valid X.509 certificate: {e}", file.display()))?;
    let fp = fingerprint(&cert);
    let dir = trusted_dir(state_dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // The certificate alone: the file given may hold more (a key, by mistake).
    tls::write_new(
        &dir.join(format!("{fp}.crt")),
        pem_certificate(&cert).as_bytes(),
        0o644,
    )?;
    Ok(fp)
}

/// `vmed trust remove FINGERPRINT`: removes every trusted file holding that certificate;
/// returns the files removed.
pub fn remove(state_dir: &Path, fp: &str) -> Result<Vec<PathBuf>, String> {
    let fp = normalize_fingerprint(fp)?;
    let mut gone = Vec::new();
    for t in trusted(state_dir)
        .into_iter()
        .filter(|t| t.fingerprint == fp)
    {
        if !gone.contains(&t.file) {
            std::fs::remove_file(&t.file)
                .map_err(|e| format!("cannot remove {}: {e}", t.file.display()))?;
            gone.push(t.file);
        }
    }
    if gone.is_empty() {
        return Err(format!(
            "no trusted certificate has fingerprint {fp}: see `vmed trust list`"
        ));
    }
    Ok(gone)
}

/// A certificate as PEM (base64 in 64-column lines).
fn pem_certificate(der: &[u8]) -> String {
    let b64 = vme_api::base64::encode(der);
    let mut out = "-----BEGIN CERTIFICATE-----\n".to_string();
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Makes the trust store's directory private to the daemon's user (0700) if it exists.
pub fn tighten(state_dir: &Path) {
    let d = dir(state_dir);
    if d.is_dir() {
        let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmed-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn identity_made_once_and_kept() {
        let d = temp("identity");
        let a = server_identity(&d).unwrap();
        assert!(a.created);
        let mode = std::fs::metadata(d.join("tls/server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = server_identity(&d).unwrap();
        assert!(!b.created);
        assert_eq!(fingerprint(&a.cert), fingerprint(&b.cert));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn trust_add_list_remove() {
        let d = temp("trust");
        let c = d.join("client");
        tls::make_self_signed(
            &c,
            &c.join("c.crt"),
            &c.join("c.key"),
            vec!["x".into()],
            "x",
        )
        .unwrap();
        let fp = add(&d, &c.join("c.crt")).unwrap();
        assert_eq!(fp.len(), 64);
        assert!(is_trusted(&d, &fp));
        assert_eq!(trusted(&d).len(), 1);
        // A key is no certificate; a fingerprint is 64 hex digits.
        assert!(
            add(&d, &c.join("c.key"))
                .unwrap_err()
                .contains("no PEM certificate")
        );
        assert!(remove(&d, "abc").is_err());
        let colons: Vec<String> = fp
            .as_bytes()
            .chunks(2)
            .map(|p| String::from_utf8_lossy(p).to_uppercase())
            .collect();
        assert_eq!(remove(&d, &colons.join(":")).unwrap().len(), 1);
        assert!(!is_trusted(&d, &fp));
        assert!(
            remove(&d, &fp)
                .unwrap_err()
                .contains("no trusted certificate")
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
