//! The daemon's state: one record per VM (its spec, lifecycle state and the reason for the
//! last failure). Behind the [`Store`] trait so a distributed backend (etcd) can replace the
//! embedded SQLite one later; SQLite in WAL mode. A write is durable once the caller has
//! passed it through the store's [`WalBarrier`] (the daemon does so when it releases the
//! store, before it acts on the write or replies): one fdatasync of the WAL then covers
//! every write committed before it, so concurrent requests share their flushes (group
//! commit) and none waits for a flush while holding the store.

use crate::lifecycle::{RestartPolicy, State};
use crate::limits::VmLimits;
use crate::usage::Sample;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use vme_api::MachineSpec;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("a VM named {0:?} already exists: choose another name or delete it first")]
    Exists(String),
    #[error("no VM named {0:?}: see `vme list`")]
    NotFound(String),
    #[error("an image or alias named {0:?} already exists: choose another name or remove it first")]
    ImageExists(String),
    #[error("no image or alias named {0:?}: see `vme image list`")]
    NoImage(String),
    /// An access-control change the state does not allow (409), saying why.
    #[error("{0}")]
    Refused(String),
    #[error(
        "the state database holds a record it cannot read ({0}); was it written by a newer vmed?"
    )]
    Corrupt(String),
}

/// How the daemon names a VM: its internal key, and the short name and project the API shows.
/// The key names the VM's directory, sockets, cgroup, taps and samples: it is the short
/// name in the `default` project (and for VMs stored before names were per project), else
/// `PROJECT_NAME` ('_' is allowed in neither, so keys never clash). See docs/access-control.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmId {
    pub key: String,
    pub name: String,
    pub project: String,
}

/// The key a new VM `name` of `project` prefers (see [`VmId`]).
pub fn vm_key(project: &str, name: &str) -> String {
    if project == "default" {
        name.to_string()
    } else {
        format!("{project}_{name}")
    }
}

/// One VM as stored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VmRecord {
    /// The daemon's internal key (see [`VmId`]); never shown.
    #[serde(skip)]
    pub key: String,
    /// Its name, unique in its project.
    pub name: String,
    pub state: State,
    /// Why the VM is `crashed` (or why its last start failed); empty otherwise.
    pub reason: String,
    /// The machine it is (vme-api's `MachineSpec`: arch, kernel, initrd, cmdline, vcpus,
    /// memory, devices).
    #[schema(value_type = Object)]
    pub spec: MachineSpec,
    /// The pid of the VM's monitor while it has one, else 0.
    pub pid: u32,
    pub restart_policy: RestartPolicy,
    /// Cgroup limits beyond the spec (CPU allowance, io.max).
    pub limits: VmLimits,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// The project that owns it.
    pub project: String,
    /// Its security label (see crate::labels).
    pub label: String,
}

impl VmRecord {
    /// How it is named (key, name, project).
    pub fn id(&self) -> VmId {
        VmId {
            key: self.key.clone(),
            name: self.name.clone(),
            project: self.project.clone(),
        }
    }
}

impl VmId {
    /// A VM of the `default` project, keyed by its name.
    pub fn plain(name: &str) -> VmId {
        VmId {
            key: name.into(),
            name: name.into(),
            project: "default".into(),
        }
    }
}

