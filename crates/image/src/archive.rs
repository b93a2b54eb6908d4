//! The image archive: a plain POSIX ustar stream of `manifest.json`, then `manifest.sig` if
//! the image is signed, then `blobs/<sha256>` for each distinct blob. It is what
//! `vme image export` writes and `vme image import FILE.tar` sends; `tar tf` lists it.
//! A disk converted on import (its manifest entry has a `source`) travels as either its raw
//! blob (what export writes) or its source, `blobs/<source sha256>`, converted as it is
//! stored (what `vme image import NAME --disk D.qcow2` sends).
//!
//! We read and write ustar ourselves (about 150 lines) rather than take the `tar` crate: an
//! import accepts exactly one layout of regular files and unpacks nothing onto the file
//! system, so every entry is checked here, before a byte of it is stored: paths with `..`
//! or a leading `/`, links, devices, pax or GNU extension headers, sizes beyond the limit
//! or other than the manifest declares, missing, extra or repeated blobs, and bad digests
//! are refused. On any refusal the blobs this import wrote are removed again, so nothing
//! is left (the caller serialises imports, so no other import can share those blobs yet).

use crate::blobs::{BlobError, BlobStore, Ingested};
use crate::manifest::{MAX_MANIFEST_BYTES, Manifest, ManifestError};
use crate::{BlobRef, Digest, sign};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

const BLOCK: usize = 512;
/// `manifest.sig` is one small JSON object.
const MAX_SIG_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("invalid image archive: {0}")]
    Invalid(String),
    #[error("cannot read the image archive: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{0}")]
    Blob(#[from] BlobError),
    /// The caller's check of the manifest refused it (before any blob was read).
    #[error("{0}")]
    Refused(String),
}

fn invalid<T>(m: String) -> Result<T, ArchiveError> {
    Err(ArchiveError::Invalid(m))
}

/// One entry's header, as far as we accept it.
struct Entry {
    name: String,
    size: u64,
    dir: bool,
}

