//! The checks on a request that need its user and the object it names in its body: a
//! VM's creation (its project, label, image and host paths), the project's quota, and the
//! images an alias request names.

use crate::authz::Authz;
use crate::authz_api::{bad, no_project};
use crate::daemon::{Daemon, OpError};
use crate::store::{Store, StoreError};
use crate::validate::CreateVm;
use serde::Serialize;
use utoipa::ToSchema;

/// What a project's VMs use: VMs, vCPUs, memory and disk bytes.
#[derive(Serialize, ToSchema, Default, Clone, Copy, Debug)]
pub struct Usage {
    pub vms: u64,
    pub vcpus: u64,
    pub memory: u64,
    pub disk: u64,
}

/// Bytes a VM's disks take: an overlay counts its base (what the guest sees).
fn disk_bytes(spec: &vme_api::MachineSpec) -> u64 {
    let len = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    spec.disks
        .iter()
        .map(|d| len(&d.path).max(d.base.as_deref().map(len).unwrap_or(0)))
        .sum()
}

pub(crate) fn usage(store: &dyn Store, project: &str) -> Result<Usage, StoreError> {
    let mut u = Usage::default();
    for vm in store.list()?.iter().filter(|v| v.project == project) {
        u.vms += 1;
        u.vcpus += u64::from(vm.spec.vcpus);
        u.memory += vm.spec.memory.bytes();
        u.disk += disk_bytes(&vm.spec);
    }
    Ok(u)
}

/// Whether `project` has room for one more VM with `spec` (and `extra_disk` bytes of root
/// volume not made yet): a 403 naming the numbers if not.
pub(crate) fn check_quota(
    store: &dyn Store,
    project: &str,
    spec: &vme_api::MachineSpec,
    extra_disk: u64,
) -> Result<(), OpError> {
    let Some(p) = store.project_get(project)? else {
        return Err(no_project(project));
    };
    let u = usage(store, project)?;
    let want = Usage {
        vms: 1,
        vcpus: u64::from(spec.vcpus),
        memory: spec.memory.bytes(),
        disk: disk_bytes(spec) + extra_disk,
    };
    let q = &p.quota;
    let checks = [
        ("VMs", q.vms, u.vms, want.vms),
        ("vCPUs", q.vcpus, u.vcpus, want.vcpus),
        ("memory bytes", q.memory, u.memory, want.memory),
        ("disk bytes", q.disk, u.disk, want.disk),
    ];
    for (what, limit, used, more) in checks {
        if let Some(limit) = limit
            && used + more > limit
        {
            return Err(OpError::Forbidden(format!(
                "quota exceeded: project {project:?} may have {limit} {what}, has {used} in use \
                 and this VM needs {more}; delete VMs or ask an admin to raise the quota (`vme \
                 project set {project} --quota ...`)"
            )));
        }
    }
    Ok(())
}

impl Authz {
    /// Whether the user may manage the image keyed `key`, named `name` (Err: the 404 a
    /// missing image gets, or a 403); Ok when there is no such image (the caller's own
    /// lookup answers that).
    pub(crate) fn manages_image(&self, d: &Daemon, key: &str, name: &str) -> Result<(), OpError> {
        let Ok(im) = d.store().image_get(key) else {
            return Ok(());
        };
        let target = crate::authz::Target::Object {
            project: im.project.clone(),
            label: self.levels.stored(&im.label),
            public: im.public,
        };
        let perm = crate::authz::route(&axum::http::Method::DELETE, "/1.0/images/x")
            .map(|(p, _)| p)
            .ok_or_else(|| OpError::Failed("the permission table lacks image.delete".into()))?;
        match crate::authz::decide(Some(&self.actor), perm, &target, self.project.as_deref()) {
            Ok(()) => Ok(()),
            Err(crate::authz::Denial::Forbidden(m)) => Err(OpError::Forbidden(m)),
            Err(_) => Err(StoreError::NoImage(name.into()).into()),
        }
    }
}

/// The checks on a VM's creation that need the user: the project it goes to, its label
/// (within the user's clearance, dominating its image's), its image (public or the
/// project's own), and host paths and tap names (kernel, initrd, disks, nics[].tap: admin
/// only). Returns the request with its project and label set.
pub(crate) fn admit_create(d: &Daemon, a: &Authz, mut req: CreateVm) -> Result<CreateVm, OpError> {
    let project = a.target_project().map_err(bad)?;
    let levels = &a.levels;
    let label = match &req.label {
        Some(l) => levels.parse(l).map_err(bad)?,
        None => levels.lowest(),
    };
    if !a.actor.clearance.dominates(&label) {
        return Err(OpError::Forbidden(format!(
            "label {} is above your clearance ({}): choose a lower label",
            levels.show(&label),
            levels.show(&a.actor.clearance)
        )));
    }
    let host_paths = req.kernel.is_some() || req.initrd.is_some() || !req.disks.is_empty();
    if host_paths && !a.actor.is_admin() {
        return Err(OpError::Forbidden(
            "kernel, initrd and disk paths name the host's files: only an admin may give them; \
             create the VM from an image (--image) instead"
                .into(),
        ));
    }
    // A tap name is the host's (or another VM's) interface: only the daemon picks them for
    // users, inside their project's network (crate::network).
    if req.nics.iter().any(|n| n.tap.is_some()) && !a.actor.is_admin() {
        return Err(OpError::Forbidden(
            "nics[].tap names a host network interface: only an admin may choose one; leave \
             it out and the daemon gives the NIC a tap on your project's network"
                .into(),
        ));
    }
    if let Some(name) = req.image.clone() {
        // Resolved here, as the user sees images, and named exactly (PROJECT/NAME) for the
        // create that follows.
        let clearance = &a.actor.clearance;
        let im = d.image_for(&project, &name, &|im| {
            clearance.dominates(&levels.stored(&im.label))
        })?;
        req.image = Some(format!("{}/{}", im.project, im.name));
        let il = levels.stored(&im.label);
        if !label.dominates(&il) {
            return Err(OpError::Forbidden(format!(
                "a VM labelled {} cannot boot image {name:?} labelled {}: the VM's label must \
                 dominate the image's (no read up); give the VM a higher label",
                levels.show(&label),
                levels.show(&il)
            )));
        }
    }
    req.project = Some(project);
    req.label = Some(levels.show(&label));
    Ok(req)
}