pub trait Store: Send + crate::store_images::ImageCatalog + crate::store_auth::AuthStore {
    /// Stores a new VM in state `defined`, under `id.key`, in `id.project`.
    fn create(
        &mut self,
        id: &VmId,
        spec: &MachineSpec,
        policy: RestartPolicy,
        limits: &VmLimits,
    ) -> Result<VmRecord, StoreError>;
    /// The key for a new VM `name` in `project`: [`vm_key`], or `PROJECT_NAME` when a VM
    /// stored before names were per project holds that key. Exists if the project has a
    /// VM of that name.
    fn new_key(&self, project: &str, name: &str) -> Result<String, StoreError>;
    /// The VMs named `name`, in every project (ordered by project).
    fn find(&self, name: &str) -> Result<Vec<VmRecord>, StoreError>;
    /// A VM by its key.
    fn get(&self, key: &str) -> Result<VmRecord, StoreError>;
    /// Every VM, ordered by name and project.
    fn list(&self) -> Result<Vec<VmRecord>, StoreError>;
    fn set_state(&mut self, name: &str, state: State, reason: &str) -> Result<(), StoreError>;
    fn delete(&mut self, name: &str) -> Result<(), StoreError>;
    /// Records the pid of the VM's monitor (0 when it has none).
    fn set_pid(&mut self, name: &str, pid: u32) -> Result<(), StoreError>;
    /// [`Store::set_state`] and [`Store::set_pid`] in one change (one disk flush, and never
    /// a state without its pid).
    fn set_state_and_pid(
        &mut self,
        name: &str,
        state: State,
        reason: &str,
        pid: u32,
    ) -> Result<(), StoreError>;
    /// Records usage samples (one per VM per tick), all or none; samples of VMs no longer
    /// stored are dropped. A VM's samples go with it when it is deleted.
    fn add_samples(&mut self, samples: &[Sample]) -> Result<(), StoreError>;
    /// VM `name`'s samples taken at or after `since_ms` (Unix ms), oldest first.
    fn samples(&self, name: &str, since_ms: i64) -> Result<Vec<Sample>, StoreError>;
    /// The newest sample of each VM that has one.
    fn latest_samples(&self) -> Result<Vec<Sample>, StoreError>;
    /// Drops samples older than `before_ms`; returns how many.
    fn prune_samples(&mut self, before_ms: i64) -> Result<usize, StoreError>;
    /// A mark that grows with every write; [`WalBarrier::sync`] takes it.
    fn write_mark(&self) -> u64 {
        0
    }
    /// What makes writes durable, for a backend that defers that to a shared flush; None
    /// when every write is durable when it returns.
    fn barrier(&self) -> Option<Arc<WalBarrier>> {
        None
    }
}

/// Group commit for a WAL-mode SQLite database whose commits do not flush: `sync(mark)`
/// returns once every write up to `mark` is on disk. One caller at a time flushes; those
/// arriving meanwhile wait for the next flush, which covers all of them.
pub struct WalBarrier {
    wal: PathBuf,
    state: Mutex<BarrierState>,
    flushed: Condvar,
}

#[derive(Default)]
struct BarrierState {
    /// The highest mark asked for.
    asked: u64,
    /// Every write up to this mark is durable.
    synced: u64,
    flushing: bool,
    /// Flushes done (for the tests and the log).
    flushes: u64,
}

impl WalBarrier {
    fn new(db: &Path) -> WalBarrier {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        WalBarrier {
            wal: PathBuf::from(wal),
            state: Mutex::new(BarrierState::default()),
            flushed: Condvar::new(),
        }
    }

    /// Returns once every write up to `mark` (a [`Store::write_mark`] read after those
    /// writes) is durable. A failed flush aborts the daemon: the kernel may have dropped the
    /// unwritten pages, so nothing written since can be trusted, and a restart reconciles
    /// from what is on disk (see crate::reconcile).
    pub fn sync(&self, mark: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.asked = s.asked.max(mark);
        while s.synced < mark {
            if s.flushing {
                s = self.flushed.wait(s).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Marks are taken after their writes: a flush that starts now covers them all.
            let target = s.asked;
            s.flushing = true;
            drop(s);
            let flushed = std::fs::File::open(&self.wal).and_then(|f| f.sync_data());
            if let Err(e) = flushed {
                eprintln!(
                    "vmed: cannot flush the state database's log {}: {e}; vmed stops so that its \
                     restart works from what reached the disk (check the disk and its free \
                     space)",
                    self.wal.display()
                );
                std::process::abort();
            }
            s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.flushing = false;
            s.synced = s.synced.max(target);
            s.flushes += 1;
            self.flushed.notify_all();
        }
    }

    /// Flushes done so far.
    pub fn flushes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).flushes
    }
}

