//! The log's SQLite file: its schema (with triggers refusing UPDATE and DELETE), the one
//! writer that appends, and the queries that read.

use super::anchors::{self, Anchor};
use super::{AuditConfig, AuditError, Entry, GENESIS, Outcome, Pending, Record, RecordKind};
use crate::events::{Events, rfc3339};
use rusqlite::{Connection, OpenFlags, params_from_iter, types::Value as Sql};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// The table and its guards. The triggers are a first line only: whoever can write the file
/// can drop them; the hash chain is what shows their work.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    time TEXT NOT NULL,
    actor TEXT NOT NULL,
    project TEXT NOT NULL,
    action TEXT NOT NULL,
    object TEXT NOT NULL,
    label TEXT NOT NULL,
    result TEXT NOT NULL,
    status INTEGER NOT NULL,
    source TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
) STRICT;
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: records cannot be changed'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: records cannot be deleted'); END;
";

const COLUMNS: &str = "seq, kind, time, actor, project, action, object, label, result, status, source, detail, \
     prev_hash, hash";

fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> AuditError + '_ {
    move |err| AuditError::Db {
        path: path.into(),
        err,
    }
}

/// The one connection that appends, on the writer thread.
pub(super) struct Writer {
    conn: Connection,
    anchors: PathBuf,
    cfg: AuditConfig,
    events: Events,
    /// The last record's seq (0: none) and hash.
    head: (u64, [u8; 32]),
    /// The seq last anchored, and since when records have waited for an anchor.
    anchored: u64,
    waiting_since: Option<Instant>,
}

impl Writer {
    pub(super) fn open(
        db: &Path,
        anchors: &Path,
        cfg: AuditConfig,
        events: Events,
    ) -> Result<Writer, AuditError> {
        let e = db_err(db);
        let conn = Connection::open(db).map_err(&e)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(&e)?;
        // FULL: each commit syncs the WAL, so a record is durable when its request is answered.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(&e)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(&e)?;
        conn.execute_batch(SCHEMA).map_err(&e)?;
        let head = conn
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .map(|(s, h)| (s.max(0) as u64, super::unhex32(&h).unwrap_or(GENESIS)))
            .or_else(|err| match err {
                rusqlite::Error::QueryReturnedNoRows => Ok((0, GENESIS)),
                err => Err(e(err)),
            })?;
        let last_anchor = match anchors::read(anchors)? {
            Ok(list) => list.last().map_or(0, |(_, a)| a.seq),
            Err(_) => 0,
        };
        if last_anchor > head.0 {
            eprintln!(
                "vmed: the audit log ends at record {} but {} anchors record {last_anchor}: \
                 records were dropped; `vme audit verify` says which",
                head.0,
                anchors.display()
            );
        }
        Ok(Writer {
            conn,
            anchors: anchors.into(),
            cfg,
            events,
            anchored: last_anchor.min(head.0),
            head,
            waiting_since: None,
        })
    }

