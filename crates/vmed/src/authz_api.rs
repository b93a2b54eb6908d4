//! The access-control routes (users, projects, roles, tokens, labels) and the checks on a
//! VM's creation that need the request's user: its project, its quota, its label against
//! the user's clearance and the image's, and host paths (admin only).
//!
//! | route | |
//! | --- | --- |
//! | `GET /1.0/whoami` | the user the request authenticated as |
//! | `GET /1.0/users`, `POST /1.0/users` | users (admin) |
//! | `PUT /1.0/users/{name}`, `DELETE /1.0/users/{name}` | clearance, uid, certificate; remove |
//! | `PUT /1.0/users/{name}/role` | a user's role in a project (`none` removes it) |
//! | `GET /1.0/projects`, `POST /1.0/projects` | projects (the user's; admin: all), create |
//! | `PUT /1.0/projects/{name}`, `DELETE /1.0/projects/{name}` | quota; remove (when empty) |
//! | `GET /1.0/tokens`, `POST /1.0/tokens` | tokens (the user's; admin: all); a new one, shown once |
//! | `DELETE /1.0/tokens/{id}` | revoke (at once) |
//! | `PUT /1.0/vms/{name}/label` | a VM's label (admin) |
//! | `PUT /1.0/images/{name}/access` | an image's public flag (operator) and label (admin) |

use crate::api::{App, Empty, ErrorReply, Reply, blocking, ok, parse};
use crate::authz::{Authz, Role};
use crate::authz_checks::{Usage, usage};
use crate::daemon::OpError;
use crate::store::StoreError;
use crate::store_auth::{ProjectRecord, Quota, TokenRecord, UserChange, UserRecord};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(crate) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(whoami))
        .routes(routes!(user_list, user_create))
        .routes(routes!(user_update, user_delete))
        .routes(routes!(user_role))
        .routes(routes!(project_list, project_create))
        .routes(routes!(project_update, project_delete))
        .routes(routes!(token_list, token_create))
        .routes(routes!(token_revoke))
        .routes(routes!(vm_label))
        .routes(routes!(image_access))
}

pub(crate) fn bad(e: String) -> OpError {
    OpError::BadRequest(e)
}

/// A user or project name: the same rules as a VM's.
fn check_name(n: &str, what: &str) -> Result<(), OpError> {
    crate::validate::name(n).map_err(|e| bad(e.replacen("VM name", &format!("{what} name"), 1)))
}

fn no_user(name: &str) -> OpError {
    OpError::Store(StoreError::Refused(format!(
        "no user named {name:?}: see `vme user list`"
    )))
}

pub(crate) fn no_project(name: &str) -> OpError {
    OpError::Store(StoreError::Refused(format!(
        "no project named {name:?}: see `vme project list`"
    )))
}

fn check_role(role: &str) -> Result<(), OpError> {
    Role::parse(role).map(|_| ()).ok_or_else(|| {
        bad(format!(
            "unknown role {role:?}: use admin, operator, user or auditor"
        ))
    })
}

/// The user the request authenticated as.
#[derive(Serialize, ToSchema)]
struct WhoAmI {
    name: String,
    clearance: String,
    /// Its role in each project.
    roles: Vec<crate::store_auth::Membership>,
    /// Admin of the daemon (admin of any project).
    admin: bool,
}

#[utoipa::path(get, path = "/1.0/whoami", tag = "access",
    responses((status = 200, description = "Who the request authenticated as",
        body = Reply<WhoAmI>)))]
async fn whoami(Extension(a): Extension<Authz>) -> Response {
    let roles = a
        .actor
        .roles
        .iter()
        .map(|(p, r)| crate::store_auth::Membership {
            project: p.clone(),
            role: r.as_str().into(),
        })
        .collect();
    ok(
        StatusCode::OK,
        WhoAmI {
            name: a.actor.name.clone(),
            clearance: a.levels.show(&a.actor.clearance),
            roles,
            admin: a.actor.is_admin(),
        },
    )
}

#[utoipa::path(get, path = "/1.0/users", tag = "access",
    responses((status = 200, description = "Every user", body = Reply<Vec<UserRecord>>)))]
