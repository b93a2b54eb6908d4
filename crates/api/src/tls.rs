//! The self-signed TLS identities of the daemon and the CLI, and the fingerprints by which
//! each side trusts the other (there is no CA). Behind the `tls` feature: the monitor has no
//! use for it.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The SHA-256 of a certificate's DER encoding, as 64 lowercase hex digits (as vmed and
/// `vme remote cert` print it).
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fingerprint as the user may type it (any case, with or without ':' between bytes),
/// in [`fingerprint`]'s form.
pub fn normalize_fingerprint(text: &str) -> Result<String, String> {
    let hex: String = text
        .trim()
        .chars()
        .filter(|&c| c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{text:?} is no SHA-256 fingerprint: give the 64 hex digits vmed prints at \
             startup, or that `vmed trust list` or `vme remote cert` print"
        ));
    }
    Ok(hex)
}

/// Makes a self-signed certificate for `names` (DNS names; none for a client) and its key
/// in `dir`. The key is written first (mode 0600), then the certificate, each whole through
/// a temporary file and a rename: a present certificate means a complete pair.
pub fn make_self_signed(
    dir: &Path,
    cert_path: &Path,
    key_path: &Path,
    names: Vec<String>,
    common_name: &str,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(names)
        .map_err(|e| format!("cannot make a certificate: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("cannot make a certificate: {e}"))?;
    write_new(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(cert_path, cert.pem().as_bytes(), 0o644)
}

/// Writes `path` whole with `mode`, through a temporary file (of this process) and a rename.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(data)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        let fp = fingerprint(b"x");
        assert_eq!(fp.len(), 64);
        let colons: Vec<String> = fp
            .as_bytes()
            .chunks(2)
            .map(|p| String::from_utf8_lossy(p).to_uppercase())
            .collect();
        assert_eq!(normalize_fingerprint(&colons.join(":")).unwrap(), fp);
        assert!(normalize_fingerprint("abc").is_err());
        assert!(normalize_fingerprint(&"g".repeat(64)).is_err());
    }
}
