//! The image catalogue in the daemon's store: one row per image (its manifest's exact bytes,
//! its signature, whether it is usable), the blobs each references, and aliases. Blobs
//! themselves live in the blob store (`vme_image::blobs`); a blob that no row references is
//! garbage for `prune`. An image row and its blob rows are written in one transaction, the
//! last step of an import, so an import cut short leaves no image behind.

use crate::store::{SqliteStore, StoreError};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use vme_image::Manifest;
use vme_image::sign::Signature;

/// The schema of the catalogue (one of the store's migrations).
pub const MIGRATION: &str = "CREATE TABLE images (
        name TEXT PRIMARY KEY NOT NULL,
        manifest BLOB NOT NULL,
        signature TEXT,
        status TEXT NOT NULL DEFAULT 'ok',
        reason TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE image_blobs (
        image TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (image, sha256)
    ) STRICT;
    CREATE INDEX image_blobs_by_digest ON image_blobs (sha256);
    CREATE TABLE image_aliases (
        alias TEXT PRIMARY KEY NOT NULL,
        image TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE
    ) STRICT;";

/// The key a new image or alias `name` of `project` prefers: the name in the `default`
/// project (and for images stored before names were per project), else `PROJECT:NAME`
/// (':' is allowed in neither). The API shows names; the daemon's handlers take keys.
pub fn image_key(project: &str, name: &str) -> String {
    if project == "default" {
        name.to_string()
    } else {
        format!("{project}:{name}")
    }
}

/// An image as stored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ImageRecord {
    /// The daemon's internal key (see [`image_key`]); never shown.
    #[serde(skip)]
    pub key: String,
    /// Its name, unique (with its aliases) in its project.
    pub name: String,
    pub aliases: Vec<String>,
    /// The manifest (see `vme_image::manifest`).
    #[schema(value_type = Object)]
    pub manifest: Manifest,
    /// The manifest's exact bytes: what a signature covers.
    #[serde(skip)]
    pub manifest_bytes: Vec<u8>,
    #[serde(skip)]
    pub signature: Option<Signature>,
    /// The fingerprint of the key that signed it, if signed.
    pub signed_by: Option<String>,
    /// `ok`, or `corrupted`: a blob failed its digest check, and the image is not used
    /// until `verify` finds it whole again.
    pub status: String,
    /// Why it is `corrupted` (names the blob).
    pub reason: String,
    /// Bytes of its distinct blobs.
    pub size: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// The project that owns it.
    pub project: String,
    /// Usable by every project (else only by its own).
    pub public: bool,
    /// Its security label (see crate::labels).
    pub label: String,
}

/// The image catalogue's operations (part of the daemon's [`Store`](crate::store::Store)).
pub trait ImageCatalog {
    /// Records an imported image `name` of `project` and its blobs in one transaction,
    /// under a fresh key (see [`image_key`]).
    fn image_insert(
        &mut self,
        project: &str,
        name: &str,
        manifest: &[u8],
        signature: Option<&Signature>,
    ) -> Result<ImageRecord, StoreError>;
    /// An image by its key or an alias's key.
    fn image_get(&self, key: &str) -> Result<ImageRecord, StoreError>;
    /// The images named `name` (or with an alias `name`) in every project, each with the
    /// key that named it (the image's or the alias's), ordered by project.
    fn image_find(&self, name: &str) -> Result<Vec<(String, ImageRecord)>, StoreError>;
    /// Every image, ordered by name.
    fn image_list(&self) -> Result<Vec<ImageRecord>, StoreError>;
    /// Removes an image (its aliases and blob references go with it).
    fn image_delete(&mut self, name: &str) -> Result<(), StoreError>;
    fn image_set_signature(&mut self, name: &str, sig: &Signature) -> Result<(), StoreError>;
    /// `ok` or `corrupted`, with the reason.
    fn image_set_status(
        &mut self,
        name: &str,
        status: &str,
        reason: &str,
    ) -> Result<(), StoreError>;
    /// Points the alias `alias` of `project` at the image keyed `image` (moving it if it
    /// exists).
    fn image_alias_set(
        &mut self,
        project: &str,
        alias: &str,
        image: &str,
    ) -> Result<(), StoreError>;
    /// Removes the alias keyed `key`.
    fn image_alias_delete(&mut self, key: &str) -> Result<(), StoreError>;
    /// Every blob digest some image references.
    fn image_blobs_in_use(&self) -> Result<Vec<String>, StoreError>;
}

