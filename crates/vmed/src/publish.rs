//! `POST /1.0/vms/{name}/publish`: a stopped VM becomes an image. Its root volume (its
//! first disk; an overlay is flattened onto its base) is copied, scrubbed of what made it
//! that machine (see [`crate::scrub`]), and stored with the VM's kernel and initrd as a new
//! image; the VM itself is not changed.

use crate::daemon::{Daemon, OpError, lock};
use crate::images::ROOT_VOLUME;
use crate::scrub::{self, Scrubbed};
use crate::store::StoreError;
use crate::store_images::ImageRecord;
use serde::Serialize;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use vme_image::manifest::{Amount, Boot, Resources, check_name};
use vme_image::{BlobRef, Digest, Hasher, Manifest, Role};

/// What a publish made and what it scrubbed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PublishReport {
    pub image: ImageRecord,
    /// Each scrub item: `emptied`, `removed` or `absent`.
    pub scrubbed: Vec<Scrubbed>,
}

fn failed(e: impl std::fmt::Display) -> OpError {
    OpError::Failed(e.to_string())
}

impl Daemon {
    /// Publishes stopped VM `vm` as image `image`.
    pub fn publish(&self, vm: &str, image: &str) -> Result<PublishReport, OpError> {
        crate::validate::key(vm).map_err(OpError::BadRequest)?;
        check_name(image).map_err(OpError::BadRequest)?;
        // Busy: nobody starts the VM while its volume is copied.
        let _busy = self.begin(vm, "publish")?;
        let record = self.store().get(vm)?;
        if record.state.has_monitor() {
            return Err(OpError::Conflict(format!(
                "VM {vm:?} is {}: stop it first (`vme stop {vm}`), then publish",
                record.state.as_str()
            )));
        }
        // Image names are per project: the image goes to the VM's.
        let taken = self.store().image_find(image)?;
        if taken.iter().any(|(_, im)| im.project == record.project) {
            return Err(StoreError::ImageExists(image.into()).into());
        }
        let spec = &record.spec;
        let Some(root) = spec.disks.first() else {
            return Err(OpError::BadRequest(format!(
                "VM {vm:?} has no disk: an image is published from a VM's root volume (its \
                 first disk)"
            )));
        };
        let blobs = self.blobs()?;
        // Prune and delete wait meanwhile: the blobs written here belong to no image yet.
        let _g = lock(&self.image_lock);
        let work = self.config().state_dir.join("images").join("tmp");
        std::fs::create_dir_all(&work).map_err(failed)?;
        let volume = work.join(format!("publish-{vm}-{}.raw", std::process::id()));
        let result = (|| {
            match &root.base {
                Some(base) => {
                    vme_api::overlay::flatten(&root.path, base, &volume).map_err(failed)?;
                }
                None => {
                    std::fs::copy(&root.path, &volume).map_err(|e| {
                        failed(format!(
                            "cannot copy VM {vm:?}'s volume {}: {e}",
                            root.path.display()
                        ))
                    })?;
                }
            }
            let scrubbed = scrub::scrub_ext4(&volume).map_err(|e| match e {
                scrub::ScrubError::NotExt => {
                    OpError::BadRequest(format!("VM {vm:?}'s root volume: {e}"))
                }
                e => failed(e),
            })?;
            let mut refs = Vec::new();
            let mut add = |role, path: &Path| -> Result<(), OpError> {
                let (digest, size) = hash(path)?;
                let mut f = File::open(path).map_err(failed)?;
                blobs
                    .ingest(&mut f, &digest, size, &mut |_| {})
                    .map_err(failed)?;
                refs.push(BlobRef {
                    role,
                    sha256: digest,
                    size,
                    source: None,
                });
                Ok(())
            };
            add(Role::Kernel, &spec.kernel)?;
            if let Some(initrd) = &spec.initrd {
                add(Role::Initrd, initrd)?;
            }
            add(Role::Disk, &volume)?;
            // The label names the VM as users know it, not by its key.
            let from = &record.name;
            let manifest = self.manifest_for(from, image, spec, refs, &blobs, root.base.as_deref());
            let bytes = manifest.to_bytes();
            manifest
                .check(self.config().images.max_blob)
                .map_err(|e| failed(format!("the published image's manifest: {e}")))?;
            // The image belongs to the VM's project and carries its label.
            let image = {
                let mut store = self.store();
                let im = store.image_insert(&record.project, image, &bytes, None)?;
                store.image_set_access(&im.key, &record.project, false, &record.label)?;
                store.image_get(&im.key)?
            };
            Ok(PublishReport { image, scrubbed })
        })();
        let _ = std::fs::remove_file(&volume);
        result
    }

    /// The new image's manifest: what the VM was made from (the image whose disk its volume
    /// sits on, if any) for its OS and resources, else the VM's own.
    fn manifest_for(
        &self,
        vm: &str,
        image: &str,
        spec: &vme_api::MachineSpec,
        blobs: Vec<BlobRef>,
        store: &vme_image::blobs::BlobStore,
        base: Option<&Path>,
    ) -> Manifest {
        let base_digest = base.and_then(|b| store.digest_of_path(b));
        let source = base_digest.and_then(|d| {
            let images = self.store().image_list().ok()?;
            images
                .into_iter()
                .find(|i| i.manifest.blob(Role::Disk).is_some_and(|b| b.sha256 == d))
        });
        let own = Amount {
            vcpus: spec.vcpus,
            memory: spec.memory,
        };
        let (os, version, resources, mut labels) = match source {
            Some(s) => (
                s.manifest.os,
                s.manifest.version,
                s.manifest.resources,
                s.manifest.labels,
            ),
            None => (
                "linux".to_string(),
                "1".to_string(),
                Resources {
                    default: own,
                    minimum: own,
                },
                Default::default(),
            ),
        };
        labels.insert("published-from".into(), vm.into());
        Manifest {
            schema_version: 1,
            name: image.into(),
            os,
            version,
            architecture: spec.arch,
            boot: Boot::Direct {
                cmdline: spec.cmdline.clone(),
            },
            resources,
            labels,
            blobs,
        }
    }
}

/// A file's SHA-256 and size.
fn hash(path: &Path) -> Result<(Digest, u64), OpError> {
    let fail = |e: std::io::Error| failed(format!("cannot read {}: {e}", path.display()));
    let mut f = File::open(path).map_err(fail)?;
    let mut h = Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(fail)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((h.finish(), size))
}

/// The root volume a VM made from an image has (for the tests and the docs).
pub fn root_volume(state_dir: &Path, vm: &str) -> PathBuf {
    crate::daemon::vm_dir(state_dir, vm).join(ROOT_VOLUME)
}
