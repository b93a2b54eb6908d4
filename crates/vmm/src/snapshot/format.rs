//! The state file: a fixed prefix anyone can read (magic, format version, the monitor that
//! wrote it), a header, then named sections, each with its length and CRC-32C. Values are
//! encoded with postcard (compact, and a stable 1.0 wire format); the file is read whole
//! and every length, count and checksum is checked before any section is decoded.
//!
//! ```text
//! "VMESNAP\0"  format version (u32 LE)  monitor version (u8 length, UTF-8)
//! header length (u32 LE)  header CRC-32C (u32 LE)  header (postcard Header)
//! header.sections times:
//!   name length (u8)  name (ASCII)  payload length (u32 LE)  CRC-32C of name+payload
//!   (u32 LE)  payload (postcard)
//! end of file
//! ```

use super::crc32c::crc32c;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"VMESNAP\0";
/// Bumped whenever the layout or any section's encoding changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
/// A diff snapshot: version 1 plus the sections naming its parent and its pages
/// (`lineage`, `diff_pages`). Full snapshots stay version 1 so that older monitors restore
/// them; a diff is version 2 so that they refuse it rather than take its sparse memory file
/// for all of RAM.
pub const DIFF_FORMAT_VERSION: u32 = 2;
/// Largest state file read: a few KiB per hart and device, so anything near this is not
/// ours (and is refused before it is read into memory).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// What the header says about the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// `x86_64` or `riscv64`.
    pub arch: String,
    /// What the guest saw of its CPUs: the ISA string (riscv64) or the CPU template
    /// (x86_64). A machine that differs refuses the snapshot.
    pub cpu: String,
    /// Guest RAM, and so the memory file's length.
    pub memory_bytes: u64,
    /// Sections that follow.
    pub sections: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read snapshot state file {path}: {source}; check the snapshot directory")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a vme snapshot state file (no VMESNAP magic): pass the directory that \
         `vme-vmm ctl ... snapshot DIR` wrote"
    )]
    NotASnapshot { path: PathBuf },
    #[error(
        "snapshot {path} is in format version {found} (written by vme-vmm {writer}), but this \
         vme-vmm {ours} reads format versions {FORMAT_VERSION} to {DIFF_FORMAT_VERSION} only: \
         restore it with the vme-vmm that wrote it, or take a new snapshot with this one"
    )]
    Version {
        path: PathBuf,
        found: u32,
        writer: String,
        ours: &'static str,
    },
    #[error(
        "snapshot state file {path} is {len} bytes, more than a state file can be: it is not \
         one of ours"
    )]
    TooBig { path: PathBuf, len: u64 },
    #[error(
        "snapshot state file {path} is truncated in {what}: the snapshot is incomplete; \
         restore from a complete copy"
    )]
    Truncated { path: PathBuf, what: String },
    #[error(
        "snapshot state file {path}: {what} fails its CRC-32C checksum: the file is corrupted; \
         restore from an intact copy"
    )]
    Checksum { path: PathBuf, what: String },
    #[error("snapshot state file {path}: {what}: {why}; restore from an intact copy")]
    Malformed {
        path: PathBuf,
        what: String,
        why: String,
    },
    #[error(
        "snapshot state file {path} has no section {name:?}: it was written for another \
         machine or is damaged; restore from an intact copy"
    )]
    Missing { path: PathBuf, name: String },
    #[error("cannot encode snapshot section {name}: {why}")]
    Encode { name: String, why: String },
}

/// Collects sections, then writes the file.
pub struct StateWriter {
    version: u32,
    arch: String,
    cpu: String,
    memory_bytes: u64,
    sections: Vec<(String, Vec<u8>)>,
}

impl StateWriter {
    pub fn new(arch: &str, cpu: &str, memory_bytes: u64) -> Self {
        StateWriter {
            version: FORMAT_VERSION,
            arch: arch.into(),
            cpu: cpu.into(),
            memory_bytes,
            sections: Vec::new(),
        }
    }

    /// Adds section `name` (ASCII, at most 255 bytes, unique) holding `value`.
    pub fn add<T: Serialize>(&mut self, name: &str, value: &T) -> Result<(), FormatError> {
        let bad = |why: String| FormatError::Encode {
            name: name.into(),
            why,
        };
        if !name.is_ascii() || name.len() > 255 || self.sections.iter().any(|(n, _)| n == name) {
            return Err(bad(
                "the name is not unique ASCII of at most 255 bytes".into()
            ));
        }
        let data = postcard::to_stdvec(value).map_err(|e| bad(e.to_string()))?;
        if u32::try_from(data.len()).is_err() {
            return Err(bad(format!("{} bytes is too large", data.len())));
        }
        self.sections.push((name.into(), data));
        Ok(())
    }

    /// Writes the file as a diff snapshot ([`DIFF_FORMAT_VERSION`]).
    pub fn diff_format(&mut self) {
        self.version = DIFF_FORMAT_VERSION;
    }

    /// Adds section `name` with a payload already encoded (copied from another state file).
    pub fn add_encoded(&mut self, name: &str, data: &[u8]) -> Result<(), FormatError> {
        self.add(name, &())?;
        if let Some(last) = self.sections.last_mut() {
            last.1 = data.to_vec();
        }
        Ok(())
    }

