//! How a name in a request finds its object, now that VM, image and alias names are unique
//! per project (docs/access-control.md, "Names and how a name is resolved"). The daemon
//! works with internal keys (`store::VmId`, `store_images::image_key`); the access-control
//! middleware resolves a route's `{name}` here and hands the handler the key, and a create
//! resolves the image it launches here. Objects the caller may not see are never chosen and
//! never named in an error.

use crate::authz::{Actor, Authz};
use crate::daemon::{Daemon, OpError};
use crate::store::{StoreError, VmRecord};
use crate::store_images::ImageRecord;
use axum::http::StatusCode;
use std::sync::Arc;

/// A store that cannot answer: 500, with its reason.
fn internal(e: StoreError) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Several objects of that name the caller may see: 409, saying to name the project.
fn conflict(msg: String) -> (StatusCode, String) {
    (StatusCode::CONFLICT, msg)
}

/// Which VM `{name}` means (docs/access-control.md, "Names"): see [`pick`]. None: no VM of
/// that name the caller may see.
pub(crate) fn pick_vm(
    d: &Daemon,
    actor: &Arc<Actor>,
    name: &str,
    project: Option<&str>,
) -> Result<Option<VmRecord>, (StatusCode, String)> {
    let found = d.store().find(name).map_err(internal)?;
    pick(d, actor, found, project, |v| (&v.project, &v.label, false)).map_err(|projects| {
        conflict(format!(
            "there is a VM named {name:?} in several projects ({projects}): say which with \
             --project P (?project=P in the API)"
        ))
    })
}

/// Which image (or, for `aliases_only`, which alias) `{name}` means, by the rules of
/// [`pick`]; public images of other projects count as ones the caller may see. With the
/// key that named it (the image's or the alias's).
pub(crate) fn pick_image(
    d: &Daemon,
    actor: &Arc<Actor>,
    name: &str,
    project: Option<&str>,
    aliases_only: bool,
) -> Result<Option<(String, ImageRecord)>, (StatusCode, String)> {
    let found: Vec<(String, ImageRecord)> = d
        .store()
        .image_find(name)
        .map_err(internal)?
        .into_iter()
        .filter(|(by, im)| !aliases_only || *by != im.key)
        .collect();
    pick(d, actor, found, project, |(_, im)| {
        (im.project.as_str(), im.label.as_str(), im.public)
    })
    .map_err(|projects| {
        conflict(format!(
            "there is an image named {name:?} in several projects ({projects}): say which \
             with --project P (?project=P in the API)"
        ))
    })
}

/// The rules every `{name}` follows, over the objects `found` of that name in any project
/// (`facts`: an object's project, label and whether it is public): the one of the project
/// the request names; else the one of the caller's default project; else the only one in
/// the projects the caller may see. Several it may see: Err with their projects (only
/// those), for the 409.
fn pick<T>(
    d: &Daemon,
    actor: &Arc<Actor>,
    found: Vec<T>,
    project: Option<&str>,
    facts: impl Fn(&T) -> (&str, &str, bool),
) -> Result<Option<T>, String> {
    if let Some(p) = project {
        return Ok(found.into_iter().find(|t| facts(t).0 == p));
    }
    let ctx = Authz {
        actor: Arc::clone(actor),
        project: None,
        levels: d.auth.levels.clone(),
    };
    let mut visible: Vec<T> = found
        .into_iter()
        .filter(|t| {
            let (project, label, public) = facts(t);
            ctx.sees(project, label, public)
        })
        .collect();
    if let Ok(own) = ctx.target_project() {
        if let Some(i) = visible.iter().position(|t| facts(t).0 == own) {
            return Ok(Some(visible.swap_remove(i)));
        }
    }
    if visible.len() > 1 {
        let projects: Vec<&str> = visible.iter().map(|t| facts(t).0).collect();
        return Err(projects.join(", "));
    }
    Ok(visible.pop())
}

impl Daemon {
    /// The image `name` launches in `project`, among those `sees` lets through:
    /// `PROJECT/NAME` names another project's public image; else the project's own image
    /// (or alias) of that name, else the one public image of that name. Several public
    /// ones: an error that lists their projects.
    pub(crate) fn image_for(
        &self,
        project: &str,
        name: &str,
        sees: &dyn Fn(&ImageRecord) -> bool,
    ) -> Result<ImageRecord, OpError> {
        let (from, short) = match name.split_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, name),
        };
        let mut usable: Vec<ImageRecord> = self
            .store()
            .image_find(short)?
            .into_iter()
            .map(|(_, im)| im)
            .filter(|im| (im.project == project || im.public) && sees(im))
            .collect();
        usable.dedup_by(|a, b| a.key == b.key);
        let none = || OpError::from(StoreError::NoImage(name.into()));
        if let Some(p) = from {
            return usable
                .into_iter()
                .find(|im| im.project == p)
                .ok_or_else(none);
        }
        if let Some(i) = usable.iter().position(|im| im.project == project) {
            return Ok(usable.swap_remove(i));
        }
        if usable.len() > 1 {
            let projects: Vec<&str> = usable.iter().map(|im| im.project.as_str()).collect();
            return Err(OpError::Conflict(format!(
                "image {short:?} is public in several projects ({}): name one as PROJECT/NAME, \
                 like {}/{short}",
                projects.join(", "),
                projects[0]
            )));
        }
        usable.pop().ok_or_else(none)
    }
}
