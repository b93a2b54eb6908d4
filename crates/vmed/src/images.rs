//! The daemon's image repository: imports (an archive streamed into the blob store, a qcow2
//! disk converted to a raw blob on the way, then one transaction that makes the image
//! visible), listing, aliases, signatures, verification,
//! export, deletion and prune; and the two uses of an image by a VM: filling a create request
//! from it, and checking its blobs' digests before every start.
//!
//! Blobs are shared by images and by the VMs created from them (a VM's spec names the blob
//! files directly): a blob is garbage only when no image and no VM references it. An import
//! holds no lock while its archive streams in: it claims its blobs (`Daemon::image_claims`)
//! once its manifest is read, and prune and delete leave claimed blobs alone, so a prune
//! never removes a blob an import has written, or counts on, but not yet committed.

use crate::daemon::{Daemon, OpError, lock};
use crate::store::StoreError;
use crate::store_images::ImageRecord;
use crate::validate::CreateVm;
use serde::Serialize;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::PathBuf;
use vme_api::MachineSpec;
use vme_api::overlay::CloneKind;
use vme_image::archive::{self, ArchiveError};
use vme_image::blobs::{BlobError, BlobStore};
use vme_image::manifest::{Boot, check_name};
use vme_image::qcow2::Qcow2Error;
use vme_image::sign::{PublicKey, Signature};
use vme_image::{Digest, Role};

/// Default bound on one blob: larger than any root disk we ship, small enough to refuse an
/// archive header that claims petabytes.
pub const DEFAULT_MAX_BLOB: u64 = 64 << 30;

/// Which images may be launched.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Only images signed by one of `trusted`.
    pub require_signed: bool,
    pub trusted: Vec<PublicKey>,
    /// Who asks for signatures, for the refusal: the daemon or a project.
    pub required_by: String,
}

/// Who asks for signatures when the daemon's own setting does.
const DAEMON_REQUIRES: &str = "this daemon launches only signed images (require_signed)";

impl Default for Policy {
    fn default() -> Self {
        Policy {
            require_signed: false,
            trusted: Vec::new(),
            required_by: DAEMON_REQUIRES.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    pub max_blob: u64,
    policy: Policy,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            max_blob: DEFAULT_MAX_BLOB,
            policy: Policy::default(),
        }
    }
}

impl ImageConfig {
    pub fn new(
        max_blob: Option<u64>,
        require_signed: bool,
        keys: &[String],
    ) -> Result<Self, String> {
        let trusted = keys
            .iter()
            .map(|k| PublicKey::parse(k).map_err(|e| format!("trusted_keys: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if require_signed && trusted.is_empty() {
            return Err(
                "require_signed is on but trusted_keys is empty: no image could be \
                launched; add a key (trusted_keys = [\"ed25519:...\"]) or turn it off"
                    .into(),
            );
        }
        Ok(ImageConfig {
            max_blob: max_blob.unwrap_or(DEFAULT_MAX_BLOB),
            policy: Policy {
                require_signed,
                trusted,
                required_by: DAEMON_REQUIRES.into(),
            },
        })
    }

    /// The policy for images launched in `project` (its name and its own `require_signed`):
    /// the daemon's trusted keys, with signatures required where the daemon or the project
    /// asks for them.
    pub fn policy(&self, project: Option<(&str, bool)>) -> Policy {
        let mut p = self.policy.clone();
        if let Some((name, true)) = project
            && !p.require_signed
        {
            p.require_signed = true;
            p.required_by =
                format!("project {name:?} launches only signed images (its require_signed)");
        }
        p
    }
}

impl Policy {
    /// Whether `image` may be launched under this policy; the refusal names the key.
    pub fn admits(&self, image: &ImageRecord) -> Result<(), String> {
        let name = &image.name;
        let Some(sig) = &image.signature else {
            if self.require_signed {
                return Err(format!(
                    "image {name:?} is unsigned and {}: sign it with `vme image sign {name} \
                     --key FILE` using a trusted key",
                    self.required_by
                ));
            }
            return Ok(());
        };
        // A stored signature was checked when stored; check again, it costs microseconds.
        let key = sig.check(&image.manifest_bytes)?;
        if self.require_signed && !self.trusted.contains(&key) {
            return Err(format!(
                "image {name:?} is signed by key {} ({key}), which this daemon does not trust, \
                 and {}: add the key to trusted_keys in vmed's config, or sign the image with \
                 a trusted key",
                key.fingerprint(),
                self.required_by
            ));
        }
        Ok(())
    }
}

/// What an import did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ImportReport {
    pub image: ImageRecord,
    /// Blobs written by this import, and blobs that were already stored (kept once).
    pub blobs_stored: usize,
    pub blobs_deduplicated: usize,
}

/// What verify found, blob by blob.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VerifyReport {
    pub image: String,
    /// `ok` or `corrupted`.
    pub status: String,
    pub blobs: Vec<BlobCheck>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BlobCheck {
    pub role: String,
    pub sha256: String,
    pub ok: bool,
    /// What is wrong with it (empty when ok).
    pub error: String,
}

/// What prune removed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PruneReport {
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    /// Temp files of imports cut short.
    pub temp_files_removed: usize,
}