    /// The whole file.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let header = Header {
            arch: self.arch.clone(),
            cpu: self.cpu.clone(),
            memory_bytes: self.memory_bytes,
            sections: self.sections.len() as u32,
        };
        let head = postcard::to_stdvec(&header).map_err(|e| FormatError::Encode {
            name: "header".into(),
            why: e.to_string(),
        })?;
        let version = env!("CARGO_PKG_VERSION").as_bytes();
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.push(version.len() as u8);
        out.extend_from_slice(version);
        out.extend_from_slice(&(head.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c(&head).to_le_bytes());
        out.extend_from_slice(&head);
        for (name, data) in &self.sections {
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            let mut checked = name.as_bytes().to_vec();
            checked.extend_from_slice(data);
            out.extend_from_slice(&crc32c(&checked).to_le_bytes());
            out.extend_from_slice(data);
        }
        Ok(out)
    }
}

/// A state file read and checked: every checksum matched.
pub struct StateFile {
    pub path: PathBuf,
    /// [`FORMAT_VERSION`], or [`DIFF_FORMAT_VERSION`] for a diff snapshot.
    pub version: u32,
    pub header: Header,
    /// The monitor version that wrote it.
    pub writer: String,
    sections: Vec<(String, Vec<u8>)>,
}

/// Reads a state file front to back, naming the part that is missing.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(FormatError::Truncated {
                path: self.path.into(),
                what: what.into(),
            });
        };
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u8(&mut self, what: &str) -> Result<u8, FormatError> {
        Ok(self.take(1, what)?[0])
    }
}

impl StateFile {
    pub fn read(path: &Path) -> Result<StateFile, FormatError> {
        let io = |source| FormatError::Io {
            path: path.into(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_STATE_BYTES {
            return Err(FormatError::TooBig {
                path: path.into(),
                len,
            });
        }
        Self::decode(path, &std::fs::read(path).map_err(io)?)
    }

    pub fn decode(path: &Path, data: &[u8]) -> Result<StateFile, FormatError> {
        let mut c = Cursor { data, at: 0, path };
        let malformed = |what: &str, why: String| FormatError::Malformed {
            path: path.into(),
            what: what.into(),
            why,
        };
        if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
            return Err(FormatError::NotASnapshot { path: path.into() });
        }
        c.at = MAGIC.len();
        let version = c.u32("the format version")?;
        let n = c.u8("the monitor version")?;
        let writer = String::from_utf8_lossy(c.take(n.into(), "the monitor version")?);
        if !(FORMAT_VERSION..=DIFF_FORMAT_VERSION).contains(&version) {
            return Err(FormatError::Version {
                path: path.into(),
                found: version,
                writer: writer.into_owned(),
                ours: env!("CARGO_PKG_VERSION"),
            });
        }
        let head_len = c.u32("the header")?;
        let head_crc = c.u32("the header")?;
        let head = c.take(head_len as usize, "the header")?;
        if crc32c(head) != head_crc {
            return Err(FormatError::Checksum {
                path: path.into(),
                what: "the header".into(),
            });
        }
        let header: Header = decode_all(head).map_err(|why| malformed("the header", why))?;
        let mut sections: Vec<(String, Vec<u8>)> = Vec::new();
        for i in 0..header.sections {
            let what = format!("section {} of {}", i + 1, header.sections);
            let n = c.u8(&what)?;
            let name = c.take(n.into(), &what)?;
            let name = std::str::from_utf8(name)
                .ok()
                .filter(|s| s.is_ascii())
                .ok_or_else(|| malformed(&what, "its name is not ASCII".into()))?
                .to_string();
            let what = format!("section {name}");
            let len = c.u32(&what)?;
            let crc = c.u32(&what)?;
            let payload = c.take(len as usize, &what)?;
            let mut checked = name.as_bytes().to_vec();
            checked.extend_from_slice(payload);
            if crc32c(&checked) != crc {
                return Err(FormatError::Checksum {
                    path: path.into(),
                    what,
                });
            }
            if sections.iter().any(|(n, _)| *n == name) {
                return Err(malformed(&what, "it appears twice".into()));
            }
            sections.push((name, payload.to_vec()));
        }
        if c.at != data.len() {
            return Err(malformed(
                "the end",
                format!("{} bytes follow the last section", data.len() - c.at),
            ));
        }
        Ok(StateFile {
            path: path.into(),
            version,
            header,
            writer: writer.into_owned(),
            sections,
        })
    }

    /// Whether the file has a section `name`.
    pub fn has_section(&self, name: &str) -> bool {
        self.sections.iter().any(|(n, _)| n == name)
    }

    /// Decodes section `name` (its checksum matched when the file was read).
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<T, FormatError> {
        let Some((_, data)) = self.sections.iter().find(|(n, _)| n == name) else {
            return Err(FormatError::Missing {
                path: self.path.clone(),
                name: name.into(),
            });
        };
        decode_all(data).map_err(|why| FormatError::Malformed {
            path: self.path.clone(),
            what: format!("section {name}"),
            why,
        })
    }

    /// Every section's name and encoded payload, in file order.
    pub fn sections(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.sections
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
    }

    /// The error for a section that decoded but holds a state this VM cannot take.
    pub fn invalid(&self, name: &str, why: impl std::fmt::Display) -> FormatError {
        FormatError::Malformed {
            path: self.path.clone(),
            what: format!("section {name}"),
            why: why.to_string(),
        }
    }
}

/// Decodes `data` as one `T`, all of it.
fn decode_all<T: DeserializeOwned>(data: &[u8]) -> Result<T, String> {
    let (v, rest) =
        postcard::take_from_bytes(data).map_err(|e| format!("cannot decode it: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes follow its data", rest.len()));
    }
    Ok(v)
}

#[cfg(test)]
#[path = "format_tests.rs"]
mod tests;