    /// Appends what arrives, each batch in one transaction, until every sender is gone.
    pub(super) fn run(mut self, rx: mpsc::Receiver<Pending>) {
        // Records a killed daemon left unanchored are anchored now, not at the next one.
        self.anchor();
        loop {
            let got = match self.waiting_since {
                Some(t) => {
                    let left = self.cfg.anchor_interval.saturating_sub(t.elapsed());
                    rx.recv_timeout(left)
                }
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            match got {
                Ok(first) => {
                    let mut batch = vec![first];
                    while batch.len() < 1024 {
                        match rx.try_recv() {
                            Ok(p) => batch.push(p),
                            Err(_) => break,
                        }
                    }
                    self.commit(batch);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.anchor();
                    return;
                }
            }
            let due = self.waiting_since.is_some_and(|t| {
                t.elapsed() >= self.cfg.anchor_interval
                    || self.head.0 - self.anchored >= self.cfg.anchor_every
            });
            if due {
                self.anchor();
            }
        }
    }

    /// Writes a batch in one transaction (one sync) and answers each caller.
    fn commit(&mut self, batch: Vec<Pending>) {
        let (mut seq, mut prev) = self.head;
        let mut seqs = Vec::with_capacity(batch.len());
        let r = (|| -> rusqlite::Result<()> {
            let tx = self.conn.transaction()?;
            {
                let mut ins = tx.prepare_cached(&format!(
                    "INSERT INTO audit ({COLUMNS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
                ))?;
                for p in &batch {
                    seq += 1;
                    let r = sealed(seq, &prev, &p.entry);
                    ins.execute(rusqlite::params![
                        r.seq as i64,
                        r.kind.as_str(),
                        r.time,
                        r.actor,
                        r.project.as_deref().unwrap_or(""),
                        r.action,
                        r.object,
                        r.label.as_deref().unwrap_or(""),
                        r.result.as_str(),
                        r.status,
                        r.source,
                        r.detail,
                        r.prev_hash,
                        r.hash,
                    ])?;
                    prev = super::unhex32(&r.hash).unwrap_or(GENESIS);
                    seqs.push(seq);
                }
            }
            tx.commit()
        })();
        match r {
            Ok(()) => {
                self.head = (seq, prev);
                self.waiting_since.get_or_insert_with(Instant::now);
                for (p, s) in batch.into_iter().zip(seqs) {
                    let _ = p.done.send(Ok(s));
                }
            }
            Err(e) => {
                let msg = format!("cannot append to the audit log: {e}");
                for p in batch {
                    let _ = p.done.send(Err(msg.clone()));
                }
            }
        }
    }

    /// Anchors the head if records arrived since the last anchor.
    fn anchor(&mut self) {
        if self.head.0 == self.anchored {
            self.waiting_since = None;
            return;
        }
        let a = Anchor {
            seq: self.head.0,
            hash: super::hex(&self.head.1),
            time: super::now(),
        };
        match anchors::append(&self.anchors, &a) {
            Ok(()) => {
                self.anchored = a.seq;
                self.waiting_since = None;
                super::publish_anchor(&self.events, &a);
            }
            // Tried again at the next record or interval.
            Err(e) => {
                eprintln!("vmed: cannot anchor the audit log: {e}");
                self.waiting_since = Some(Instant::now());
            }
        }
    }
}

/// The record `entry` becomes at `seq` after `prev`.
fn sealed(seq: u64, prev: &[u8; 32], entry: &Entry) -> Record {
    let mut r = Record {
        seq,
        kind: entry.kind,
        time: super::now(),
        actor: entry.actor.clone(),
        project: entry.project.clone(),
        action: entry.action.clone(),
        object: entry.object.clone(),
        label: entry.label.clone(),
        result: entry.result,
        status: entry.status,
        source: entry.source.clone(),
        detail: entry.detail.clone(),
        prev_hash: super::hex(prev),
        hash: String::new(),
    };
    r.hash = super::hex(&r.compute_hash(prev));
    r
}

/// A connection that only reads (the writer keeps appending meanwhile: WAL).
pub(super) fn reader(db: &Path) -> Result<Connection, AuditError> {
    let e = db_err(db);
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&e)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(&e)?;
    Ok(conn)
}

/// A row as stored: its seq, and the record or why it cannot be read as one (a column of
/// the wrong type or an unknown value: someone wrote the file by hand).
pub(super) fn row(r: &rusqlite::Row) -> rusqlite::Result<(i64, Result<Record, String>)> {
    let seq: i64 = r.get(0)?;
    let text = |i: usize| -> Result<String, String> {
        r.get::<_, String>(i)
            .map_err(|e| format!("column {i} is not text ({e})"))
    };
    let rec = (|| -> Result<Record, String> {
        let kind = text(1)?;
        let result = text(8)?;
        let opt = |s: String| (!s.is_empty()).then_some(s);
        Ok(Record {
            seq: u64::try_from(seq).map_err(|_| format!("seq {seq} is negative"))?,
            kind: RecordKind::parse(&kind).ok_or(format!("unknown kind {kind:?}"))?,
            time: text(2)?,
            actor: text(3)?,
            project: opt(text(4)?),
            action: text(5)?,
            object: text(6)?,
            label: opt(text(7)?),
            result: Outcome::parse(&result).ok_or(format!("unknown result {result:?}"))?,
            status: r
                .get::<_, i64>(9)
                .ok()
                .and_then(|s| u16::try_from(s).ok())
                .ok_or("the status is not an HTTP status")?,
            source: text(10)?,
            detail: text(11)?,
            prev_hash: text(12)?,
            hash: text(13)?,
        })
    })();
    Ok((seq, rec))
}

