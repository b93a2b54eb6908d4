//! Access control's state in the daemon's store: projects (with quotas), users (clearance,
//! the uid and TLS certificate that identify them), their role in each project, and API
//! tokens (only an argon2 hash of each secret is kept). VMs and images carry their project
//! and label in their own rows (`vms.project`, `images.project`, `images.public`, ...).
//!
//! The migration creates the `default` project and the user `root` (uid 0, admin of
//! `default`): a daemon upgraded from before access control behaves as it did for root.

use crate::store::{SqliteStore, StoreError, now};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// The schema (one of the store's migrations).
pub const MIGRATION: &str = "CREATE TABLE projects (
        name TEXT PRIMARY KEY NOT NULL,
        quota TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL
    ) STRICT;
    INSERT INTO projects VALUES ('default', '{}', 0);
    CREATE TABLE users (
        name TEXT PRIMARY KEY NOT NULL,
        clearance TEXT NOT NULL,
        uid INTEGER UNIQUE,
        cert TEXT UNIQUE,
        created_at INTEGER NOT NULL
    ) STRICT;
    INSERT INTO users VALUES ('root', 'topsecret', 0, NULL, 0);
    CREATE TABLE roles (
        user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        project TEXT NOT NULL REFERENCES projects(name) ON DELETE CASCADE,
        role TEXT NOT NULL,
        PRIMARY KEY (user, project)
    ) STRICT;
    INSERT INTO roles VALUES ('root', 'default', 'admin');
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY NOT NULL,
        user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        hash TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        revoked_at INTEGER
    ) STRICT;
    ALTER TABLE vms ADD COLUMN project TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE vms ADD COLUMN label TEXT NOT NULL DEFAULT 'unclassified';
    ALTER TABLE images ADD COLUMN project TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE images ADD COLUMN public INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE images ADD COLUMN label TEXT NOT NULL DEFAULT 'unclassified';";

/// A project's limits; an absent one is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// VMs (defined or running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<u64>,
    /// vCPUs of all its VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u64>,
    /// Guest memory of all its VMs, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Bytes of all its VMs' disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<u64>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectRecord {
    pub name: String,
    pub quota: Quota,
    pub created_at: i64,
    /// Launches in this project accept only images signed by a key the daemon trusts,
    /// whatever the daemon-wide `require_signed` says.
    pub require_signed: bool,
}

/// A user's role in one project.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Membership {
    pub project: String,
    /// admin, operator, user or auditor.
    pub role: String,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct UserRecord {
    pub name: String,
    /// The highest label the user may see (see crate::labels).
    pub clearance: String,
    /// The local uid mapped to this user on the Unix socket.
    pub uid: Option<u32>,
    /// The SHA-256 fingerprint of the TLS client certificate bound to this user.
    pub cert: Option<String>,
    pub roles: Vec<Membership>,
    pub created_at: i64,
}

/// A token as stored (its secret is never stored, only its hash).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TokenRecord {
    pub id: String,
    pub user: String,
    #[serde(skip)]
    pub hash: String,
    pub created_at: i64,
    /// Unix seconds; none: it does not expire.
    pub expires_at: Option<i64>,
    /// Unix seconds when it was revoked.
    pub revoked_at: Option<i64>,
}

/// Changes to a user; None leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct UserChange {
    pub clearance: Option<String>,
    /// Some(None) removes the mapping.
    pub uid: Option<Option<u32>>,
    pub cert: Option<Option<String>>,
}

/// Access control's operations on the store (part of [`Store`](crate::store::Store)).
pub trait AuthStore {
    fn project_create(
        &mut self,
        name: &str,
        quota: &Quota,
        require_signed: bool,
    ) -> Result<ProjectRecord, StoreError>;
    fn project_get(&self, name: &str) -> Result<Option<ProjectRecord>, StoreError>;
    fn project_list(&self) -> Result<Vec<ProjectRecord>, StoreError>;
    fn project_set_quota(&mut self, name: &str, quota: &Quota) -> Result<(), StoreError>;
    fn project_set_require_signed(&mut self, name: &str, on: bool) -> Result<(), StoreError>;
    /// Removes a project; refused (Conflict text) while it owns VMs or images.
    fn project_delete(&mut self, name: &str) -> Result<(), StoreError>;
    fn user_create(&mut self, name: &str, clearance: &str) -> Result<(), StoreError>;
    fn user_get(&self, name: &str) -> Result<Option<UserRecord>, StoreError>;
    fn user_by_uid(&self, uid: u32) -> Result<Option<UserRecord>, StoreError>;
    fn user_by_cert(&self, fingerprint: &str) -> Result<Option<UserRecord>, StoreError>;
    fn user_list(&self) -> Result<Vec<UserRecord>, StoreError>;
    fn user_update(&mut self, name: &str, change: &UserChange) -> Result<(), StoreError>;
    fn user_delete(&mut self, name: &str) -> Result<(), StoreError>;
    /// Sets (Some) or removes (None) the user's role in the project.
    fn role_set(&mut self, user: &str, project: &str, role: Option<&str>)
    -> Result<(), StoreError>;
    fn token_insert(
        &mut self,
        id: &str,
        user: &str,
        hash: &str,
        expires_at: Option<i64>,
    ) -> Result<(), StoreError>;
    fn token_get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Every token, or the user's.
    fn token_list(&self, user: Option<&str>) -> Result<Vec<TokenRecord>, StoreError>;
    /// Marks a token revoked; false if there is none of that id.
    fn token_revoke(&mut self, id: &str) -> Result<bool, StoreError>;
    /// Gives a VM its project and label (right after creating it, under the same lock).
    fn vm_set_owner(&mut self, name: &str, project: &str, label: &str) -> Result<(), StoreError>;
    fn vm_set_label(&mut self, name: &str, label: &str) -> Result<(), StoreError>;
    /// Sets an image's project, whether it is public, and its label.
    fn image_set_access(
        &mut self,
        name: &str,
        project: &str,
        public: bool,
        label: &str,
    ) -> Result<(), StoreError>;
}

