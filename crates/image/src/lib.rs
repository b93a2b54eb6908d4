//! `vme-image`: the VM image repository's building blocks, shared by the daemon (`vmed`)
//! and the CLI (`vme`). It owns the image manifest and its validation ([`manifest`]), the
//! content-addressed blob store ([`blobs`]), qcow2 disks converted to raw on import
//! ([`qcow2`]), the image archive format, a plain ustar stream
//! ([`archive`]), and publisher signatures ([`sign`]).
//!
//! It must never be linked into the monitor (`vme-vmm`): the monitor boots files the daemon
//! has already verified, and image parsing stays out of its trusted computing base. It keeps
//! no database either: the daemon records images in its own store.

pub mod archive;
pub mod blobs;
pub mod manifest;
pub mod qcow2;
pub mod sign;

pub use manifest::{BlobRef, DiskFormat, Manifest, Role, Source};

use std::fmt;

/// A SHA-256 digest as 64 lowercase hex digits: the name of a blob.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Digest(String);

impl Digest {
    /// Checks `s` is 64 lowercase hex digits (a blob's name becomes a file name, so nothing
    /// else may get through).
    pub fn parse(s: &str) -> Result<Digest, String> {
        if s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Digest(s.to_string()))
        } else {
            Err(format!(
                "{s:?} is not a SHA-256 digest: give 64 lowercase hex digits"
            ))
        }
    }

    pub fn of(bytes: &[u8]) -> Digest {
        Digest(hex(
            ring::digest::digest(&ring::digest::SHA256, bytes).as_ref()
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, for messages and tables.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A streaming SHA-256.
pub struct Hasher(ring::digest::Context);

impl Default for Hasher {
    fn default() -> Self {
        Hasher(ring::digest::Context::new(&ring::digest::SHA256))
    }
}

impl Hasher {
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b);
    }
    pub fn finish(self) -> Digest {
        Digest(hex(self.0.finish().as_ref()))
    }
}

/// Hashes a whole stream; its digest and length.
pub fn hash_reader(mut r: impl std::io::Read) -> std::io::Result<(Digest, u64)> {
    let mut h = Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok((h.finish(), n)),
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hash_reader(&b"abc"[..]).unwrap(), (d.clone(), 3));
        assert!(Digest::parse(d.as_str()).is_ok());
        assert!(Digest::parse(&d.as_str().to_uppercase()).is_err());
        assert!(Digest::parse("../../etc/passwd").is_err());
        assert_eq!(unhex("00ff10").unwrap(), [0, 255, 16]);
        assert!(unhex("0g").is_none() && unhex("abc").is_none());
    }
}
