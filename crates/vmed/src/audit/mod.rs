//! The audit log: one record for every state-changing API request, every denial and every
//! security event the daemon sees (a monitor killed by its seccomp filter), in its own SQLite
//! file (`STATE/audit.db`), append-only and hash-chained, with the chain's head anchored
//! periodically in `STATE/audit.anchors` and on the event stream. docs/audit.md describes the
//! format, the chain's encoding and what the log protects against.
//!
//! It owns its file alone: nothing here touches `vmed.db`. Appends go to one writer thread
//! that commits whatever has queued in one transaction (one fsync for many concurrent
//! requests) and answers each caller once its record is durable.

mod anchors;
pub mod http;
mod store;
mod verify;

pub use anchors::Anchor;
pub use store::Query;
pub use verify::{Bad, Verdict};

use crate::events::{Events, Kind as EventKind, rfc3339};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime};
use utoipa::ToSchema;

/// The SQLite file of the log, under the state dir.
pub const DB_FILE: &str = "audit.db";
/// The anchors file, under the state dir.
pub const ANCHORS_FILE: &str = "audit.anchors";

/// How often the head is anchored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditConfig {
    /// Anchor after this many records (at least 1).
    pub anchor_every: u64,
    /// Anchor at least this often while records arrive.
    pub anchor_interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            anchor_every: 100,
            anchor_interval: Duration::from_secs(60),
        }
    }
}

/// What a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// An API request that changed state, or any request that was denied.
    Request,
    /// Something the daemon saw happen, like a monitor killed by its seccomp filter.
    Security,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Request => "request",
            RecordKind::Security => "security",
        }
    }

    fn parse(s: &str) -> Option<RecordKind> {
        match s {
            "request" => Some(RecordKind::Request),
            "security" => Some(RecordKind::Security),
            _ => None,
        }
    }
}

/// Whether the request (or the act a security event reports) was allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allowed,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "allowed" => Some(Outcome::Allowed),
            "denied" => Some(Outcome::Denied),
            _ => None,
        }
    }
}

/// A record before the log gives it its place: what the caller knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: RecordKind,
    /// Who asked (`unknown` when the request carried no identity facts).
    pub actor: String,
    pub project: Option<String>,
    /// The permission the route declares (`vm.start`), or `METHOD /path` when the policy
    /// said nothing, or the security event's name.
    pub action: String,
    /// What was acted on (`vm/acme/web`); may be empty.
    pub object: String,
    pub label: Option<String>,
    pub result: Outcome,
    /// The HTTP status of the reply; 0 for a security event.
    pub status: u16,
    /// Where the request came from (`unix:uid=N`, `tcp:ADDR:PORT`), or what reported the
    /// event.
    pub source: String,
    /// Why it was denied, the error's message, or what the event was.
    pub detail: String,
}

/// One record as stored and served. Its `hash` chains it to its predecessor (see
/// [`Record::compute_hash`] and docs/audit.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
pub struct Record {
    /// 1, 2, 3, ... with no gap.
    pub seq: u64,
    pub kind: RecordKind,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub actor: String,
    pub project: Option<String>,
    pub action: String,
    pub object: String,
    pub label: Option<String>,
    pub result: Outcome,
    /// The reply's HTTP status; 0 for a security event.
    pub status: u16,
    pub source: String,
    pub detail: String,
    /// The previous record's `hash` (64 zeros for record 1), lowercase hex.
    pub prev_hash: String,
    /// SHA-256(prev_hash's 32 bytes ‖ the canonical encoding of the fields above), hex.
    pub hash: String,
}

/// The hash before record 1.
pub const GENESIS: [u8; 32] = [0; 32];

impl Record {
    /// The canonical encoding of the fields the hash covers: each as UTF-8 (numbers in
    /// decimal, absent options empty), preceded by its length as 4 bytes big-endian, in
    /// this order: seq, kind, time, actor, project, action, object, label, result, status,
    /// source, detail.
    pub fn canonical(&self) -> Vec<u8> {
        let seq = self.seq.to_string();
        let status = self.status.to_string();
        let fields: [&str; 12] = [
            &seq,
            self.kind.as_str(),
            &self.time,
            &self.actor,
            self.project.as_deref().unwrap_or(""),
            &self.action,
            &self.object,
            self.label.as_deref().unwrap_or(""),
            self.result.as_str(),
            &status,
            &self.source,
            &self.detail,
        ];
        let mut out = Vec::with_capacity(fields.iter().map(|f| f.len() + 4).sum());
        for f in fields {
            // Fields are capped far below 4 GiB (see `cap`), so the length always fits.
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f.as_bytes());
        }
        out
    }

    /// SHA-256(prev ‖ canonical encoding).
    pub fn compute_hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(prev);
        ctx.update(&self.canonical());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 64 hex digits as 32 bytes.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Fields longer than this are cut (a request's path or an error message is not a place
/// to store megabytes in the log).
const FIELD_MAX: usize = 4096;

fn cap(mut s: String) -> String {
    if s.len() > FIELD_MAX {
        let mut end = FIELD_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Why the log could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {err}")]
    Db { path: PathBuf, err: rusqlite::Error },
    #[error("audit anchors {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A record that cannot be read as one (the file was written by hand).
    #[error("{0}")]
    Unreadable(String),
    #[error(
        "the audit log cannot be written ({0}); state-changing requests are refused until it \
         can: check the state dir's disk, then restart vmed"
    )]
    Failed(String),
}