/// Schema migrations, applied in order; `schema_version` records how many ran. Never edit
/// one that has shipped: append a new one.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE vms (
        name TEXT PRIMARY KEY NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT",
    // The monitor's pid, so a restarted daemon can find and re-adopt a running VM (0: none).
    "ALTER TABLE vms ADD COLUMN pid INTEGER NOT NULL DEFAULT 0",
    // What to do when the monitor exits on its own (never, on-failure, always).
    "ALTER TABLE vms ADD COLUMN restart_policy TEXT NOT NULL DEFAULT 'never'",
    // Cgroup limits beyond the spec, as JSON (crate::limits::VmLimits).
    "ALTER TABLE vms ADD COLUMN limits TEXT NOT NULL DEFAULT '{}'",
    // Accounting: what each VM's monitor had used at a moment (counters since it started).
    "CREATE TABLE samples (
        vm TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        at_ms INTEGER NOT NULL,
        pid INTEGER NOT NULL,
        cpu_usec INTEGER NOT NULL,
        cpu_user_usec INTEGER NOT NULL,
        cpu_system_usec INTEGER NOT NULL,
        memory_bytes INTEGER NOT NULL,
        memory_peak_bytes INTEGER NOT NULL,
        disk_read_bytes INTEGER NOT NULL,
        disk_write_bytes INTEGER NOT NULL,
        net_rx_bytes INTEGER NOT NULL,
        net_tx_bytes INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX samples_by_vm ON samples (vm, at_ms);
    CREATE INDEX samples_by_time ON samples (at_ms);",
    // The image repository's catalogue.
    crate::store_images::MIGRATION,
    // Access control: projects, users, roles, tokens; each VM's and image's owner and label.
    crate::store_auth::MIGRATION,
    // Per-project image policy: a project may launch only images signed by a trusted key.
    "ALTER TABLE projects ADD COLUMN require_signed INTEGER NOT NULL DEFAULT 0;",
    // Names unique per project: `name` stays the internal key (see VmId and
    // store_images::image_key), `short` is the name the API shows. Existing rows keep their
    // key, which was their name.
    "ALTER TABLE vms ADD COLUMN short TEXT NOT NULL DEFAULT '';
     UPDATE vms SET short = name;
     CREATE UNIQUE INDEX vms_by_project_name ON vms (project, short);
     ALTER TABLE images ADD COLUMN short TEXT NOT NULL DEFAULT '';
     UPDATE images SET short = name;
     CREATE UNIQUE INDEX images_by_project_name ON images (project, short);
     ALTER TABLE image_aliases ADD COLUMN short TEXT NOT NULL DEFAULT '';
     UPDATE image_aliases SET short = alias;",
];

pub struct SqliteStore {
    conn: Connection,
    /// None for an in-memory database (tests), which has nothing to flush.
    barrier: Option<Arc<WalBarrier>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)?;
        let mut store = Self::init(conn)?;
        let barrier = Arc::new(WalBarrier::new(path));
        // The migrations' commits did not flush either.
        barrier.sync(1);
        store.barrier = Some(barrier);
        Ok(store)
    }

    #[cfg(test)]
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<SqliteStore, StoreError> {
        // WAL: readers do not block the writer. NORMAL: a commit does not flush the log
        // itself; the WalBarrier does, once for every commit before it. SQLite still flushes
        // around checkpoints, so the database file is never ahead of the log.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn,
            barrier: None,
        })
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub fn schema_version(&self) -> Result<usize, StoreError> {
        version(&self.conn)
    }
}

fn version(conn: &Connection) -> Result<usize, StoreError> {
    let v: i64 = conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0))?;
    Ok(v as usize)
}