/// An access-control write refused for a reason the caller can fix (409).
pub fn conflict(msg: String) -> StoreError {
    StoreError::Refused(msg)
}

type ProjectRow = (String, String, i64, bool);

fn project_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProjectRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn project(
    (name, quota, created_at, require_signed): ProjectRow,
) -> Result<ProjectRecord, StoreError> {
    let quota = serde_json::from_str(&quota).map_err(|e| {
        StoreError::Corrupt(format!("project {name:?} has an unreadable quota: {e}"))
    })?;
    Ok(ProjectRecord {
        name,
        quota,
        created_at,
        require_signed,
    })
}

type UserRow = (String, String, Option<i64>, Option<String>, i64);

fn user_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: r.get(0)?,
        user: r.get(1)?,
        hash: r.get(2)?,
        created_at: r.get(3)?,
        expires_at: r.get(4)?,
        revoked_at: r.get(5)?,
    })
}

const USER_COLUMNS: &str = "name, clearance, uid, cert, created_at";
const TOKEN_COLUMNS: &str = "id, user, hash, created_at, expires_at, revoked_at";

impl SqliteStore {
    fn user_record(
        &self,
        (name, clearance, uid, cert, created_at): UserRow,
    ) -> Result<UserRecord, StoreError> {
        let mut stmt = self
            .conn()
            .prepare_cached("SELECT project, role FROM roles WHERE user = ?1 ORDER BY project")?;
        let roles = stmt
            .query_map([&name], |r| {
                Ok(Membership {
                    project: r.get(0)?,
                    role: r.get(1)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(UserRecord {
            name,
            clearance,
            uid: uid.and_then(|u| u32::try_from(u).ok()),
            cert,
            roles,
            created_at,
        })
    }

    fn user_where(
        &self,
        clause: &str,
        arg: &dyn rusqlite::ToSql,
    ) -> Result<Option<UserRecord>, StoreError> {
        let row = self
            .conn()
            .query_row(
                &format!("SELECT {USER_COLUMNS} FROM users WHERE {clause} = ?1"),
                [arg],
                user_row,
            )
            .optional()?;
        row.map(|r| self.user_record(r)).transpose()
    }
}

fn unique(e: rusqlite::Error, what: String) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            conflict(what)
        }
        e => StoreError::Db(e),
    }
}

impl AuthStore for SqliteStore {
    fn project_create(
        &mut self,
        name: &str,
        quota: &Quota,
        require_signed: bool,
    ) -> Result<ProjectRecord, StoreError> {
        let q = serde_json::to_string(quota).unwrap_or_else(|_| "{}".into());
        self.conn()
            .execute(
                "INSERT INTO projects (name, quota, created_at, require_signed) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![name, q, now(), require_signed],
            )
            .map_err(|e| {
                unique(
                    e,
                    format!("a project named {name:?} exists: choose another name"),
                )
            })?;
        self.project_get(name)?
            .ok_or_else(|| StoreError::Corrupt(format!("project {name:?} vanished")))
    }

    fn project_get(&self, name: &str) -> Result<Option<ProjectRecord>, StoreError> {
        self.conn()
            .query_row(
                "SELECT name, quota, created_at, require_signed FROM projects WHERE name = ?1",
                [name],
                project_row,
            )
            .optional()?
            .map(project)
            .transpose()
    }

    fn project_list(&self) -> Result<Vec<ProjectRecord>, StoreError> {
        let mut stmt = self.conn().prepare(
            "SELECT name, quota, created_at, require_signed FROM projects ORDER BY name",
        )?;
        let rows = stmt.query_map([], project_row)?;
        rows.map(|r| project(r?)).collect()
    }