async fn user_list(State(d): State<App>) -> Result<Response, OpError> {
    let users = blocking(move || Ok(d.store().user_list()?)).await?;
    Ok(ok(StatusCode::OK, users))
}

/// The body of `POST /1.0/users`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    /// A project to give it a role in, with `role`.
    #[serde(default)]
    project: Option<String>,
    /// admin, operator, user or auditor (default user, with `project`).
    #[serde(default)]
    role: Option<String>,
    /// Its clearance (default: the lowest level).
    #[serde(default)]
    clearance: Option<String>,
    /// A local uid that authenticates as this user on the Unix socket.
    #[serde(default)]
    uid: Option<u32>,
    /// The SHA-256 fingerprint of a TLS client certificate that authenticates as it.
    #[serde(default)]
    cert: Option<String>,
}

#[utoipa::path(post, path = "/1.0/users", tag = "access", request_body = NewUser,
    responses(
        (status = 201, description = "Created", body = Reply<UserRecord>),
        (status = 400, description = "A bad name, role or label", body = ErrorReply),
        (status = 409, description = "The name, uid or certificate is taken, or the project \
            does not exist", body = ErrorReply)))]
async fn user_create(State(d): State<App>, body: Bytes) -> Result<Response, OpError> {
    let req: NewUser = parse(&body)?;
    check_name(&req.name, "user")?;
    let levels = d.auth.levels.clone();
    let clearance = match &req.clearance {
        Some(c) => levels.show(&levels.parse(c).map_err(bad)?),
        None => levels.show(&levels.lowest()),
    };
    if let Some(r) = &req.role {
        check_role(r)?;
    }
    let user = blocking(move || {
        let mut s = d.store();
        if let Some(p) = &req.project
            && s.project_get(p)?.is_none()
        {
            return Err(no_project(p));
        }
        s.user_create(&req.name, &clearance)?;
        let change = UserChange {
            clearance: None,
            uid: req.uid.map(Some),
            cert: req.cert.clone().map(Some),
        };
        let done = s
            .user_update(&req.name, &change)
            .and_then(|()| match &req.project {
                Some(p) => s.role_set(&req.name, p, Some(req.role.as_deref().unwrap_or("user"))),
                None => Ok(()),
            });
        if let Err(e) = done {
            let _ = s.user_delete(&req.name);
            return Err(e.into());
        }
        s.user_get(&req.name)?.ok_or_else(|| no_user(&req.name))
    })
    .await?;
    Ok(ok(StatusCode::CREATED, user))
}

/// The body of `PUT /1.0/users/{name}`: the fields to change (`null` removes a uid or
/// certificate).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct UserUpdate {
    #[serde(default)]
    clearance: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<u32>)]
    uid: Option<Value>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    cert: Option<Value>,
}

#[utoipa::path(put, path = "/1.0/users/{name}", tag = "access",
    params(("name" = String, Path, description = "The user")),
    request_body = UserUpdate,
    responses(
        (status = 200, description = "The user after the change", body = Reply<UserRecord>),
        (status = 400, description = "A bad label, uid or fingerprint", body = ErrorReply),
        (status = 409, description = "No such user, or the uid or certificate is another's",
            body = ErrorReply)))]
async fn user_update(
    State(d): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, OpError> {
    let req: UserUpdate = parse(&body)?;
    let levels = d.auth.levels.clone();
    let clearance = req
        .clearance
        .map(|c| levels.parse(&c).map(|l| levels.show(&l)))
        .transpose()
        .map_err(bad)?;
    let uid = match req.uid {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => Some(Some(
            v.as_u64()
                .and_then(|u| u32::try_from(u).ok())
                .ok_or_else(|| bad(format!("uid {v} is not a uid: give a number or null")))?,
        )),
    };
    let cert = match req.cert {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(s)) => Some(Some(vme_api::tls::normalize_fingerprint(&s).map_err(bad)?)),
        Some(v) => {
            return Err(bad(format!(
                "cert {v} is not a fingerprint: give the SHA-256 in hex, or null"
            )));
        }
    };
    let user = blocking(move || {
        let mut s = d.store();
        if s.user_get(&name)?.is_none() {
            return Err(no_user(&name));
        }
        s.user_update(
            &name,
            &UserChange {
                clearance,
                uid,
                cert,
            },
        )?;
        s.user_get(&name)?.ok_or_else(|| no_user(&name))
    })
    .await?;
    Ok(ok(StatusCode::OK, user))
}

