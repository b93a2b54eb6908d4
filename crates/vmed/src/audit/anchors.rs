//! `STATE/audit.anchors`: the chain's head (seq, hash, time) every so often, one line each
//! (`SEQ HASH TIME`), appended and synced. A copy elsewhere (the event stream's subscribers,
//! a log shipper) is what makes it worth more than the database it vouches for.

use super::AuditError;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// One anchor: the head of the chain at a moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Anchor {
    pub seq: u64,
    /// The record's hash, hex.
    pub hash: String,
    /// When it was anchored (RFC 3339, UTC).
    pub time: String,
}

impl Anchor {
    fn line(&self) -> String {
        format!("{} {} {}\n", self.seq, self.hash, self.time)
    }

    fn parse(line: &str) -> Option<Anchor> {
        let mut f = line.split(' ');
        let (seq, hash, time) = (f.next()?, f.next()?, f.next()?);
        if f.next().is_some() || super::unhex32(hash).is_none() || time.is_empty() {
            return None;
        }
        Some(Anchor {
            seq: seq.parse().ok()?,
            hash: hash.into(),
            time: time.into(),
        })
    }
}

/// Appends one anchor and syncs it: one write, so a crash leaves at most a cut last line.
pub fn append(path: &Path, a: &Anchor) -> Result<(), AuditError> {
    let io = |err| AuditError::Io {
        path: path.into(),
        err,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    f.write_all(a.line().as_bytes()).map_err(io)?;
    f.sync_data().map_err(io)
}

/// Every anchor with its line number (from 1), or the number of the first malformed line.
/// A cut last line (no newline: a crash while it was written) is left out.
pub fn read(path: &Path) -> Result<Result<Vec<(usize, Anchor)>, usize>, AuditError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => {
            return Err(AuditError::Io {
                path: path.into(),
                err,
            });
        }
    };
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let mut out = Vec::new();
    for (i, line) in complete.split('\n').enumerate() {
        if complete.is_empty() {
            break;
        }
        match Anchor::parse(line) {
            Some(a) => out.push((i + 1, a)),
            None => return Ok(Err(i + 1)),
        }
    }
    Ok(Ok(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_round_trip_and_a_cut_line_is_ignored() {
        let dir = std::env::temp_dir().join(format!("vme-anchors-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a");
        assert_eq!(read(&p).unwrap(), Ok(vec![]));
        let a = Anchor {
            seq: 3,
            hash: "ab".repeat(32),
            time: "2026-12-03T02:00:00.000Z".into(),
        };
        append(&p, &a).unwrap();
        append(
            &p,
            &Anchor {
                seq: 5,
                ..a.clone()
            },
        )
        .unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"7 abab").unwrap();
        let got = read(&p).unwrap().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (1, a.clone()));
        assert_eq!(got[1].1.seq, 5);
        f.write_all(b"\n").unwrap();
        assert_eq!(read(&p).unwrap(), Err(3));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