/// The most records one listing returns (the export has them all).
pub const LIMIT_MAX: u64 = 100_000;

/// The filters of a listing.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub actor: Option<String>,
    pub project: Option<String>,
    /// Exact, or a prefix when it ends with `*` (`vm.*`).
    pub action: Option<String>,
    pub result: Option<Outcome>,
    pub kind: Option<RecordKind>,
    /// Unix milliseconds, inclusive.
    pub since: Option<i64>,
    /// Unix milliseconds, exclusive.
    pub until: Option<i64>,
    /// The newest this many (default 100, at most [`LIMIT_MAX`]).
    pub limit: Option<u64>,
}

/// A time as the log writes it, for comparing (the format sorts as text).
fn stamp(ms: i64) -> String {
    rfc3339(
        UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
        true,
    )
}

pub(super) fn list(db: &Path, q: &Query) -> Result<Vec<Record>, AuditError> {
    let conn = reader(db)?;
    let mut cond = Vec::new();
    let mut args: Vec<Sql> = Vec::new();
    let mut eq = |col: &str, v: String, cond: &mut Vec<String>| {
        args.push(Sql::Text(v));
        cond.push(format!("{col} = ?{}", args.len()));
    };
    if let Some(a) = &q.actor {
        eq("actor", a.clone(), &mut cond);
    }
    if let Some(p) = &q.project {
        eq("project", p.clone(), &mut cond);
    }
    if let Some(a) = &q.action {
        match a.strip_suffix('*') {
            Some(prefix) => eq(
                &format!("substr(action, 1, {})", prefix.chars().count()),
                prefix.into(),
                &mut cond,
            ),
            None => eq("action", a.clone(), &mut cond),
        }
    }
    if let Some(r) = q.result {
        eq("result", r.as_str().into(), &mut cond);
    }
    if let Some(k) = q.kind {
        eq("kind", k.as_str().into(), &mut cond);
    }
    if let Some(s) = q.since {
        args.push(Sql::Text(stamp(s)));
        cond.push(format!("time >= ?{}", args.len()));
    }
    if let Some(u) = q.until {
        args.push(Sql::Text(stamp(u)));
        cond.push(format!("time < ?{}", args.len()));
    }
    let filter = if cond.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", cond.join(" AND "))
    };
    let limit = q.limit.unwrap_or(100).min(LIMIT_MAX);
    let sql = format!("SELECT {COLUMNS} FROM audit {filter} ORDER BY seq DESC LIMIT {limit}");
    let e = db_err(db);
    let mut stmt = conn.prepare(&sql).map_err(&e)?;
    let rows = stmt.query_map(params_from_iter(args), row).map_err(&e)?;
    let mut out = Vec::new();
    for r in rows {
        let (seq, rec) = r.map_err(&e)?;
        out.push(rec.map_err(|why| {
            AuditError::Unreadable(format!(
                "record {seq} cannot be read ({why}); the file was written by hand: see `vme \
                 audit verify`"
            ))
        })?);
    }
    out.reverse();
    Ok(out)
}

pub(super) fn export(
    db: &Path,
    each: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<(), AuditError> {
    let conn = reader(db)?;
    let e = db_err(db);
    let mut stmt = conn
        .prepare(&format!("SELECT {COLUMNS} FROM audit ORDER BY seq"))
        .map_err(&e)?;
    let rows = stmt.query_map([], row).map_err(&e)?;
    for r in rows {
        let (seq, rec) = r.map_err(&e)?;
        let rec = rec.map_err(|why| {
            AuditError::Unreadable(format!("record {seq} cannot be exported: {why}"))
        })?;
        let mut line = serde_json::to_vec(&rec).unwrap_or_default();
        line.push(b'\n');
        each(&line).map_err(|err| AuditError::Io {
            path: db.into(),
            err,
        })?;
    }
    Ok(())
}