#[utoipa::path(delete, path = "/1.0/users/{name}", tag = "access",
    params(("name" = String, Path, description = "The user")),
    responses(
        (status = 200, description = "Removed, with its tokens", body = Reply<Empty>),
        (status = 409, description = "No such user, or root (the bootstrap admin)",
            body = ErrorReply)))]
async fn user_delete(State(d): State<App>, Path(name): Path<String>) -> Result<Response, OpError> {
    blocking(move || {
        if name == "root" {
            return Err(OpError::Store(StoreError::Refused(
                "root is the bootstrap admin (uid 0) and cannot be removed".into(),
            )));
        }
        let mut s = d.store();
        if s.user_get(&name)?.is_none() {
            return Err(no_user(&name));
        }
        Ok(s.user_delete(&name)?)
    })
    .await?;
    Ok(ok(StatusCode::OK, Empty {}))
}

/// The body of `PUT /1.0/users/{name}/role`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RoleChange {
    project: String,
    /// admin, operator, user, auditor, or none (removes the user from the project).
    role: String,
}

#[utoipa::path(put, path = "/1.0/users/{name}/role", tag = "access",
    params(("name" = String, Path, description = "The user")),
    request_body = RoleChange,
    responses(
        (status = 200, description = "The user after the change (in force from its next \
            request)", body = Reply<UserRecord>),
        (status = 400, description = "An unknown role", body = ErrorReply),
        (status = 409, description = "No such user or project", body = ErrorReply)))]
async fn user_role(
    State(d): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, OpError> {
    let req: RoleChange = parse(&body)?;
    let role = (req.role != "none").then_some(req.role.clone());
    if let Some(r) = &role {
        check_role(r)?;
    }
    let user = blocking(move || {
        let mut s = d.store();
        if s.user_get(&name)?.is_none() {
            return Err(no_user(&name));
        }
        if s.project_get(&req.project)?.is_none() {
            return Err(no_project(&req.project));
        }
        s.role_set(&name, &req.project, role.as_deref())?;
        s.user_get(&name)?.ok_or_else(|| no_user(&name))
    })
    .await?;
    Ok(ok(StatusCode::OK, user))
}

/// A project and what its VMs use.
#[derive(Serialize, ToSchema)]
struct ProjectView {
    #[serde(flatten)]
    project: ProjectRecord,
    /// VMs, vCPUs, memory and disk bytes in use.
    usage: Usage,
}

#[utoipa::path(get, path = "/1.0/projects", tag = "access",
    responses((status = 200, description = "The projects the user has a role in (an admin: \
        all), with their quota and usage", body = Reply<Vec<ProjectView>>)))]
async fn project_list(
    State(d): State<App>,
    Extension(a): Extension<Authz>,
) -> Result<Response, OpError> {
    let list = blocking(move || {
        let s = d.store();
        let mut out = Vec::new();
        for p in s.project_list()? {
            if a.actor.role_in(&p.name).is_some() {
                let usage = usage(&**s, &p.name)?;
                out.push(ProjectView { project: p, usage });
            }
        }
        Ok(out)
    })
    .await?;
    Ok(ok(StatusCode::OK, list))
}

/// The body of `POST /1.0/projects`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewProject {
    name: String,
    #[serde(default)]
    quota: Quota,
    /// Launch only images signed by a key the daemon trusts (default false: the daemon's
    /// own `require_signed` applies).
    #[serde(default)]
    require_signed: bool,
}

#[utoipa::path(post, path = "/1.0/projects", tag = "access", request_body = NewProject,
    responses(
        (status = 201, description = "Created", body = Reply<ProjectRecord>),
        (status = 400, description = "A bad name or quota", body = ErrorReply),
        (status = 409, description = "A project of that name exists", body = ErrorReply)))]
async fn project_create(State(d): State<App>, body: Bytes) -> Result<Response, OpError> {
    let req: NewProject = parse(&body)?;
    check_name(&req.name, "project")?;
    let p = blocking(move || {
        Ok(d.store()
            .project_create(&req.name, &req.quota, req.require_signed)?)
    })
    .await?;
    Ok(ok(StatusCode::CREATED, p))
}

