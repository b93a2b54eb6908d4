//! Publisher signatures: ed25519 over a manifest's exact bytes. Since the manifest names every
//! blob by its SHA-256, a valid signature vouches for every byte of the image.
//!
//! A publisher key is a 32-byte ed25519 seed kept in a file (`ed25519-secret:<hex>`, mode
//! 0600) on the signer's machine; only its public half (`ed25519:<hex>`) goes to the daemon's
//! list of trusted keys. Keys are named in messages by their fingerprint, the first 16 hex
//! digits of the SHA-256 of the public key.

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const SECRET_PREFIX: &str = "ed25519-secret:";
const PUBLIC_PREFIX: &str = "ed25519:";

/// A public key: 32 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Parses `ed25519:<64 hex digits>`.
    pub fn parse(s: &str) -> Result<PublicKey, String> {
        let hex = s.trim().strip_prefix(PUBLIC_PREFIX).unwrap_or(s.trim());
        crate::unhex(hex)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(PublicKey)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not an ed25519 public key: give ed25519:<64 hex digits> (the \
                     line `vme image keygen` prints)"
                )
            })
    }

    pub fn fingerprint(&self) -> String {
        crate::Digest::of(&self.0).as_str()[..16].to_string()
    }

    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0[..])
            .verify(msg, sig)
            .is_ok()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", crate::hex(&self.0))
    }
}

/// A signature over a manifest, with the key that made it. `manifest.sig` in an archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// `ed25519`
    pub algorithm: String,
    /// `ed25519:<hex>`
    pub public_key: String,
    /// 64 bytes, hex.
    pub signature: String,
}

impl Signature {
    pub fn parse(bytes: &[u8]) -> Result<Signature, String> {
        let s: Signature = serde_json::from_slice(bytes)
            .map_err(|e| format!("manifest.sig is not a vme signature: {e}"))?;
        if s.algorithm != "ed25519" {
            return Err(format!(
                "signature algorithm {:?} is not supported: vme signs with ed25519",
                s.algorithm
            ));
        }
        s.key()?;
        if crate::unhex(&s.signature).is_none_or(|b| b.len() != 64) {
            return Err("the signature is not 64 bytes of hex".into());
        }
        Ok(s)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn key(&self) -> Result<PublicKey, String> {
        PublicKey::parse(&self.public_key)
    }

    /// Whether it is a valid signature of `manifest` by its own key (trust is the caller's
    /// question).
    pub fn check(&self, manifest: &[u8]) -> Result<PublicKey, String> {
        let key = self.key()?;
        let sig = crate::unhex(&self.signature).unwrap_or_default();
        if !key.verify(manifest, &sig) {
            return Err(format!(
                "the signature by key {} does not match the manifest: the image or its \
                 signature was altered",
                key.fingerprint()
            ));
        }
        Ok(key)
    }
}

/// A publisher's signing key.
pub struct SecretKey {
    seed: [u8; 32],
    pair: Ed25519KeyPair,
}

impl SecretKey {
    /// A new random key.
    pub fn generate() -> Result<SecretKey, String> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| "the system's random source failed".to_string())?;
        Self::from_seed(&seed)
    }

    fn from_seed(seed: &[u8]) -> Result<SecretKey, String> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| "not an ed25519 seed")?;
        let seed = <[u8; 32]>::try_from(seed).map_err(|_| "not an ed25519 seed")?;
        Ok(SecretKey { seed, pair })
    }

    /// Reads a key file written by [`SecretKey::save`].
    pub fn load(path: &Path) -> Result<SecretKey, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
        let seed = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .and_then(crate::unhex)
            .filter(|s| s.len() == 32)
            .ok_or_else(|| {
                format!(
                    "{} is not a vme signing key: make one with `vme image keygen FILE`",
                    path.display()
                )
            })?;
        Self::from_seed(&seed)
    }

    /// Writes the key to a new file, readable by its owner only; refuses to overwrite one.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                format!(
                    "cannot create the key file {}: {e} (an existing key is never overwritten)",
                    path.display()
                )
            })?;
        writeln!(f, "{SECRET_PREFIX}{}", crate::hex(&self.seed))
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    pub fn public(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(k)
    }

    pub fn sign(&self, manifest: &[u8]) -> Signature {
        Signature {
            algorithm: "ed25519".into(),
            public_key: self.public().to_string(),
            signature: crate::hex(self.pair.sign(manifest).as_ref()),
        }
    }
}

/// Makes a new key and saves it at `path` (mode 0600); its public key.
pub fn keygen(path: &Path) -> Result<PublicKey, String> {
    let key = SecretKey::generate()?;
    key.save(path)?;
    Ok(key.public())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_refuse() {
        let dir = crate::blobs::tests::temp_dir("sign");
        let path = dir.join("k");
        let public = keygen(&path).unwrap();
        assert!(keygen(&path).unwrap_err().contains("never overwritten"));
        let key = SecretKey::load(&path).unwrap();
        assert_eq!(key.public(), public);
        assert_eq!(PublicKey::parse(&public.to_string()).unwrap(), public);
        let sig = key.sign(b"manifest");
        let parsed = Signature::parse(&sig.to_bytes()).unwrap();
        assert_eq!(parsed.check(b"manifest").unwrap(), public);
        let e = parsed.check(b"manifesT").unwrap_err();
        assert!(
            e.contains(&public.fingerprint()) && e.contains("altered"),
            "{e}"
        );
        let other = SecretKey::generate().unwrap();
        assert_ne!(other.public(), public);
        assert!(Signature::parse(b"{}").is_err());
        assert!(PublicKey::parse("ed25519:abcd").is_err());
        std::fs::write(dir.join("bad"), "nope").unwrap();
        assert!(
            SecretKey::load(&dir.join("bad"))
                .err()
                .unwrap()
                .contains("keygen")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