fn failed(e: impl std::fmt::Display) -> OpError {
    OpError::Failed(e.to_string())
}

impl From<ArchiveError> for OpError {
    fn from(e: ArchiveError) -> OpError {
        match e {
            ArchiveError::Blob(BlobError::Io { .. }) | ArchiveError::Io(_) => failed(e),
            // The daemon's own disk failing while it converts, not the client's file.
            ArchiveError::Blob(BlobError::Qcow2 {
                err: Qcow2Error::Read(_) | Qcow2Error::Write(_),
                ..
            }) => failed(e),
            _ => OpError::BadRequest(e.to_string()),
        }
    }
}

impl Daemon {
    pub(crate) fn blobs(&self) -> Result<BlobStore, OpError> {
        let dir = self.config().state_dir.join("images");
        BlobStore::open(&dir).map_err(|e| {
            failed(format!(
                "cannot open the blob store {}: {e}; check the state dir",
                dir.display()
            ))
        })
    }

    /// Imports the archive streamed from `r` as image `name` (default: the manifest's) of
    /// `project`.
    pub fn image_import(
        &self,
        project: &str,
        name: Option<&str>,
        r: &mut dyn Read,
    ) -> Result<ImportReport, OpError> {
        if let Some(n) = name {
            check_name(n).map_err(OpError::BadRequest)?;
        }
        let blobs = self.blobs()?;
        // No lock is held while the archive streams in: the blobs are claimed instead.
        let mut claims = Claims {
            daemon: self,
            digests: Vec::new(),
        };
        let mut seen = 0u64;
        // A name already taken is refused before the blobs are uploaded.
        let mut early: Option<OpError> = None;
        let mut check = |m: &vme_image::Manifest| {
            let n = name.unwrap_or(&m.name);
            let free = match self.store().image_find(n) {
                Ok(found) if found.iter().any(|(_, im)| im.project == project) => {
                    Err(StoreError::ImageExists(n.into()))
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = free {
                let msg = e.to_string();
                early = Some(e.into());
                return Err(msg);
            }
            claims.claim(m.distinct_blobs().into_keys());
            Ok(())
        };
        let removable = |d: &Digest| lock(&self.image_claims).get(d) == Some(&1);
        let imported = archive::import_checked(
            r,
            &blobs,
            self.config().images.max_blob,
            &mut check,
            &removable,
            &mut |n| {
                seen += n;
                if seen >= 1 << 20 {
                    crate::crashpoint::hit("image-import:mid-blob");
                }
            },
        )
        .map_err(|e| match (e, early.take()) {
            (ArchiveError::Refused(_), Some(first)) => first,
            (e, _) => e.into(),
        })?;
        // From here on, a refusal must remove the blobs this import wrote (and no other
        // running import counts on).
        let undo = |e: OpError| {
            for d in imported.stored.iter().filter(|d| removable(d)) {
                let _ = blobs.remove(d);
            }
            e
        };
        let name = name.unwrap_or(&imported.manifest.name);
        if let Some(sig) = &imported.signature {
            sig.check(&imported.manifest_bytes)
                .map_err(|e| undo(OpError::BadRequest(e)))?;
        }
        crate::crashpoint::hit("image-import:before-commit");
        let image = self
            .store()
            .image_insert(
                project,
                name,
                &imported.manifest_bytes,
                imported.signature.as_ref(),
            )
            .map_err(|e| undo(e.into()))?;
        Ok(ImportReport {
            image,
            blobs_stored: imported.stored.len(),
            blobs_deduplicated: imported.deduplicated.len(),
        })
    }

    pub fn image_list(&self) -> Result<Vec<ImageRecord>, OpError> {
        Ok(self.store().image_list()?)
    }

    pub fn image_get(&self, name: &str) -> Result<ImageRecord, OpError> {
        Ok(self.store().image_get(name)?)
    }

    /// Every blob an image or a VM references.
    fn blobs_in_use(&self, blobs: &BlobStore) -> Result<BTreeSet<Digest>, OpError> {
        let store = self.store();
        let mut used: BTreeSet<Digest> = store
            .image_blobs_in_use()?
            .iter()
            .filter_map(|d| Digest::parse(d).ok())
            .collect();
        for vm in store.list()? {
            used.extend(spec_blobs(blobs, &vm.spec).into_iter().map(|(_, d)| d));
        }
        Ok(used)
    }

    /// Removes an image (by name or alias) and the blobs nothing else references.
    pub fn image_delete(&self, name: &str) -> Result<(), OpError> {
        let blobs = self.blobs()?;
        let _g = lock(&self.image_lock);
        let claims = lock(&self.image_claims);
        let image = self.store().image_get(name)?;
        self.store().image_delete(&image.key)?;
        let used = self.blobs_in_use(&blobs)?;
        for d in image.manifest.distinct_blobs().keys() {
            if !used.contains(d) && !claims.contains_key(d) {
                blobs.remove(d).map_err(|e| {
                    failed(format!(
                        "image {:?} is deleted but its blob {d} could not be removed ({e}); \
                         run `vme image prune`",
                        image.name
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Removes every blob no image or VM references, and leftover temp files.
    pub fn image_prune(&self) -> Result<PruneReport, OpError> {
        let blobs = self.blobs()?;
        let _g = lock(&self.image_lock);
        // Held throughout, so no import claims (and dedupes against) a blob being removed.
        let claims = lock(&self.image_claims);
        let used = self.blobs_in_use(&blobs)?;
        let mut report = PruneReport {
            blobs_removed: 0,
            bytes_freed: 0,
            temp_files_removed: blobs
                .clean_tmp(&|d| claims.contains_key(d))
                .map_err(failed)?,
        };
        for d in blobs.list().map_err(failed)? {
            if !used.contains(&d) && !claims.contains_key(&d) {
                report.bytes_freed += blobs.remove(&d).map_err(failed)?;
                report.blobs_removed += 1;
            }
        }
        Ok(report)
    }

    /// Re-hashes every blob of an image; marks it `ok` or `corrupted` accordingly.
    pub fn image_verify(&self, name: &str) -> Result<VerifyReport, OpError> {
        let blobs = self.blobs()?;
        let image = self.store().image_get(name)?;
        let checks: Vec<BlobCheck> = image
            .manifest
            .blobs
            .iter()
            .map(|b| {
                let r = blobs.verify(&b.sha256, b.size);
                BlobCheck {
                    role: b.role.as_str().into(),
                    sha256: b.sha256.to_string(),
                    ok: r.is_ok(),
                    error: r.err().map(|e| e.to_string()).unwrap_or_default(),
                }
            })
            .collect();
        let bad: Vec<String> = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{} {}", c.role, c.error))
            .collect();
        let (status, reason) = if bad.is_empty() {
            ("ok", String::new())
        } else {
            ("corrupted", bad.join("; "))
        };
        self.store().image_set_status(&image.key, status, &reason)?;
        Ok(VerifyReport {
            image: image.name,
            status: status.into(),
            blobs: checks,
        })
    }

    /// The manifest's exact bytes (what `vme image sign` signs).
    pub fn image_manifest(&self, name: &str) -> Result<Vec<u8>, OpError> {
        Ok(self.store().image_get(name)?.manifest_bytes)
    }

    /// Stores a signature of an image's manifest, after checking it is one.
    pub fn image_sign(&self, name: &str, sig: &[u8]) -> Result<ImageRecord, OpError> {
        let sig = Signature::parse(sig).map_err(OpError::BadRequest)?;
        let image = self.store().image_get(name)?;
        sig.check(&image.manifest_bytes)
            .map_err(OpError::BadRequest)?;
        self.store().image_set_signature(&image.key, &sig)?;
        Ok(self.store().image_get(&image.key)?)
    }

    /// Points the alias `alias` of `project` at the image keyed `target`.
    pub fn image_alias_set(&self, project: &str, alias: &str, target: &str) -> Result<(), OpError> {
        check_name(alias).map_err(OpError::BadRequest)?;
        Ok(self.store().image_alias_set(project, alias, target)?)
    }

    /// Removes the alias keyed `key`.
    pub fn image_alias_delete(&self, key: &str) -> Result<(), OpError> {
        Ok(self.store().image_alias_delete(key)?)
    }

    /// Writes image `name` as an archive to `w`.
    pub fn image_export(&self, name: &str, w: &mut dyn Write) -> Result<(), OpError> {
        let blobs = self.blobs()?;
        let image = self.store().image_get(name)?;
        archive::write(
            w,
            &image.manifest_bytes,
            &image.manifest,
            image.signature.as_ref(),
            &mut |d| Ok(Box::new(std::fs::File::open(blobs.path(d))?)),
        )
        .map_err(|e| failed(format!("cannot export image {name:?}: {e}")))
    }

    /// Fills a create request from its image: kernel, initrd and cmdline from the image's
    /// blobs, architecture, and resources (the image's defaults where the request gives none,
    /// and never below its minimum). Checks the signature policy and every blob's digest.
    ///
    /// Returns the image's root disk blob, if it has one: the request then names the blob
    /// itself as its first disk (so it passes the checks of a create), and the create gives
    /// the VM a thin clone of it instead (see [`Self::make_root_volume`]).
    pub(crate) fn apply_image(&self, req: &mut CreateVm) -> Result<Option<RootBlob>, OpError> {
        let Some(name) = req.image.clone() else {
            return Ok(None);
        };
        if req.kernel.is_some() || req.initrd.is_some() {
            return Err(OpError::BadRequest(
                "give either an image or a kernel and initrd, not both".into(),
            ));
        }
        // The image, and the project's own signature policy, which comes on top of the
        // daemon's.
        let (image, project_requires) = {
            let project = self.store().project_get(req.project_or_default())?;
            (
                self.image_for(req.project_or_default(), &name, &|_| true)?,
                project.is_some_and(|p| p.require_signed),
            )
        };
        if image.status != "ok" {
            return Err(OpError::Conflict(format!(
                "image corrupted: image {:?} is marked unusable ({}); restore the blob and run \
                 `vme image verify {}`, or delete and re-import the image",
                image.name, image.reason, image.name
            )));
        }
        self.config()
            .images
            .policy(Some((req.project_or_default(), project_requires)))
            .admits(&image)
            .map_err(OpError::Forbidden)?;
        let m = &image.manifest;
        if let Some(a) = req.arch
            && a != m.architecture
        {
            return Err(OpError::BadRequest(format!(
                "image {name:?} is for {}, not {a}",
                m.architecture
            )));
        }
        let Boot::Direct { cmdline } = &m.boot else {
            return Err(OpError::BadRequest(format!(
                "image {name:?} boots from its disk, which vme cannot launch yet: use an image \
                 with boot method direct"
            )));
        };
        let (def, min) = (m.resources.default, m.resources.minimum);
        let vcpus = req.vcpus.unwrap_or(def.vcpus);
        let memory = req.memory.unwrap_or(def.memory);
        if vcpus < min.vcpus || memory < min.memory {
            return Err(OpError::BadRequest(format!(
                "image {name:?} needs at least {} vCPUs and {} of memory; asked for {vcpus} \
                 and {memory}",
                min.vcpus, min.memory
            )));
        }
        let blobs = self.blobs()?;
        for b in &m.blobs {
            if let Err(e) = blobs.verify(&b.sha256, b.size) {
                return Err(self.mark_corrupted(&image, b.role, &e));
            }
        }
        let path = |r| m.blob(r).map(|b| blobs.path(&b.sha256));
        req.kernel = path(Role::Kernel);
        req.initrd = path(Role::Initrd);
        let root = m.blob(Role::Disk).map(|b| RootBlob {
            path: blobs.path(&b.sha256),
            digest: b.sha256.clone(),
        });
        if let Some(root) = &root {
            req.disks.insert(
                0,
                crate::devices::DiskReq {
                    path: root.path.clone(),
                    readonly: true,
                    serial: Some(format!("image-{}", root.digest.short())),
                },
            );
        }
        req.arch = Some(m.architecture);
        req.vcpus = Some(vcpus);
        req.memory = Some(memory);
        if req.cmdline.is_none() {
            req.cmdline = Some(cmdline.clone());
        }
        Ok(root)
    }

    /// Gives the VM its own root volume, `VMDIR/root.ovl`: a thin clone of the image's disk
    /// blob (a reflink where the file system can, else a copy-on-write overlay on the blob),
    /// made in O(1) time and space; `disk` (the blob, as [`Self::apply_image`] put it) then
    /// names the volume. The VM has no record yet, so a file left there by a create that
    /// died is garbage and goes first.
    pub(crate) fn make_root_volume(
        &self,
        vm: &str,
        root: &RootBlob,
        disk: &mut vme_api::spec::DiskSpec,
    ) -> Result<PathBuf, OpError> {
        let dir = crate::daemon::vm_dir(&self.config().state_dir, vm);
        let volume = dir.join(ROOT_VOLUME);
        let fail = |e: String| {
            failed(format!(
                "cannot make VM {vm:?}'s root volume {}: {e}; check the state dir's free \
                 space and permissions",
                volume.display()
            ))
        };
        std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
        match std::fs::remove_file(&volume) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e.to_string())),
            _ => {}
        }
        let kind = vme_api::overlay::thin_clone(&root.path, &volume, digest_bytes(&root.digest))
            .map_err(|e| fail(e.to_string()))?;
        disk.path = volume.clone();
        disk.readonly = false;
        disk.base = match kind {
            CloneKind::Overlay => Some(root.path.clone()),
            CloneKind::Reflink => None,
        };
        Ok(volume)
    }

    fn mark_corrupted(&self, im: &ImageRecord, role: Role, e: &BlobError) -> OpError {
        let reason = format!("{} {e}", role.as_str());
        let _ = self.store().image_set_status(&im.key, "corrupted", &reason);
        let image = &im.name;
        OpError::Conflict(format!(
            "image corrupted: image {image:?}: {reason}; it is marked unusable (see `vme image \
             verify {image}`)"
        ))
    }

    /// Before a start: re-hashes the image blobs the VM's spec names (its name is its
    /// digest), so a blob altered since the VM was created is never booted.
    pub(crate) fn check_image_blobs(&self, spec: &MachineSpec) -> Result<(), String> {
        let blobs = self.blobs().map_err(|e| e.to_string())?;
        for (what, d) in spec_blobs(&blobs, spec) {
            let size = std::fs::metadata(blobs.path(&d))
                .map(|m| m.len())
                .unwrap_or(0);
            if let Err(e) = blobs.verify(&d, size) {
                let images = self.store().image_list().unwrap_or_default();
                for i in images
                    .iter()
                    .filter(|i| i.manifest.distinct_blobs().contains_key(&d))
                {
                    let _ = self
                        .store()
                        .image_set_status(&i.key, "corrupted", &e.to_string());
                }
                return Err(format!("image corrupted: the VM's {what}: {e}"));
            }
        }
        // An overlay must sit on the very blob it was cloned from: the monitor checks only
        // the base's size and a sample of it.
        for disk in &spec.disks {
            let Some(base) = &disk.base else { continue };
            let header = vme_api::overlay::inspect(&disk.path).map_err(|e| e.to_string())?;
            let want = blobs.digest_of_path(base).map(|d| digest_bytes(&d));
            if want != Some(header.base_digest) {
                return Err(format!(
                    "the VM's volume {} was made from another image than {}: recreate the VM \
                     from its image",
                    disk.path.display(),
                    base.display()
                ));
            }
        }
        Ok(())
    }
}

/// A digest's 32 bytes (a Digest is 64 checked hex digits).
fn digest_bytes(d: &Digest) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, pair) in d.as_str().as_bytes().chunks(2).enumerate().take(32) {
        let hex = std::str::from_utf8(pair).ok();
        out[i] = hex
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

/// The file name of a VM's root volume made from an image, in its VM directory.
pub const ROOT_VOLUME: &str = "root.ovl";

/// An image's root disk blob, for a VM made from the image.
pub(crate) struct RootBlob {
    pub path: PathBuf,
    pub digest: Digest,
}

/// An import's claims on its blobs, given back when it ends (however it ends).
struct Claims<'a> {
    daemon: &'a Daemon,
    digests: Vec<Digest>,
}

impl Claims<'_> {
    fn claim(&mut self, digests: impl Iterator<Item = Digest>) {
        let mut all = lock(&self.daemon.image_claims);
        for d in digests {
            *all.entry(d.clone()).or_default() += 1;
            self.digests.push(d);
        }
    }
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        let mut all = lock(&self.daemon.image_claims);
        for d in &self.digests {
            if let Some(n) = all.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    all.remove(d);
                }
            }
        }
    }
}

/// The image blobs a VM's spec names, with what each is.
fn spec_blobs(blobs: &BlobStore, spec: &MachineSpec) -> Vec<(&'static str, Digest)> {
    let mut v = Vec::new();
    let mut add = |what, p: &std::path::Path| {
        if let Some(d) = blobs.digest_of_path(p) {
            v.push((what, d));
        }
    };
    add("kernel", &spec.kernel);
    if let Some(i) = &spec.initrd {
        add("initrd", i);
    }
    for d in &spec.disks {
        add("disk", &d.path);
        if let Some(base) = &d.base {
            add("root volume's base", base);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks_keys_and_policy() {
        let key = vme_image::sign::SecretKey::generate()
            .unwrap()
            .public()
            .to_string();
        let c = ImageConfig::new(Some(1 << 20), true, std::slice::from_ref(&key)).unwrap();
        assert_eq!(c.max_blob, 1 << 20);
        assert!(c.policy(None).require_signed);
        assert_eq!(c.policy(Some(("any-project", false))).trusted.len(), 1);
        // A project may ask for signatures where the daemon does not; the refusal names it.
        let open = ImageConfig::new(None, false, std::slice::from_ref(&key)).unwrap();
        assert!(!open.policy(Some(("acme", false))).require_signed);
        let strict = open.policy(Some(("acme", true)));
        assert!(strict.require_signed && strict.required_by.contains("project \"acme\""));
        let e = ImageConfig::new(None, false, &["ed25519:beef".into()]).unwrap_err();
        assert!(e.contains("trusted_keys") && e.contains("keygen"), "{e}");
        let e = ImageConfig::new(None, true, &[]).unwrap_err();
        assert!(e.contains("trusted_keys is empty"), "{e}");
        assert_eq!(
            ImageConfig::new(None, false, &[]).unwrap(),
            ImageConfig::default()
        );
    }
}