/// The body of `PUT /1.0/projects/{name}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ProjectUpdate {
    /// The new quota (replaces the old one; an absent limit is none); absent: unchanged.
    quota: Option<Quota>,
    /// Launch only images signed by a trusted key; absent: unchanged.
    require_signed: Option<bool>,
}

#[utoipa::path(put, path = "/1.0/projects/{name}", tag = "access",
    params(("name" = String, Path, description = "The project")),
    request_body = ProjectUpdate,
    responses(
        (status = 200, description = "The project after the change", body = Reply<ProjectRecord>),
        (status = 409, description = "No such project", body = ErrorReply)))]
async fn project_update(
    State(d): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, OpError> {
    let req: ProjectUpdate = parse(&body)?;
    if req.quota.is_none() && req.require_signed.is_none() {
        return Err(OpError::BadRequest(
            "nothing to change: give quota, require_signed or both".into(),
        ));
    }
    let p = blocking(move || {
        let mut s = d.store();
        if s.project_get(&name)?.is_none() {
            return Err(no_project(&name));
        }
        if let Some(q) = &req.quota {
            s.project_set_quota(&name, q)?;
        }
        if let Some(on) = req.require_signed {
            s.project_set_require_signed(&name, on)?;
        }
        s.project_get(&name)?.ok_or_else(|| no_project(&name))
    })
    .await?;
    Ok(ok(StatusCode::OK, p))
}

#[utoipa::path(delete, path = "/1.0/projects/{name}", tag = "access",
    params(("name" = String, Path, description = "The project")),
    responses(
        (status = 200, description = "Removed (with its members' roles in it)",
            body = Reply<Empty>),
        (status = 409, description = "No such project, `default`, or it still owns VMs or \
            images", body = ErrorReply)))]
async fn project_delete(
    State(d): State<App>,
    Path(name): Path<String>,
) -> Result<Response, OpError> {
    blocking(move || {
        if name == "default" {
            return Err(OpError::Store(StoreError::Refused(
                "the default project cannot be removed".into(),
            )));
        }
        let mut s = d.store();
        if s.project_get(&name)?.is_none() {
            return Err(no_project(&name));
        }
        s.project_delete(&name)?;
        drop(s);
        // Its network, if a crash left one behind (normally gone with its last VM).
        crate::network::release_for(&d, &name, None);
        Ok(())
    })
    .await?;
    Ok(ok(StatusCode::OK, Empty {}))
}

#[utoipa::path(get, path = "/1.0/tokens", tag = "access",
    responses((status = 200, description = "The user's tokens (an admin: all); never their \
        secrets", body = Reply<Vec<TokenRecord>>)))]
async fn token_list(
    State(d): State<App>,
    Extension(a): Extension<Authz>,
) -> Result<Response, OpError> {
    let list = blocking(move || {
        let who = (!a.actor.is_admin()).then(|| a.actor.name.clone());
        Ok(d.store().token_list(who.as_deref())?)
    })
    .await?;
    Ok(ok(StatusCode::OK, list))
}

/// The body of `POST /1.0/tokens`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewToken {
    /// Whose token (default: the requester's; another user's needs admin).
    #[serde(default)]
    user: Option<String>,
    /// Seconds until it expires (default: never).
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A new token: the only time its secret is shown.
#[derive(Serialize, ToSchema)]
struct NewTokenReply {
    id: String,
    user: String,
    /// Give it as `Authorization: Bearer TOKEN` (`vme --token`, VME_TOKEN).
    token: String,
    expires_at: Option<i64>,
}

#[utoipa::path(post, path = "/1.0/tokens", tag = "access", request_body = NewToken,
    responses(
        (status = 201, description = "The token, shown this once", body = Reply<NewTokenReply>),
        (status = 403, description = "Another user's token, asked by a non-admin",
            body = ErrorReply),
        (status = 409, description = "No such user", body = ErrorReply)))]
