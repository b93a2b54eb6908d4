//! `verify`: walks the chain in seq order and checks it against the anchors; names the
//! first bad record and what is wrong with it.

use super::anchors::{self, Anchor};
use super::store::{reader, row};
use super::{AuditError, GENESIS, Record, hex, unhex32};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use utoipa::ToSchema;

/// What the walk found.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Verdict {
    /// True when every record and every anchor checks out.
    pub ok: bool,
    /// Records in the log.
    pub records: u64,
    /// Anchors in the anchors file.
    pub anchors: u64,
    /// The last record's seq (0: none) and hash.
    pub head_seq: u64,
    pub head_hash: String,
    /// The first problem, when not `ok`.
    pub first_bad: Option<Bad>,
}

/// The first problem found.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Bad {
    /// The first bad record's seq (null: the anchors file itself is bad).
    pub seq: Option<u64>,
    /// `edited`, `dropped`, `reordered`, `inserted`, `rewritten` (a chain recomputed after
    /// an edit, caught by an anchor) or `anchors`.
    pub problem: &'static str,
    /// What is wrong, in words: `record 17: hash does not match its content (edited)`.
    pub message: String,
}

fn bad(seq: Option<u64>, problem: &'static str, message: String) -> Option<Bad> {
    Some(Bad {
        seq,
        problem,
        message,
    })
}

fn missing(from: u64, to: u64, why: &str) -> String {
    if from == to {
        format!("record {from} missing (dropped{why})")
    } else {
        format!("records {from} to {to} missing (dropped{why})")
    }
}

pub(super) fn verify(db: &Path, anchors_path: &Path) -> Result<Verdict, AuditError> {
    // Anchors first: each names a record committed before it was written, so all of them
    // are in the snapshot read next.
    let anchors = match anchors::read(anchors_path)? {
        Ok(a) => a,
        Err(line) => {
            return Ok(Verdict {
                ok: false,
                records: 0,
                anchors: 0,
                head_seq: 0,
                head_hash: hex(&GENESIS),
                first_bad: bad(
                    None,
                    "anchors",
                    format!(
                        "line {line} of {} is not an anchor (SEQ HASH TIME): the anchors file \
                         was edited",
                        anchors_path.display()
                    ),
                ),
            });
        }
    };
    let mut conn = reader(db)?;
    let e = |err| AuditError::Db {
        path: db.into(),
        err,
    };
    let tx = conn.transaction().map_err(e)?;
    let (count, max): (i64, i64) = tx
        .query_row(
            "SELECT count(*), coalesce(max(seq), 0) FROM audit",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(e)?;
    let mut stmt = tx
        .prepare(
            "SELECT seq, kind, time, actor, project, action, object, label, result, \
                  status, source, detail, prev_hash, hash FROM audit ORDER BY seq",
        )
        .map_err(e)?;
    let mut rows = stmt.query_map([], row).map_err(e)?;
    // Anchors by the seq they name.
    let mut by_seq: HashMap<u64, Vec<(usize, &Anchor)>> = HashMap::new();
    for (line, a) in &anchors {
        by_seq.entry(a.seq).or_default().push((*line, a));
    }
    let mut expected = 1u64;
    let mut prev = GENESIS;
    let mut first_bad = None;
    for r in rows.by_ref() {
        let (seq, rec) = r.map_err(e)?;
        if let Some(b) = check(seq, &rec, expected, &prev, max, &by_seq) {
            first_bad = Some(b);
            break;
        }
        // Checked: its hash is valid hex.
        prev = rec.ok().and_then(|r| unhex32(&r.hash)).unwrap_or(GENESIS);
        expected += 1;
    }
    let head_seq = expected - 1;
    if first_bad.is_none() {
        // Anchors beyond the last record: its tail was dropped.
        if let Some((line, a)) = anchors.iter().find(|(_, a)| a.seq > head_seq) {
            first_bad = Some(Bad {
                seq: Some(head_seq + 1),
                problem: "dropped",
                message: missing(
                    head_seq + 1,
                    a.seq,
                    &format!(
                        ": line {line} of the anchors recorded record {} at {}",
                        a.seq, a.time
                    ),
                ),
            });
        }
    }
    Ok(Verdict {
        ok: first_bad.is_none(),
        records: u64::try_from(count).unwrap_or(0),
        anchors: anchors.len() as u64,
        head_seq,
        head_hash: hex(&prev),
        first_bad,
    })
}

/// The first problem with the row at `seq` when the walk expects record `expected` after
/// `prev`.
fn check(
    seq: i64,
    rec: &Result<Record, String>,
    expected: u64,
    prev: &[u8; 32],
    max: i64,
    anchors: &HashMap<u64, Vec<(usize, &Anchor)>>,
) -> Option<Bad> {
    let Ok(useq) = u64::try_from(seq) else {
        return bad(
            Some(expected),
            "inserted",
            format!("record {expected}: a record with seq {seq} precedes it (inserted)"),
        );
    };
    if useq < expected {
        return bad(
            Some(useq),
            "inserted",
            format!("record {useq}: seq 0 is not a place in the log (inserted)"),
        );
    }
    if useq > expected {
        return bad(Some(expected), "dropped", missing(expected, useq - 1, ""));
    }
    let rec = match rec {
        Ok(r) => r,
        Err(why) => {
            return bad(
                Some(useq),
                "edited",
                format!("record {useq}: cannot be read as a record: {why} (edited)"),
            );
        }
    };
    let (Some(own_prev), Some(hash)) = (unhex32(&rec.prev_hash), unhex32(&rec.hash)) else {
        return bad(
            Some(useq),
            "edited",
            format!("record {useq}: its hashes are not 64 hex digits (edited)"),
        );
    };
    if rec.compute_hash(&own_prev) != hash {
        // Another record's content, moved here? Its hash covers its seq: find which.
        let from = (1..=max.max(0) as u64 + 1)
            .filter(|&k| k != useq)
            .find(|&k| {
                let moved = Record {
                    seq: k,
                    ..rec.clone()
                };
                moved.compute_hash(&own_prev) == hash
            });
        return Some(match from {
            Some(k) => Bad {
                seq: Some(useq),
                problem: "reordered",
                message: format!(
                    "record {useq}: holds record {k}'s content (reordered, or records were \
                     inserted or dropped before it and the rest renumbered)"
                ),
            },
            None => Bad {
                seq: Some(useq),
                problem: "edited",
                message: format!("record {useq}: hash does not match its content (edited)"),
            },
        });
    }
    if own_prev != *prev {
        return bad(
            Some(useq),
            "inserted",
            format!(
                "record {useq}: does not follow record {}: its prev_hash is not that record's \
                 hash (a record was inserted here, or the one before was rewritten)",
                useq - 1
            ),
        );
    }
    for (line, a) in anchors.get(&useq).into_iter().flatten() {
        if a.hash != rec.hash {
            return bad(
                Some(useq),
                "rewritten",
                format!(
                    "record {useq}: its hash is not the one line {line} of the anchors \
                     recorded at {} (the log was rewritten at or before record {useq})",
                    a.time
                ),
            );
        }
    }
    None
}