/// Applies the migrations not yet applied, each in its own transaction with its version
/// bump, so a crash mid-way leaves the database at one version or the next.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
         INSERT INTO schema_version SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM schema_version);",
    )?;
    let current = version(conn)?;
    if current > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "schema version {current}, this vmed knows {}",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute("UPDATE schema_version SET version = ?1", [i as i64 + 1])?;
        tx.commit()?;
    }
    Ok(())
}

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

type Row = (
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    String,
    String,
    String,
    String,
    String,
);

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
    ))
}

fn record(
    (key, spec, state, reason, created_at, updated_at, pid, policy, limits, project, label, name): Row,
) -> Result<VmRecord, StoreError> {
    let state = State::parse(&state)
        .ok_or_else(|| StoreError::Corrupt(format!("VM {name:?} has state {state:?}")))?;
    let spec = serde_json::from_str(&spec)
        .map_err(|e| StoreError::Corrupt(format!("VM {name:?} has an unreadable spec: {e}")))?;
    let restart_policy = RestartPolicy::parse(&policy)
        .ok_or_else(|| StoreError::Corrupt(format!("VM {name:?} has restart policy {policy:?}")))?;
    let limits = serde_json::from_str(&limits)
        .map_err(|e| StoreError::Corrupt(format!("VM {name:?} has unreadable limits: {e}")))?;
    Ok(VmRecord {
        key,
        name,
        state,
        reason,
        spec,
        pid: u32::try_from(pid).unwrap_or(0),
        restart_policy,
        limits,
        created_at,
        updated_at,
        project,
        label,
    })
}

const COLUMNS: &str = "name, spec, state, reason, created_at, updated_at, pid, restart_policy, \
    limits, project, label, short";

const SAMPLE_COLUMNS: &str = "vm, at_ms, pid, cpu_usec, cpu_user_usec, cpu_system_usec, \
    memory_bytes, memory_peak_bytes, disk_read_bytes, disk_write_bytes, net_rx_bytes, net_tx_bytes";

fn sample(r: &rusqlite::Row<'_>) -> rusqlite::Result<Sample> {
    let u = |i: usize| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(i)?.max(0) as u64) };
    Ok(Sample {
        vm: r.get(0)?,
        at_ms: r.get(1)?,
        pid: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
        cpu_usec: u(3)?,
        cpu_user_usec: u(4)?,
        cpu_system_usec: u(5)?,
        memory_bytes: u(6)?,
        memory_peak_bytes: u(7)?,
        disk_read_bytes: u(8)?,
        disk_write_bytes: u(9)?,
        net_rx_bytes: u(10)?,
        net_tx_bytes: u(11)?,
    })
}