async fn token_create(
    State(d): State<App>,
    Extension(a): Extension<Authz>,
    body: Bytes,
) -> Result<Response, OpError> {
    let req: NewToken = parse(&body)?;
    let user = req.user.unwrap_or_else(|| a.actor.name.clone());
    if user != a.actor.name && !a.actor.is_admin() {
        return Err(OpError::Forbidden(format!(
            "only an admin may make a token for another user (you are {:?})",
            a.actor.name
        )));
    }
    let expires_at = req
        .expires_in
        .map(|s| crate::store::now().saturating_add(i64::try_from(s).unwrap_or(i64::MAX)));
    let reply = blocking(move || {
        if d.store().user_get(&user)?.is_none() {
            return Err(no_user(&user));
        }
        // Hashing is slow by design: outside the store's lock.
        let (id, token, hash) = crate::authz::new_token().map_err(OpError::Failed)?;
        d.store().token_insert(&id, &user, &hash, expires_at)?;
        Ok(NewTokenReply {
            id,
            user,
            token,
            expires_at,
        })
    })
    .await?;
    Ok(ok(StatusCode::CREATED, reply))
}

#[utoipa::path(delete, path = "/1.0/tokens/{id}", tag = "access",
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 200, description = "Revoked: refused from the next request on",
            body = Reply<Empty>),
        (status = 404, description = "No such token (or another user's)", body = ErrorReply)))]
async fn token_revoke(State(d): State<App>, Path(id): Path<String>) -> Result<Response, OpError> {
    let id2 = id.clone();
    let found = blocking(move || Ok(d.store().token_revoke(&id2)?)).await?;
    if !found {
        let msg = format!("no token {id:?}: see `vme token list`");
        return Ok(crate::api::error(StatusCode::NOT_FOUND, msg, None));
    }
    Ok(ok(StatusCode::OK, Empty {}))
}

/// The body of `PUT /1.0/vms/{name}/label`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LabelChange {
    /// Like `secret` or `secret:nato`.
    label: String,
}

#[utoipa::path(put, path = "/1.0/vms/{name}/label", tag = "access",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = LabelChange,
    responses(
        (status = 200, description = "The VM after the change", body = Reply<crate::store::VmRecord>),
        (status = 400, description = "Not a label", body = ErrorReply),
        (status = 404, description = "No such VM", body = ErrorReply)))]
async fn vm_label(
    State(d): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, OpError> {
    let req: LabelChange = parse(&body)?;
    let levels = &d.auth.levels;
    let label = levels.show(&levels.parse(&req.label).map_err(bad)?);
    let vm = blocking(move || {
        let mut s = d.store();
        s.vm_set_label(&name, &label)?;
        Ok(s.get(&name)?)
    })
    .await?;
    Ok(ok(StatusCode::OK, vm))
}

/// The body of `PUT /1.0/images/{name}/access`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ImageAccess {
    /// Usable by every project.
    #[serde(default)]
    public: Option<bool>,
    /// Its label (admin only).
    #[serde(default)]
    label: Option<String>,
}

#[utoipa::path(put, path = "/1.0/images/{name}/access", tag = "images",
    params(("name" = String, Path, description = "The image's name or an alias")),
    request_body = ImageAccess,
    responses(
        (status = 200, description = "The image after the change",
            body = Reply<crate::store_images::ImageRecord>),
        (status = 400, description = "Not a label", body = ErrorReply),
        (status = 403, description = "A label change by a non-admin", body = ErrorReply),
        (status = 404, description = "No such image", body = ErrorReply)))]
async fn image_access(
    State(d): State<App>,
    Extension(a): Extension<Authz>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, OpError> {
    let req: ImageAccess = parse(&body)?;
    if req.label.is_some() && !a.actor.is_admin() {
        return Err(OpError::Forbidden(
            "only an admin may change an image's label".into(),
        ));
    }
    let levels = d.auth.levels.clone();
    let label = req
        .label
        .map(|l| levels.parse(&l).map(|l| levels.show(&l)))
        .transpose()
        .map_err(bad)?;
    let image = blocking(move || {
        let mut s = d.store();
        let im = s.image_get(&name)?;
        s.image_set_access(
            &im.key,
            &im.project,
            req.public.unwrap_or(im.public),
            label.as_deref().unwrap_or(&im.label),
        )?;
        Ok(s.image_get(&im.key)?)
    })
    .await?;
    Ok(ok(StatusCode::OK, image))
}