const COLUMNS: &str =
    "name, manifest, signature, status, reason, created_at, project, public, label, short";

type Row = (
    String,
    Vec<u8>,
    Option<String>,
    String,
    String,
    i64,
    String,
    bool,
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
    ))
}

impl SqliteStore {
    fn image_record(
        &self,
        (key, bytes, sig, status, reason, created_at, project, public, label, name): Row,
    ) -> Result<ImageRecord, StoreError> {
        let manifest = Manifest::parse(&bytes, u64::MAX)
            .map_err(|e| StoreError::Corrupt(format!("image {name:?}: {e}")))?;
        let signature = sig
            .map(|s| Signature::parse(s.as_bytes()))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("image {name:?}: {e}")))?;
        let mut stmt = self
            .conn()
            .prepare_cached("SELECT short FROM image_aliases WHERE image = ?1 ORDER BY short")?;
        let aliases = stmt
            .query_map([&key], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(ImageRecord {
            aliases,
            size: manifest.size(),
            signed_by: signature
                .as_ref()
                .and_then(|s| s.key().ok())
                .map(|k| k.fingerprint()),
            key,
            name,
            manifest,
            manifest_bytes: bytes,
            signature,
            status,
            reason,
            created_at,
            project,
            public,
            label,
        })
    }
}

fn not_found(name: &str) -> StoreError {
    StoreError::NoImage(name.into())
}

/// Whether `key` names an image or an alias.
fn key_taken(c: &rusqlite::Connection, key: &str) -> Result<bool, StoreError> {
    Ok(c.query_row(
        "SELECT EXISTS (SELECT 1 FROM images WHERE name = ?1)
             OR EXISTS (SELECT 1 FROM image_aliases WHERE alias = ?1)",
        [key],
        |r| r.get(0),
    )?)
}

/// A fresh key for image or alias `name` of `project`: [`image_key`], or `PROJECT:NAME`
/// when an image or alias stored before names were per project holds that key.
fn fresh_key(c: &rusqlite::Connection, project: &str, name: &str) -> Result<String, StoreError> {
    let key = image_key(project, name);
    if key_taken(c, &key)? {
        return Ok(format!("{project}:{name}"));
    }
    Ok(key)
}

/// Whether `project` has an image or an alias named `name`.
fn name_taken(c: &rusqlite::Connection, project: &str, name: &str) -> Result<bool, StoreError> {
    Ok(c.query_row(
        "SELECT EXISTS (SELECT 1 FROM images WHERE project = ?1 AND short = ?2)
             OR EXISTS (SELECT 1 FROM image_aliases a JOIN images i ON a.image = i.name
                        WHERE i.project = ?1 AND a.short = ?2)",
        [project, name],
        |r| r.get(0),
    )?)
}

impl ImageCatalog for SqliteStore {
    fn image_insert(
        &mut self,
        project: &str,
        name: &str,
        manifest: &[u8],
        signature: Option<&Signature>,
    ) -> Result<ImageRecord, StoreError> {
        let parsed = Manifest::parse(manifest, u64::MAX)
            .map_err(|e| StoreError::Corrupt(format!("image {name:?}: {e}")))?;
        let sig = signature.map(|s| String::from_utf8_lossy(&s.to_bytes()).trim().to_string());
        let tx = self.conn_mut().transaction()?;
        if name_taken(&tx, project, name)? {
            return Err(StoreError::ImageExists(name.into()));
        }
        let key = fresh_key(&tx, project, name)?;
        tx.execute(
            "INSERT INTO images (name, manifest, signature, created_at, short, project)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![key, manifest, sig, crate::store::now(), name, project],
        )?;
        for d in parsed.distinct_blobs().keys() {
            tx.execute(
                "INSERT INTO image_blobs (image, sha256) VALUES (?1, ?2)",
                params![key, d.as_str()],
            )?;
        }
        tx.commit()?;
        self.image_get(&key)
    }