    fn project_set_require_signed(&mut self, name: &str, on: bool) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE projects SET require_signed = ?2 WHERE name = ?1",
            params![name, on],
        )?;
        Ok(())
    }

    fn project_set_quota(&mut self, name: &str, quota: &Quota) -> Result<(), StoreError> {
        let q = serde_json::to_string(quota).unwrap_or_else(|_| "{}".into());
        self.conn().execute(
            "UPDATE projects SET quota = ?2 WHERE name = ?1",
            params![name, q],
        )?;
        Ok(())
    }

    fn project_delete(&mut self, name: &str) -> Result<(), StoreError> {
        let count = |table: &str| -> Result<i64, StoreError> {
            Ok(self.conn().query_row(
                &format!("SELECT COUNT(*) FROM {table} WHERE project = ?1"),
                [name],
                |r| r.get(0),
            )?)
        };
        let (vms, images) = (count("vms")?, count("images")?);
        if vms + images > 0 {
            return Err(conflict(format!(
                "project {name:?} still owns {vms} VM(s) and {images} image(s): delete them first"
            )));
        }
        self.conn()
            .execute("DELETE FROM projects WHERE name = ?1", [name])?;
        Ok(())
    }

    fn user_create(&mut self, name: &str, clearance: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO users (name, clearance, created_at) VALUES (?1, ?2, ?3)",
                params![name, clearance, now()],
            )
            .map_err(|e| {
                unique(
                    e,
                    format!("a user named {name:?} exists: choose another name"),
                )
            })?;
        Ok(())
    }

    fn user_get(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.user_where("name", &name)
    }

    fn user_by_uid(&self, uid: u32) -> Result<Option<UserRecord>, StoreError> {
        self.user_where("uid", &i64::from(uid))
    }

    fn user_by_cert(&self, fingerprint: &str) -> Result<Option<UserRecord>, StoreError> {
        self.user_where("cert", &fingerprint)
    }

    fn user_list(&self) -> Result<Vec<UserRecord>, StoreError> {
        let mut stmt = self
            .conn()
            .prepare(&format!("SELECT {USER_COLUMNS} FROM users ORDER BY name"))?;
        let rows = stmt
            .query_map([], user_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|r| self.user_record(r)).collect()
    }

    fn user_update(&mut self, name: &str, change: &UserChange) -> Result<(), StoreError> {
        let tx = self.conn_mut().transaction()?;
        if let Some(c) = &change.clearance {
            tx.execute(
                "UPDATE users SET clearance = ?2 WHERE name = ?1",
                params![name, c],
            )?;
        }
        if let Some(uid) = change.uid {
            tx.execute(
                "UPDATE users SET uid = ?2 WHERE name = ?1",
                params![name, uid.map(i64::from)],
            )
            .map_err(|e| unique(e, format!("uid {uid:?} is already mapped to another user")))?;
        }
        if let Some(cert) = &change.cert {
            tx.execute(
                "UPDATE users SET cert = ?2 WHERE name = ?1",
                params![name, cert],
            )
            .map_err(|e| unique(e, "that certificate is bound to another user".into()))?;
        }
        tx.commit()?;
        Ok(())
    }

    fn user_delete(&mut self, name: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM users WHERE name = ?1", [name])?;
        Ok(())
    }

    fn role_set(
        &mut self,
        user: &str,
        project: &str,
        role: Option<&str>,
    ) -> Result<(), StoreError> {
        match role {
            Some(r) => self.conn().execute(
                "INSERT INTO roles (user, project, role) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user, project) DO UPDATE SET role = excluded.role",
                params![user, project, r],
            )?,
            None => self.conn().execute(
                "DELETE FROM roles WHERE user = ?1 AND project = ?2",
                params![user, project],
            )?,
        };
        Ok(())
    }

    fn token_insert(
        &mut self,
        id: &str,
        user: &str,
        hash: &str,
        expires_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO tokens (id, user, hash, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, user, hash, now(), expires_at],
        )?;
        Ok(())
    }

    fn token_get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1"),
                [id],
                token_row,
            )
            .optional()?)
    }

    fn token_list(&self, user: Option<&str>) -> Result<Vec<TokenRecord>, StoreError> {
        let mut stmt = self.conn().prepare(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE ?1 IS NULL OR user = ?1 ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map([user], token_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn token_revoke(&mut self, id: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
            params![id, now()],
        )?;
        Ok(n > 0)
    }

    fn vm_set_owner(&mut self, name: &str, project: &str, label: &str) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE vms SET project = ?2, label = ?3 WHERE name = ?1",
            params![name, project, label],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(name.into()));
        }
        Ok(())
    }

    fn vm_set_label(&mut self, name: &str, label: &str) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE vms SET label = ?2 WHERE name = ?1",
            params![name, label],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(name.into()));
        }
        Ok(())
    }

    fn image_set_access(
        &mut self,
        name: &str,
        project: &str,
        public: bool,
        label: &str,
    ) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE images SET project = ?2, public = ?3, label = ?4 WHERE name = ?1",
            params![name, project, public, label],
        )?;
        if n == 0 {
            return Err(StoreError::NoImage(name.into()));
        }
        Ok(())
    }
}