/// SQLite integers are signed: a counter past i64::MAX (never in practice) is clamped.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store for SqliteStore {
    fn create(
        &mut self,
        id: &VmId,
        spec: &MachineSpec,
        policy: RestartPolicy,
        limits: &VmLimits,
    ) -> Result<VmRecord, StoreError> {
        let json = serde_json::to_string(spec)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode the spec: {e}")))?;
        let limits = serde_json::to_string(limits)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode the limits: {e}")))?;
        let t = now();
        // A clash of the key or of (project, short) is refused alike.
        let n = self.conn.execute(
            "INSERT INTO vms (name, spec, state, reason, created_at, updated_at, restart_policy,
                              limits, project, short)
             VALUES (?1, ?2, ?3, '', ?4, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
            params![
                id.key,
                json,
                State::Defined.as_str(),
                t,
                policy.as_str(),
                limits,
                id.project,
                id.name
            ],
        )?;
        if n == 0 {
            return Err(StoreError::Exists(id.name.clone()));
        }
        self.get(&id.key)
    }

    fn new_key(&self, project: &str, name: &str) -> Result<String, StoreError> {
        let exists = |sql: &str, args: &[&str]| -> Result<bool, StoreError> {
            let args = rusqlite::params_from_iter(args.iter());
            Ok(self.conn.query_row(sql, args, |r| r.get(0))?)
        };
        let named = "SELECT EXISTS (SELECT 1 FROM vms WHERE project = ?1 AND short = ?2)";
        if exists(named, &[project, name])? {
            return Err(StoreError::Exists(name.into()));
        }
        let key = vm_key(project, name);
        if exists("SELECT EXISTS (SELECT 1 FROM vms WHERE name = ?1)", &[&key])? {
            // A VM of another project, stored before names were per project, holds the
            // plain name as its key.
            return Ok(format!("{project}_{name}"));
        }
        Ok(key)
    }

    fn find(&self, name: &str) -> Result<Vec<VmRecord>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {COLUMNS} FROM vms WHERE short = ?1 ORDER BY project"
        ))?;
        let rows = stmt.query_map([name], row)?;
        rows.map(|r| record(r?)).collect()
    }

    fn get(&self, name: &str) -> Result<VmRecord, StoreError> {
        let r = self
            .conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM vms WHERE name = ?1"),
                [name],
                row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(name.into()))?;
        record(r)
    }

    fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {COLUMNS} FROM vms ORDER BY short, project"
        ))?;
        let rows = stmt.query_map([], row)?;
        rows.map(|r| record(r?)).collect()
    }

    fn set_state(&mut self, name: &str, state: State, reason: &str) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE vms SET state = ?2, reason = ?3, updated_at = ?4 WHERE name = ?1",
            params![name, state.as_str(), reason, now()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(name.into()));
        }
        Ok(())
    }

    fn delete(&mut self, name: &str) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute("DELETE FROM vms WHERE name = ?1", [name])?;
        if n == 0 {
            return Err(StoreError::NotFound(name.into()));
        }
        Ok(())
    }

    fn set_state_and_pid(
        &mut self,
        name: &str,
        state: State,
        reason: &str,
        pid: u32,
    ) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE vms SET state = ?2, reason = ?3, pid = ?4, updated_at = ?5 WHERE name = ?1",
            params![name, state.as_str(), reason, pid, now()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(name.into()));
        }
        Ok(())
    }

    fn set_pid(&mut self, name: &str, pid: u32) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE vms SET pid = ?2 WHERE name = ?1",
            params![name, pid],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(name.into()));
        }
        Ok(())
    }

    fn add_samples(&mut self, samples: &[Sample]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            // A VM deleted since it was sampled has no record to hang the sample on.
            let mut stmt = tx.prepare(&format!(
                "INSERT INTO samples ({SAMPLE_COLUMNS})
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12
                 WHERE EXISTS (SELECT 1 FROM vms WHERE name = ?1)"
            ))?;
            for s in samples {
                stmt.execute(params![
                    s.vm,
                    s.at_ms,
                    s.pid,
                    int(s.cpu_usec),
                    int(s.cpu_user_usec),
                    int(s.cpu_system_usec),
                    int(s.memory_bytes),
                    int(s.memory_peak_bytes),
                    int(s.disk_read_bytes),
                    int(s.disk_write_bytes),
                    int(s.net_rx_bytes),
                    int(s.net_tx_bytes),
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn samples(&self, name: &str, since_ms: i64) -> Result<Vec<Sample>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {SAMPLE_COLUMNS} FROM samples WHERE vm = ?1 AND at_ms >= ?2 ORDER BY at_ms"
        ))?;
        let rows = stmt.query_map(params![name, since_ms], sample)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn latest_samples(&self) -> Result<Vec<Sample>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {SAMPLE_COLUMNS} FROM samples s
             WHERE at_ms = (SELECT MAX(at_ms) FROM samples WHERE vm = s.vm) ORDER BY vm"
        ))?;
        let rows = stmt.query_map([], sample)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn prune_samples(&mut self, before_ms: i64) -> Result<usize, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM samples WHERE at_ms < ?1", [before_ms])?)
    }

    fn write_mark(&self) -> u64 {
        self.conn.total_changes()
    }

    fn barrier(&self) -> Option<Arc<WalBarrier>> {
        self.barrier.clone()
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