    fn image_find(&self, name: &str) -> Result<Vec<(String, ImageRecord)>, StoreError> {
        let mut stmt = self.conn().prepare(
            "SELECT name, name FROM images WHERE short = ?1
             UNION ALL SELECT alias, image FROM image_aliases WHERE short = ?1",
        )?;
        let keys = stmt
            .query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<(String, String)>, _>>()?;
        let mut found = keys
            .into_iter()
            .map(|(by, image)| Ok((by, self.image_get(&image)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        found.sort_by(|a, b| a.1.project.cmp(&b.1.project));
        Ok(found)
    }

    fn image_get(&self, name: &str) -> Result<ImageRecord, StoreError> {
        let r = self
            .conn()
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM images WHERE name = ?1 OR name = \
                     (SELECT image FROM image_aliases WHERE alias = ?1)"
                ),
                [name],
                row,
            )
            .optional()?
            .ok_or_else(|| not_found(name))?;
        self.image_record(r)
    }

    fn image_list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let mut stmt = self.conn().prepare(&format!(
            "SELECT {COLUMNS} FROM images ORDER BY short, project"
        ))?;
        let rows = stmt.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|r| self.image_record(r)).collect()
    }

    fn image_delete(&mut self, name: &str) -> Result<(), StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM images WHERE name = ?1", [name])?;
        if n == 0 {
            return Err(not_found(name));
        }
        Ok(())
    }

    fn image_set_signature(&mut self, name: &str, sig: &Signature) -> Result<(), StoreError> {
        let text = String::from_utf8_lossy(&sig.to_bytes()).trim().to_string();
        let n = self.conn().execute(
            "UPDATE images SET signature = ?2 WHERE name = ?1",
            params![name, text],
        )?;
        if n == 0 {
            return Err(not_found(name));
        }
        Ok(())
    }

    fn image_set_status(
        &mut self,
        name: &str,
        status: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE images SET status = ?2, reason = ?3 WHERE name = ?1",
            params![name, status, reason],
        )?;
        if n == 0 {
            return Err(not_found(name));
        }
        Ok(())
    }

    fn image_alias_set(
        &mut self,
        project: &str,
        alias: &str,
        image: &str,
    ) -> Result<(), StoreError> {
        let tx = self.conn_mut().transaction()?;
        let target: Option<String> = tx
            .query_row("SELECT name FROM images WHERE name = ?1", [image], |r| {
                r.get(0)
            })
            .optional()?;
        if target.is_none() {
            return Err(not_found(image));
        }
        let clash: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM images WHERE project = ?1 AND short = ?2)",
            [project, alias],
            |r| r.get(0),
        )?;
        if clash {
            return Err(StoreError::ImageExists(alias.into()));
        }
        // The project's alias of that name moves; else a new one.
        let existing: Option<String> = tx
            .query_row(
                "SELECT a.alias FROM image_aliases a JOIN images i ON a.image = i.name
                 WHERE i.project = ?1 AND a.short = ?2",
                [project, alias],
                |r| r.get(0),
            )
            .optional()?;
        match existing {
            Some(key) => tx.execute(
                "UPDATE image_aliases SET image = ?2 WHERE alias = ?1",
                params![key, image],
            )?,
            None => {
                let key = fresh_key(&tx, project, alias)?;
                tx.execute(
                    "INSERT INTO image_aliases (alias, image, short) VALUES (?1, ?2, ?3)",
                    params![key, image, alias],
                )?
            }
        };
        tx.commit()?;
        Ok(())
    }

    fn image_alias_delete(&mut self, key: &str) -> Result<(), StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM image_aliases WHERE alias = ?1", [key])?;
        if n == 0 {
            return Err(not_found(key));
        }
        Ok(())
    }

    fn image_blobs_in_use(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn()
            .prepare("SELECT DISTINCT sha256 FROM image_blobs ORDER BY sha256")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vme_image::Digest;

    fn manifest(name: &str, kernel: &[u8]) -> Vec<u8> {
        let m = format!(
            r#"{{"schema_version":1,"name":"{name}","os":"linux","version":"1",
            "architecture":"riscv64","boot":{{"method":"direct","cmdline":"x"}},
            "resources":{{"default":{{"vcpus":1,"memory":"64M"}},
                          "minimum":{{"vcpus":1,"memory":"64M"}}}},
            "blobs":[{{"role":"kernel","sha256":"{}","size":1}},
                     {{"role":"initrd","sha256":"{}","size":1}}]}}"#,
            Digest::of(kernel),
            Digest::of(b"shared-initrd")
        );
        m.into_bytes()
    }

    #[test]
    fn images_blobs_and_aliases() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let a = s
            .image_insert("default", "a", &manifest("a", b"k1"), None)
            .unwrap();
        assert_eq!(
            (a.status.as_str(), a.size, a.signed_by.as_ref()),
            ("ok", 2, None)
        );
        assert_eq!(a.manifest_bytes, manifest("a", b"k1"), "exact bytes kept");
        assert!(matches!(
            s.image_insert("default", "a", &manifest("a", b"k1"), None),
            Err(StoreError::ImageExists(_))
        ));
        s.image_insert("default", "b", &manifest("b", b"k2"), None)
            .unwrap();
        assert_eq!(
            s.image_blobs_in_use().unwrap().len(),
            3,
            "the initrd is shared"
        );
        s.image_alias_set("default", "latest", "b").unwrap();
        assert_eq!(s.image_get("latest").unwrap().name, "b");
        assert_eq!(s.image_get("b").unwrap().aliases, ["latest"]);
        assert!(matches!(
            s.image_alias_set("default", "a", "b"),
            Err(StoreError::ImageExists(_))
        ));
        assert!(matches!(
            s.image_alias_set("default", "x", "nope"),
            Err(StoreError::NoImage(_))
        ));
        s.image_set_status("a", "corrupted", "blob x").unwrap();
        assert_eq!(s.image_get("a").unwrap().status, "corrupted");
        let key = vme_image::sign::SecretKey::generate().unwrap();
        s.image_set_signature("a", &key.sign(b"m")).unwrap();
        assert_eq!(
            s.image_get("a").unwrap().signed_by,
            Some(key.public().fingerprint())
        );
        s.image_delete("b").unwrap();
        assert!(matches!(s.image_get("latest"), Err(StoreError::NoImage(_))));
        assert_eq!(s.image_blobs_in_use().unwrap().len(), 2);
        assert_eq!(s.image_list().unwrap().len(), 1);
        assert!(matches!(s.image_delete("b"), Err(StoreError::NoImage(_))));
    }

    /// Image and alias names are per project: another project's `a` is keyed `acme:a`; an
    /// image stored before (keyed by its name in another project) keeps its key.
    #[test]
    fn names_are_per_project() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let m = manifest("a", b"k1");
        s.image_insert("default", "a", &m, None).unwrap();
        let acme = s.image_insert("acme", "a", &m, None).unwrap();
        assert_eq!((acme.key.as_str(), acme.name.as_str()), ("acme:a", "a"));
        assert!(matches!(
            s.image_insert("acme", "a", &m, None),
            Err(StoreError::ImageExists(_))
        ));
        // As migrated: globex's `g`, keyed `g`; default's new `g` takes `default:g`.
        s.image_insert("default", "g", &m, None).unwrap();
        s.conn()
            .execute("UPDATE images SET project = 'globex' WHERE name = 'g'", [])
            .unwrap();
        let g = s.image_insert("default", "g", &m, None).unwrap();
        assert_eq!(g.key, "default:g");
        // Aliases too: the same alias in two projects, each pointing at its own.
        s.image_alias_set("acme", "latest", "acme:a").unwrap();
        s.image_alias_set("default", "latest", "a").unwrap();
        let found: Vec<_> = s
            .image_find("latest")
            .unwrap()
            .into_iter()
            .map(|(by, im)| (by, im.key, im.aliases))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "acme:latest".into(),
                    "acme:a".into(),
                    vec!["latest".to_string()]
                ),
                ("latest".into(), "a".into(), vec!["latest".to_string()])
            ]
        );
        assert!(matches!(
            s.image_alias_set("acme", "a", "acme:a"),
            Err(StoreError::ImageExists(_))
        ));
        s.image_alias_delete("acme:latest").unwrap();
        assert_eq!(s.image_find("latest").unwrap().len(), 1);
        assert_eq!(s.image_find("a").unwrap().len(), 2);
    }
}