/// Reads the next header; None at the end of the archive (a zero block, or the end of the
/// stream at a block boundary).
fn next_entry(r: &mut dyn Read) -> Result<Option<Entry>, ArchiveError> {
    let mut h = [0u8; BLOCK];
    let mut got = 0;
    while got < BLOCK {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return invalid("the stream ends inside a header".into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if h.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let stored = octal(&h[148..156]).ok_or_else(|| bad_field("checksum"))?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    if sum != stored {
        return invalid("a header's checksum is wrong: the archive is damaged".into());
    }
    let text = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8(b[..end].to_vec())
            .map_err(|_| ArchiveError::Invalid("an entry's name is not UTF-8".into()))
    };
    let mut name = text(&h[0..100])?;
    if &h[257..263] == b"ustar\0" {
        let prefix = text(&h[345..500])?;
        if !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
    }
    let size = size_field(&h[124..136]).ok_or_else(|| bad_field("size"))?;
    let kind = h[156];
    let what = match kind {
        b'0' | 0 => None,
        b'5' => None,
        b'1' => Some("a hard link"),
        b'2' => Some("a symbolic link"),
        b'3' | b'4' => Some("a device node"),
        b'6' => Some("a FIFO"),
        b'x' | b'g' => Some("a pax extended header (write the archive as plain ustar)"),
        b'L' | b'K' => Some("a GNU long-name header"),
        _ => Some("an entry of an unknown type"),
    };
    if let Some(what) = what {
        return invalid(format!(
            "entry {name:?} is {what}: an image archive holds only regular files"
        ));
    }
    let name = name.strip_prefix("./").unwrap_or(&name).to_string();
    if name.starts_with('/') || name.split('/').any(|c| c == "..") {
        return invalid(format!(
            "entry {name:?} has an absolute path or a '..' component"
        ));
    }
    Ok(Some(Entry {
        name,
        size,
        dir: kind == b'5',
    }))
}

fn bad_field(f: &str) -> ArchiveError {
    ArchiveError::Invalid(format!(
        "a header's {f} field is not a number: the archive is damaged"
    ))
}

fn octal(b: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(b).ok()?;
    let s = s.trim_matches(|c| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// A size field: octal, or GNU base-256 (first byte 0x80) for sizes of 8 GiB and more.
fn size_field(b: &[u8]) -> Option<u64> {
    if b[0] == 0x80 {
        if b[1..4].iter().any(|&x| x != 0) {
            return None;
        }
        return Some(b[4..].iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)));
    }
    octal(b)
}

/// Skips the padding after an entry of `size` bytes.
fn skip_padding(r: &mut dyn Read, size: u64) -> Result<(), ArchiveError> {
    let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
    let mut buf = [0u8; BLOCK];
    r.read_exact(&mut buf[..pad as usize])
        .map_err(|_| ArchiveError::Invalid("the stream ends inside an entry's padding".into()))
}

fn read_small(r: &mut dyn Read, e: &Entry, max: u64) -> Result<Vec<u8>, ArchiveError> {
    if e.size > max {
        return invalid(format!(
            "{} is {} bytes, more than the {max} it may have",
            e.name, e.size
        ));
    }
    let mut v = vec![0u8; e.size as usize];
    r.read_exact(&mut v)
        .map_err(|_| ArchiveError::Invalid(format!("the stream ends inside {}", e.name)))?;
    skip_padding(r, e.size)?;
    Ok(v)
}

/// What an import stored.
#[derive(Debug)]
pub struct Imported {
    pub manifest: Manifest,
    /// The manifest's exact bytes (what a signature covers).
    pub manifest_bytes: Vec<u8>,
    pub signature: Option<sign::Signature>,
    /// Blobs written by this import, and blobs that were already stored.
    pub stored: Vec<Digest>,
    pub deduplicated: Vec<Digest>,
}

/// Reads an image archive from `r` into `store`. `max_blob` bounds every blob; `progress`
/// is told of each chunk of blob bytes. On error, the blobs this import wrote are removed.
pub fn import(
    r: &mut dyn Read,
    store: &BlobStore,
    max_blob: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<Imported, ArchiveError> {
    import_checked(r, store, max_blob, &mut |_| Ok(()), &|_| true, progress)
}

/// [`import`], with `check` run on the manifest before any blob is read (so a name already
/// taken is refused before gigabytes are uploaded, and the caller can claim the blobs), and
/// `removable` asked before a blob this import wrote is removed on failure (another import
/// running meanwhile may have found it stored and counted on it).
pub fn import_checked(
    r: &mut dyn Read,
    store: &BlobStore,
    max_blob: u64,
    check: &mut dyn FnMut(&Manifest) -> Result<(), String>,
    removable: &dyn Fn(&Digest) -> bool,
    progress: &mut dyn FnMut(u64),
) -> Result<Imported, ArchiveError> {
    let mut stored = Vec::new();
    let result = import_into(r, store, max_blob, check, progress, &mut stored);
    if result.is_err() {
        for d in stored.iter().filter(|d| removable(d)) {
            let _ = store.remove(d);
        }
    }
    result
}

fn import_into(
    r: &mut dyn Read,
    store: &BlobStore,
    max_blob: u64,
    check: &mut dyn FnMut(&Manifest) -> Result<(), String>,
    progress: &mut dyn FnMut(u64),
    stored: &mut Vec<Digest>,
) -> Result<Imported, ArchiveError> {
    let first = loop {
        match next_entry(r)? {
            None => return invalid("it is empty: it must start with manifest.json".into()),
            Some(e) if e.dir && e.size == 0 => continue,
            Some(e) => break e,
        }
    };
    if first.name != "manifest.json" {
        return invalid(format!(
            "its first file is {:?}: it must start with manifest.json",
            first.name
        ));
    }
    let manifest_bytes = read_small(r, &first, MAX_MANIFEST_BYTES)?;
    let manifest = Manifest::parse(&manifest_bytes, max_blob)?;
    check(&manifest).map_err(ArchiveError::Refused)?;
    let mut wanted: BTreeMap<Digest, u64> = manifest.distinct_blobs();
    let sources: BTreeMap<Digest, &BlobRef> = manifest
        .blobs
        .iter()
        .filter_map(|b| Some((b.source.as_ref()?.sha256.clone(), b)))
        .collect();
    let mut signature = None;
    let mut deduplicated = Vec::new();
    while let Some(e) = next_entry(r)? {
        if e.dir {
            if e.size != 0 || e.name.trim_end_matches('/') != "blobs" {
                return invalid(format!(
                    "unexpected directory {:?}: only blobs/ may be one",
                    e.name
                ));
            }
            continue;
        }
        if e.name == "manifest.sig" && signature.is_none() && stored.is_empty() {
            let bytes = read_small(r, &e, MAX_SIG_BYTES)?;
            signature = Some(sign::Signature::parse(&bytes).map_err(ArchiveError::Invalid)?);
            continue;
        }
        let Some(hex) = e.name.strip_prefix("blobs/") else {
            return invalid(format!(
                "unexpected entry {:?}: an image archive holds manifest.json, manifest.sig \
                 and blobs/<sha256> only",
                e.name
            ));
        };
        let d = Digest::parse(hex)
            .map_err(|m| ArchiveError::Invalid(format!("entry {:?}: {m}", e.name)))?;
        // A converted disk's entry may be its raw blob (as exported) or its source.
        let (blob, declared, source) = if let Some(size) = wanted.remove(&d) {
            (d.clone(), size, None)
        } else if let Some(b) = sources.get(&d).filter(|b| wanted.contains_key(&b.sha256)) {
            wanted.remove(&b.sha256);
            (b.sha256.clone(), b.size, b.source.as_ref())
        } else {
            return invalid(format!("blob {d} is not in the manifest, or appears twice"));
        };
        let expect = source.map_or(declared, |s| s.size);
        if e.size != expect {
            return invalid(format!(
                "blob {d} is {} bytes in the archive but the manifest declares {expect}",
                e.size
            ));
        }
        let how = match source {
            None => store.ingest(r, &d, e.size, progress)?,
            Some(src) => store.ingest_qcow2(r, &blob, declared, src, max_blob, progress)?,
        };
        match how {
            Ingested::Stored => stored.push(blob),
            // A repaired blob belongs to images already stored: never rolled back.
            Ingested::Deduplicated | Ingested::Repaired => deduplicated.push(blob),
        }
        skip_padding(r, e.size)?;
    }
    if let Some((d, _)) = wanted.iter().next() {
        return invalid(format!(
            "blob {d} named in the manifest is missing ({} missing in all)",
            wanted.len()
        ));
    }
    Ok(Imported {
        manifest,
        manifest_bytes,
        signature,
        stored: std::mem::take(stored),
        deduplicated,
    })
}

/// Writes a ustar archive one entry at a time.
pub struct TarWriter<W: Write> {
    w: W,
}

impl<W: Write> TarWriter<W> {
    pub fn new(w: W) -> Self {
        TarWriter { w }
    }

    /// Adds regular file `name` (at most 100 bytes) of exactly `size` bytes read from `r`.
    pub fn file(&mut self, name: &str, size: u64, r: &mut dyn Read) -> io::Result<()> {
        self.w.write_all(&header(name, size)?)?;
        let n = io::copy(&mut r.take(size), &mut self.w)?;
        if n != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name} ended after {n} of its {size} bytes"),
            ));
        }
        let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        self.w.write_all(&[0u8; BLOCK][..pad as usize])
    }

    /// Ends the archive (two zero blocks) and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.w.write_all(&[0u8; 2 * BLOCK])?;
        self.w.flush()?;
        Ok(self.w)
    }
}