/// One append waiting for the writer, with where to say it is durable.
struct Pending {
    entry: Entry,
    done: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// The log: cheap to share (`Arc`); appends from any thread, reads on their own
/// connections.
pub struct AuditLog {
    db: PathBuf,
    anchors: PathBuf,
    tx: Mutex<Option<mpsc::Sender<Pending>>>,
    /// Set when an append failed: the daemon then refuses state-changing requests (it
    /// cannot record them).
    failed: AtomicBool,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl AuditLog {
    /// Opens (or creates) `STATE/audit.db` and `STATE/audit.anchors`, and starts the
    /// writer. Anchors are published on `events`.
    pub fn open(
        state_dir: &Path,
        cfg: AuditConfig,
        events: Events,
    ) -> Result<Arc<Self>, AuditError> {
        let db = state_dir.join(DB_FILE);
        let anchors = state_dir.join(ANCHORS_FILE);
        let writer = store::Writer::open(&db, &anchors, cfg, events)?;
        let (tx, rx) = mpsc::channel::<Pending>();
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|err| AuditError::Io {
                path: db.clone(),
                err,
            })?;
        Ok(Arc::new(AuditLog {
            db,
            anchors,
            tx: Mutex::new(Some(tx)),
            failed: AtomicBool::new(false),
            writer: Mutex::new(Some(handle)),
        }))
    }

    /// Whether an append has failed (state-changing requests are refused then).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    fn queue(&self, entry: Entry) -> tokio::sync::oneshot::Receiver<Result<u64, String>> {
        let entry = Entry {
            actor: cap(entry.actor),
            project: entry.project.filter(|p| !p.is_empty()).map(cap),
            action: cap(entry.action),
            object: cap(entry.object),
            label: entry.label.filter(|l| !l.is_empty()).map(cap),
            source: cap(entry.source),
            detail: cap(entry.detail),
            ..entry
        };
        let (done, rx) = tokio::sync::oneshot::channel();
        let sent = crate::daemon::lock(&self.tx)
            .as_ref()
            .is_some_and(|tx| tx.send(Pending { entry, done }).is_ok());
        if !sent {
            // The receiver then sees its sender dropped: reported as a failure below.
            self.failed.store(true, Ordering::Relaxed);
        }
        rx
    }

    fn settle(
        &self,
        r: Result<Result<u64, String>, impl std::fmt::Debug>,
    ) -> Result<u64, AuditError> {
        let r = r
            .map_err(|_| "the audit writer has stopped".to_string())
            .and_then(|r| r);
        r.map_err(|e| {
            self.failed.store(true, Ordering::Relaxed);
            eprintln!("vmed: audit: {e}");
            AuditError::Failed(e)
        })
    }

    /// Appends a record; returns its seq once it is durable (committed and synced).
    pub async fn append(&self, entry: Entry) -> Result<u64, AuditError> {
        let rx = self.queue(entry);
        self.settle(rx.await)
    }

    /// [`Self::append`] for a plain thread: blocks until the record is durable. Must not be
    /// called from the async runtime's threads.
    pub fn append_blocking(&self, entry: Entry) -> Result<u64, AuditError> {
        let rx = self.queue(entry);
        self.settle(rx.blocking_recv())
    }

    /// Records a security event the daemon observed: `action` names it (`monitor.seccomp`),
    /// `object` what it concerns (`vm/NAME`), `source` what reported it (`monitor:pid=N`),
    /// `detail` what happened. Blocking (see [`Self::append_blocking`]).
    pub fn security_event(
        &self,
        action: &str,
        object: &str,
        source: &str,
        detail: &str,
    ) -> Result<u64, AuditError> {
        self.append_blocking(Entry {
            kind: RecordKind::Security,
            actor: "vmed".into(),
            project: None,
            action: action.into(),
            object: object.into(),
            label: None,
            result: Outcome::Denied,
            status: 0,
            source: source.into(),
            detail: detail.into(),
        })
    }

    /// The records that match `q`, oldest first (the newest `q.limit`).
    pub fn list(&self, q: &Query) -> Result<Vec<Record>, AuditError> {
        store::list(&self.db, q)
    }

    /// Walks the chain and the anchors (see [`verify`]).
    pub fn verify(&self) -> Result<Verdict, AuditError> {
        verify::verify(&self.db, &self.anchors)
    }

    /// Calls `each` with every record in order, as one JSON line; stops at its first error.
    pub fn export(
        &self,
        each: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), AuditError> {
        store::export(&self.db, each)
    }

    /// Stops the writer after what is queued, anchoring the head: for a clean shutdown.
    pub fn close(&self) {
        crate::daemon::lock(&self.tx).take();
        if let Some(h) = crate::daemon::lock(&self.writer).take() {
            let _ = h.join();
        }
    }
}

/// Now, as the log writes times.
fn now() -> String {
    rfc3339(SystemTime::now(), true)
}

/// Publishes an anchor on the event stream.
fn publish_anchor(events: &Events, a: &Anchor) {
    events.publish(
        EventKind::AuditAnchor,
        serde_json::json!({"seq": a.seq, "hash": a.hash, "time": a.time}),
    );
}

#[cfg(test)]
mod tests;
