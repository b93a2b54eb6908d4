//! The daemon's state: one record per VM (its spec, lifecycle state and the reason for the
//! last failure). Behind the [`Store`] trait so a distributed backend (etcd) can replace the
//! embedded SQLite one later; SQLite in WAL mode with `synchronous=FULL`, so a state change
//! that returned has reached the disk.

use crate::lifecycle::{RestartPolicy, State};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::path::Path;
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
    #[error(
        "the state database holds a record it cannot read ({0}); was it written by a newer vmed?"
    )]
    Corrupt(String),
}

/// One VM as stored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VmRecord {
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
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
}

pub trait Store: Send {
    /// Stores a new VM in state `defined`.
    fn create(
        &mut self,
        name: &str,
        spec: &MachineSpec,
        policy: RestartPolicy,
    ) -> Result<VmRecord, StoreError>;
    fn get(&self, name: &str) -> Result<VmRecord, StoreError>;
    /// Every VM, ordered by name.
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
];

pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    #[cfg(test)]
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<SqliteStore, StoreError> {
        // WAL: readers do not block the writer; FULL: a committed change survives power loss.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(SqliteStore { conn })
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

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

type Row = (String, String, String, String, i64, i64, i64, String);

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
    ))
}

fn record(
    (name, spec, state, reason, created_at, updated_at, pid, policy): Row,
) -> Result<VmRecord, StoreError> {
    let state = State::parse(&state)
        .ok_or_else(|| StoreError::Corrupt(format!("VM {name:?} has state {state:?}")))?;
    let spec = serde_json::from_str(&spec)
        .map_err(|e| StoreError::Corrupt(format!("VM {name:?} has an unreadable spec: {e}")))?;
    let restart_policy = RestartPolicy::parse(&policy)
        .ok_or_else(|| StoreError::Corrupt(format!("VM {name:?} has restart policy {policy:?}")))?;
    Ok(VmRecord {
        name,
        state,
        reason,
        spec,
        pid: u32::try_from(pid).unwrap_or(0),
        restart_policy,
        created_at,
        updated_at,
    })
}

const COLUMNS: &str = "name, spec, state, reason, created_at, updated_at, pid, restart_policy";

impl Store for SqliteStore {
    fn create(
        &mut self,
        name: &str,
        spec: &MachineSpec,
        policy: RestartPolicy,
    ) -> Result<VmRecord, StoreError> {
        let json = serde_json::to_string(spec)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode the spec: {e}")))?;
        let t = now();
        let n = self.conn.execute(
            "INSERT INTO vms (name, spec, state, reason, created_at, updated_at, restart_policy)
             VALUES (?1, ?2, ?3, '', ?4, ?4, ?5) ON CONFLICT(name) DO NOTHING",
            params![name, json, State::Defined.as_str(), t, policy.as_str()],
        )?;
        if n == 0 {
            return Err(StoreError::Exists(name.into()));
        }
        self.get(name)
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
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {COLUMNS} FROM vms ORDER BY name"))?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory per call (tests run in parallel threads of one process).
    fn temp_db() -> (std::path::PathBuf, std::path::PathBuf) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmed-store-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("state.db");
        (dir, db)
    }

    #[test]
    fn migrations_run_once_and_survive_reopen() {
        let (dir, db) = temp_db();
        let mut s = SqliteStore::open(&db).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
        s.create("a", &MachineSpec::new("/k"), RestartPolicy::Never)
            .unwrap();
        drop(s);
        let s = SqliteStore::open(&db).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
        assert_eq!(s.list().unwrap().len(), 1);
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = s
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A database left by a vmed that knew only the first migration is brought up to date
    /// with its records intact.
    #[test]
    fn an_old_database_is_migrated_in_order() {
        let (dir, db) = temp_db();
        let c = Connection::open(&db).unwrap();
        c.execute_batch(&format!(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);
             INSERT INTO schema_version VALUES (1); {};
             INSERT INTO vms VALUES ('old', '{{\"kernel\":\"/k\"}}', 'stopped', '', 1, 2);",
            MIGRATIONS[0]
        ))
        .unwrap();
        drop(c);
        let mut s = SqliteStore::open(&db).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
        let r = s.get("old").unwrap();
        assert_eq!((r.state, r.pid, r.created_at), (State::Stopped, 0, 1));
        assert_eq!(r.restart_policy, RestartPolicy::Never);
        s.set_pid("old", 42).unwrap();
        assert_eq!(s.get("old").unwrap().pid, 42);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let (dir, db) = temp_db();
        drop(SqliteStore::open(&db).unwrap());
        let c = Connection::open(&db).unwrap();
        c.execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        drop(c);
        let e = SqliteStore::open(&db).err().unwrap();
        assert!(e.to_string().contains("newer vmed"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn crud() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let mut spec = MachineSpec::new("/boot/Image");
        spec.vcpus = 3;
        let r = s.create("web", &spec, RestartPolicy::Always).unwrap();
        assert_eq!(r.restart_policy, RestartPolicy::Always);
        assert_eq!((r.state, r.spec.vcpus), (State::Defined, 3));
        assert!(matches!(
            s.create("web", &spec, RestartPolicy::Never),
            Err(StoreError::Exists(_))
        ));
        s.create("db", &spec, RestartPolicy::Never).unwrap();
        let names: Vec<_> = s.list().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["db", "web"]);
        s.set_state("web", State::Crashed, "boom").unwrap();
        let r = s.get("web").unwrap();
        assert_eq!((r.state, r.reason.as_str()), (State::Crashed, "boom"));
        s.delete("web").unwrap();
        assert!(matches!(s.get("web"), Err(StoreError::NotFound(_))));
        assert!(matches!(s.delete("web"), Err(StoreError::NotFound(_))));
        assert!(matches!(
            s.set_state("web", State::Running, ""),
            Err(StoreError::NotFound(_))
        ));
    }
}