fn header(name: &str, size: u64) -> io::Result<[u8; BLOCK]> {
    if name.len() > 100 {
        return Err(io::Error::other(format!("entry name {name:?} is too long")));
    }
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    if size < 1 << 33 {
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    } else {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    Ok(h)
}

/// Writes an image archive: the manifest's exact bytes, its signature, then each distinct
/// blob read from `open_blob`.
pub fn write(
    w: impl Write,
    manifest_bytes: &[u8],
    manifest: &Manifest,
    signature: Option<&sign::Signature>,
    open_blob: &mut dyn FnMut(&Digest) -> io::Result<Box<dyn Read>>,
) -> io::Result<()> {
    let mut t = TarWriter::new(w);
    t.file(
        "manifest.json",
        manifest_bytes.len() as u64,
        &mut &manifest_bytes[..],
    )?;
    if let Some(s) = signature {
        let b = s.to_bytes();
        t.file("manifest.sig", b.len() as u64, &mut &b[..])?;
    }
    // In manifest order, each distinct blob once.
    let mut done = Vec::new();
    for b in &manifest.blobs {
        if done.contains(&&b.sha256) {
            continue;
        }
        done.push(&b.sha256);
        let mut r = open_blob(&b.sha256)?;
        t.file(&format!("blobs/{}", b.sha256), b.size, &mut r)?;
    }
    t.finish()?;
    Ok(())
}

/// An image archive as a reader, built lazily from its parts (for an upload whose length
/// must be known first): its total length and the stream. `blobs` are the distinct blobs in
/// manifest order, each with its size and a reader of exactly that many bytes.
pub fn stream(
    manifest_bytes: &[u8],
    signature: Option<&sign::Signature>,
    blobs: Vec<(Digest, u64, Box<dyn Read + Send>)>,
) -> io::Result<(u64, Box<dyn Read + Send>)> {
    fn pad(size: u64) -> usize {
        ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
    }
    let small = |name: &str, data: &[u8]| -> io::Result<Vec<u8>> {
        let mut v = header(name, data.len() as u64)?.to_vec();
        v.extend_from_slice(data);
        v.resize(v.len() + pad(data.len() as u64), 0);
        Ok(v)
    };
    let mut head = small("manifest.json", manifest_bytes)?;
    if let Some(s) = signature {
        head.extend(small("manifest.sig", &s.to_bytes())?);
    }
    let mut len = head.len() as u64;
    let mut r: Box<dyn Read + Send> = Box::new(io::Cursor::new(head));
    for (d, size, blob) in blobs {
        let h = header(&format!("blobs/{d}"), size)?;
        len += BLOCK as u64 + size + pad(size) as u64;
        r = Box::new(
            r.chain(io::Cursor::new(h))
                .chain(blob.take(size))
                .chain(io::Cursor::new(vec![0u8; pad(size)])),
        );
    }
    len += 2 * BLOCK as u64;
    Ok((
        len,
        Box::new(r.chain(io::Cursor::new(vec![0u8; 2 * BLOCK]))),
    ))
}

#[cfg(test)]
#[path = "archive_tests.rs"]
mod tests;
