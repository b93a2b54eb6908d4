//! Access control: the daemon as a reference monitor for its own API. Every request passes
//! through one middleware ([`middleware`]), which finds who is asking ([`identify`]), what
//! the route needs ([`PERMISSIONS`], one line per route, keyed by method and route template)
//! and what it acts on, and asks one policy function ([`decide`]). Denied by default: a
//! request whose route is not in the table never reaches a handler, and a test walks the
//! OpenAPI document so that no route is left out. Roles are read from the store at each
//! request, so a change takes effect at the next one.
//!
//! The roles follow VM/370's privilege classes (see docs/access-control.md): `admin` (class
//! A, everything; a user who is admin of any project is admin of the daemon), `operator`
//! (class B: all VMs and images of its projects), `user` (class G: create and use VMs in its
//! projects, within quota) and `auditor` (read-only: VMs' records and usage, metrics, the
//! audit log). Objects of a project the user has no role in, and objects whose label the
//! user's clearance does not dominate, answer 404 exactly as missing ones do.

use crate::api::App;
use crate::daemon::Daemon;
use crate::labels::{Label, Levels};
use crate::request_facts::RequestFacts;
use crate::store::StoreError;
use crate::store_auth::UserRecord;
use axum::extract::Request;
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::Response;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// What a route needs of the user's role in the object's project (or of the user).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Any authenticated user (what it answers is filtered to what the user may see).
    Authenticated,
    /// Read the object: any role in its project (or a public image).
    Read,
    /// Create and use VMs, import images: admin, operator, user.
    Use,
    /// Manage a project's images (delete, sign, alias, publish flag): admin, operator.
    Manage,
    /// The daemon's admin: users, projects, quotas, labels, prune.
    Admin,
    /// The audit log: admin or auditor.
    Audit,
    /// The host's metrics (every VM's figures): admin or auditor.
    Metrics,
}

/// What a route acts on, found from its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    /// Nothing in particular (the daemon, or a collection filtered by the handler).
    None,
    /// The projects' collection: a project is named (`?project=`) or implied.
    Collection,
    /// The VM named by `{name}`.
    Vm,
    /// The image (or alias) named by `{name}`.
    Image,
    /// The image an alias `{name}` points at.
    Alias,
    /// The operation `{id}`, through the VM it acts on.
    Operation,
    /// The token `{id}`: its user's (or an admin's).
    Token,
}

/// One route's permission.
#[derive(Clone, Copy, Debug)]
pub struct Perm {
    pub method: &'static str,
    /// The route template, as in the OpenAPI document.
    pub path: &'static str,
    /// Its name in the audit log, like `vm.start`.
    pub action: &'static str,
    pub need: Need,
    pub object: Object,
}

const fn p(
    method: &'static str,
    path: &'static str,
    action: &'static str,
    need: Need,
    object: Object,
) -> Perm {
    Perm {
        method,
        path,
        action,
        need,
        object,
    }
}

use Need::*;
use Object::{Alias, Collection, Image, Operation, Token, Vm};

/// Every route's permission: one line per route. A route missing here is refused (and the
/// `every_route_has_a_permission` test fails).
pub const PERMISSIONS: &[Perm] = &[
    p("GET", "/1.0", "daemon.info", Authenticated, Object::None),
    p(
        "GET",
        "/1.0/openapi.json",
        "daemon.openapi",
        Authenticated,
        Object::None,
    ),
    p("GET", "/1.0/metrics", "metrics.read", Metrics, Object::None),
    p(
        "GET",
        "/1.0/events",
        "event.read",
        Authenticated,
        Object::None,
    ),
    p("GET", "/1.0/vms", "vm.list", Read, Collection),
    p("POST", "/1.0/vms", "vm.create", Use, Collection),
    p("GET", "/1.0/vms/{name}", "vm.get", Read, Vm),
    p("DELETE", "/1.0/vms/{name}", "vm.delete", Use, Vm),
    p("PUT", "/1.0/vms/{name}/state", "vm.state", Use, Vm),
    p("GET", "/1.0/vms/{name}/console", "vm.console", Use, Vm),
    p("GET", "/1.0/vms/{name}/usage", "vm.usage", Read, Vm),
    p("POST", "/1.0/vms/{name}/exec", "vm.exec", Use, Vm),
    p("POST", "/1.0/vms/{name}/publish", "vm.publish", Use, Vm),
    p("PUT", "/1.0/vms/{name}/label", "vm.label", Admin, Vm),
    p(
        "GET",
        "/1.0/operations",
        "operation.list",
        Authenticated,
        Object::None,
    ),
    p(
        "GET",
        "/1.0/operations/{id}",
        "operation.get",
        Read,
        Operation,
    ),
    p(
        "DELETE",
        "/1.0/operations/{id}",
        "operation.cancel",
        Use,
        Operation,
    ),
    p(
        "GET",
        "/1.0/operations/{id}/wait",
        "operation.wait",
        Read,
        Operation,
    ),
    p(
        "GET",
        "/1.0/images",
        "image.list",
        Authenticated,
        Object::None,
    ),
    p("POST", "/1.0/images", "image.import", Use, Collection),
    p("GET", "/1.0/images/{name}", "image.get", Read, Image),
    p(
        "DELETE",
        "/1.0/images/{name}",
        "image.delete",
        Manage,
        Image,
    ),
    p(
        "GET",
        "/1.0/images/{name}/manifest",
        "image.manifest",
        Read,
        Image,
    ),
    p(
        "PUT",
        "/1.0/images/{name}/signature",
        "image.sign",
        Manage,
        Image,
    ),
    p(
        "POST",
        "/1.0/images/{name}/verify",
        "image.verify",
        Manage,
        Image,
    ),
    p(
        "GET",
        "/1.0/images/{name}/export",
        "image.export",
        Read,
        Image,
    ),
    p(
        "PUT",
        "/1.0/images/{name}/access",
        "image.access",
        Manage,
        Image,
    ),
    p(
        "POST",
        "/1.0/images/aliases",
        "image.alias",
        Manage,
        Collection,
    ),
    p(
        "DELETE",
        "/1.0/images/aliases/{name}",
        "image.unalias",
        Manage,
        Alias,
    ),
    p(
        "POST",
        "/1.0/images/prune",
        "image.prune",
        Admin,
        Object::None,
    ),
    p(
        "GET",
        "/1.0/whoami",
        "self.info",
        Authenticated,
        Object::None,
    ),
    p("GET", "/1.0/users", "user.list", Admin, Object::None),
    p("POST", "/1.0/users", "user.create", Admin, Object::None),
    p(
        "PUT",
        "/1.0/users/{name}",
        "user.update",
        Admin,
        Object::None,
    ),
    p(
        "DELETE",
        "/1.0/users/{name}",
        "user.delete",
        Admin,
        Object::None,
    ),
    p(
        "PUT",
        "/1.0/users/{name}/role",
        "user.role",
        Admin,
        Object::None,
    ),
    p(
        "GET",
        "/1.0/projects",
        "project.list",
        Authenticated,
        Object::None,
    ),
    p(
        "POST",
        "/1.0/projects",
        "project.create",
        Admin,
        Object::None,
    ),
    p(
        "PUT",
        "/1.0/projects/{name}",
        "project.update",
        Admin,
        Object::None,
    ),
    p(
        "DELETE",
        "/1.0/projects/{name}",
        "project.delete",
        Admin,
        Object::None,
    ),
    p(
        "GET",
        "/1.0/tokens",
        "token.list",
        Authenticated,
        Object::None,
    ),
    p(
        "POST",
        "/1.0/tokens",
        "token.create",
        Authenticated,
        Object::None,
    ),
    p(
        "DELETE",
        "/1.0/tokens/{id}",
        "token.revoke",
        Authenticated,
        Token,
    ),
];

/// A role in a project.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Auditor,
    User,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "operator" => Role::Operator,
            "user" => Role::User,
            "auditor" => Role::Auditor,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::User => "user",
            Role::Auditor => "auditor",
        }
    }

    /// Whether this role, in an object's project, meets `need`.
    pub fn allows(self, need: Need) -> bool {
        match need {
            Authenticated | Read => true,
            Use => self >= Role::User,
            Manage => self >= Role::Operator,
            Admin => self == Role::Admin,
            Audit | Metrics => matches!(self, Role::Admin | Role::Auditor),
        }
    }
}

/// The authenticated user, as read from the store for this request.
#[derive(Clone, Debug)]
pub struct Actor {
    pub name: String,
    pub clearance: Label,
    /// Its role in each project.
    pub roles: BTreeMap<String, Role>,
}

impl Actor {
    fn from_record(u: &UserRecord, levels: &Levels) -> Actor {
        Actor {
            name: u.name.clone(),
            clearance: levels.stored(&u.clearance),
            roles: u
                .roles
                .iter()
                .filter_map(|m| Some((m.project.clone(), Role::parse(&m.role)?)))
                .collect(),
        }
    }

    /// Admin of any project is the daemon's admin (class A is system-wide).
    pub fn is_admin(&self) -> bool {
        self.roles.values().any(|r| *r == Role::Admin)
    }

    fn is_auditor(&self) -> bool {
        self.roles.values().any(|r| *r == Role::Auditor)
    }

    /// Its role in `project` (an admin has the admin role everywhere).
    pub fn role_in(&self, project: &str) -> Option<Role> {
        if self.is_admin() {
            return Some(Role::Admin);
        }
        self.roles.get(project).copied()
    }
}

/// What a request acts on, as the policy sees it.
#[derive(Clone, Debug)]
pub enum Target {
    /// Nothing in particular.
    None,
    /// A named object that does not exist: the handler answers 404 itself.
    Missing,
    /// An object of a project.
    Object {
        project: String,
        label: Label,
        /// A public image (readable from every project).
        public: bool,
    },
    /// A token, which belongs to a user.
    OwnedBy(String),
    /// A collection in `project` (None: every project the user has a role in).
    Collection(Option<String>),
}

/// Why a request is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// No identity (401), with how to get one.
    Unauthenticated(String),
    /// The object's existence is not disclosed: the same 404 as a missing one.
    Hidden(String),
    /// Allowed to know, not to do (403).
    Forbidden(String),
}

/// The policy: may `actor` do `perm` on `target`, asking within `project` (the request's
/// `?project=`, if any)? The one function every request's decision comes from.
pub fn decide(
    actor: Option<&Actor>,
    perm: &Perm,
    target: &Target,
    project: Option<&str>,
) -> Result<(), Denial> {
    let Some(actor) = actor else {
        return Err(Denial::Unauthenticated(String::new()));
    };
    let global = match perm.need {
        Admin => Some(actor.is_admin()),
        Audit | Metrics => Some(actor.is_admin() || actor.is_auditor()),
        _ => None,
    };
    if global == Some(false) {
        return Err(Denial::Forbidden(format!(
            "{} needs the {} role; user {:?} has {}",
            perm.action,
            if perm.need == Admin {
                "admin"
            } else {
                "admin or auditor"
            },
            actor.name,
            describe_roles(actor)
        )));
    }
    match target {
        Target::None | Target::Missing => Ok(()),
        Target::OwnedBy(user) => {
            if actor.is_admin() || *user == actor.name {
                Ok(())
            } else {
                Err(Denial::Hidden("another user's".into()))
            }
        }
        Target::Object {
            project: owner,
            label,
            public,
        } => {
            if project.is_some_and(|p| p != owner) {
                return Err(Denial::Hidden("in another project".into()));
            }
            if !actor.clearance.dominates(label) {
                return Err(Denial::Hidden("label above the user's clearance".into()));
            }
            match actor.role_in(owner) {
                None if *public && matches!(perm.need, Read | Authenticated) => Ok(()),
                None if *public => Err(Denial::Forbidden(format!(
                    "{} is not allowed on another project's public image: it is read-only \
                     outside project {owner:?}",
                    perm.action
                ))),
                None => Err(Denial::Hidden(
                    "in a project the user has no role in".into(),
                )),
                Some(r) if global.is_some() || r.allows(perm.need) => Ok(()),
                Some(r) => Err(Denial::Forbidden(format!(
                    "{} needs a role of {} in project {owner:?}; user {:?} is {} there",
                    perm.action,
                    needed(perm.need),
                    actor.name,
                    r.as_str()
                ))),
            }
        }
        Target::Collection(None) => {
            if perm.need == Read || global.is_some() || !actor.roles.is_empty() {
                Ok(())
            } else {
                Err(Denial::Forbidden(format!(
                    "user {:?} has no role in any project: an admin gives one with `vme role \
                     set`",
                    actor.name
                )))
            }
        }
        Target::Collection(Some(p)) => match actor.role_in(p) {
            None => Err(Denial::Hidden(format!("no project {p:?}"))),
            Some(r) if global.is_some() || r.allows(perm.need) => Ok(()),
            Some(r) => Err(Denial::Forbidden(format!(
                "{} needs a role of {} in project {p:?}; user {:?} is {} there",
                perm.action,
                needed(perm.need),
                actor.name,
                r.as_str()
            ))),
        },
    }
}

fn needed(n: Need) -> &'static str {
    match n {
        Use => "user, operator or admin",
        Manage => "operator or admin",
        Admin => "admin",
        Audit | Metrics => "auditor or admin",
        Authenticated | Read => "any",
    }
}

fn describe_roles(a: &Actor) -> String {
    if a.roles.is_empty() {
        return "no role".into();
    }
    a.roles
        .iter()
        .map(|(p, r)| format!("{} in {p}", r.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The permission of a request: the table's line whose method and template match (the one
/// with the most literal segments, so `/1.0/images/aliases` beats `/1.0/images/{name}`),
/// with the template's parameters.
pub fn route(
    method: &Method,
    path: &str,
) -> Option<(&'static Perm, HashMap<&'static str, String>)> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let mut best: Option<(usize, &'static Perm, HashMap<&'static str, String>)> = None;
    for perm in PERMISSIONS.iter().filter(|p| p.method == method.as_str()) {
        let tsegs: Vec<&str> = perm.path.split('/').collect();
        if tsegs.len() != segs.len() {
            continue;
        }
        let mut params = HashMap::new();
        let mut literal = 0;
        let fits = tsegs.iter().zip(&segs).all(|(t, s)| {
            if let Some(name) = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                params.insert(name, percent_decode(s));
                !s.is_empty()
            } else {
                literal += 1;
                t == s
            }
        });
        if fits && best.as_ref().is_none_or(|(l, ..)| literal > *l) {
            best = Some((literal, perm, params));
        }
    }
    best.map(|(_, p, params)| (p, params))
}

fn percent_decode(s: &str) -> String {
    let q = crate::api::query(Some(format!("x={s}")));
    q.get("x").cloned().unwrap_or_default()
}

/// Where a request came from, inserted by the server for each connection: the Unix
/// socket's peer uid (SO_PEERCRED) or the TLS client's address and certificate.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub uid: Option<u32>,
    pub cert: Option<String>,
    /// `unix:uid=N` or `tcp:ADDR:PORT`.
    pub source: String,
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, tokio::net::UnixListener>,
    > for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Peer {
        let uid = stream.io().peer_cred().ok().map(|c| c.uid());
        Peer {
            uid,
            cert: None,
            source: match uid {
                Some(u) => format!("unix:uid={u}"),
                None => "unix:uid=unknown".into(),
            },
        }
    }
}

/// The request's access-control context, for handlers that filter what they list or
/// check an object named in the body.
#[derive(Clone, Debug)]
pub struct Authz {
    pub actor: Arc<Actor>,
    /// The project the request names (`?project=`), or the one it implies.
    pub project: Option<String>,
    pub levels: Levels,
}

impl Authz {
    /// Whether the user may see an object of `project` labelled `label`.
    pub fn sees(&self, project: &str, label: &str, public: bool) -> bool {
        let target = Target::Object {
            project: project.into(),
            label: self.levels.stored(label),
            public,
        };
        decide(Some(&self.actor), &READ, &target, self.project.as_deref()).is_ok()
    }

    /// Whether the user may see VM `name` (for operations and events, which name a VM).
    pub fn sees_vm(&self, d: &Daemon, name: &str) -> bool {
        match d.store().get(name) {
            Ok(vm) => self.sees(&vm.project, &vm.label, false),
            // A deleted VM's operations and events: only for the admin.
            Err(_) => self.actor.is_admin(),
        }
    }

    /// Whether the user may see operation `op` on VM `vm` (which may not exist yet).
    pub fn sees_op(&self, d: &Daemon, op: &str, vm: &str) -> bool {
        if d.store().get(vm).is_ok() {
            return self.sees_vm(d, vm);
        }
        match d.auth.op(op) {
            Some((project, label)) => {
                let target = Target::Object {
                    project,
                    label,
                    public: false,
                };
                decide(Some(&self.actor), &READ, &target, self.project.as_deref()).is_ok()
            }
            None => self.actor.is_admin(),
        }
    }

    /// The project a new object goes to: the one named, else the user's only project,
    /// else `default` if the user has a role there.
    pub fn target_project(&self) -> Result<String, String> {
        if let Some(p) = &self.project {
            return Ok(p.clone());
        }
        let mut own = self.actor.roles.keys();
        match (own.next(), own.next()) {
            (Some(p), None) => Ok(p.clone()),
            _ if self.actor.roles.contains_key("default") || self.actor.is_admin() => {
                Ok("default".into())
            }
            (None, _) => Err(format!(
                "user {:?} has no role in any project: an admin gives one with `vme role set`",
                self.actor.name
            )),
            _ => Err(format!(
                "user {:?} has roles in several projects ({}): name one with --project",
                self.actor.name,
                self.actor
                    .roles
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

const READ: Perm = p("GET", "", "read", Read, Object::None);

/// The in-memory part of access control: the label levels and the tokens already checked
/// (argon2 is slow by design; a token's revocation and expiry are still read from the
/// store at every request, only the hash check is remembered).
#[derive(Default)]
pub struct AuthState {
    pub levels: Levels,
    verified: Mutex<HashMap<String, [u8; 32]>>,
    /// The project and label of each async operation's request, for the operations whose
    /// VM does not exist (yet, or any more): a create is waited on before its VM exists.
    op_scope: Mutex<HashMap<String, (String, Label)>>,
}

/// Operations remembered in [`AuthState`] at most (they expire from the daemon within
/// minutes; past this many the oldest scopes are forgotten, leaving those to the admin).
const OP_SCOPES: usize = 4096;

impl AuthState {
    fn remember_op(&self, id: &str, project: String, label: Label) {
        let mut m = crate::daemon::lock(&self.op_scope);
        if m.len() >= OP_SCOPES {
            m.clear();
        }
        m.insert(id.to_string(), (project, label));
    }

    fn op(&self, id: &str) -> Option<(String, Label)> {
        crate::daemon::lock(&self.op_scope).get(id).cloned()
    }
}

impl AuthState {
    pub fn new(levels: Levels) -> AuthState {
        AuthState {
            levels,
            verified: Mutex::default(),
            op_scope: Mutex::default(),
        }
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Random bytes from the OS.
pub fn random<const N: usize>() -> Result<[u8; N], String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A new token: (id, the secret token text shown once, the argon2 hash to store).
pub fn new_token() -> Result<(String, String, String), String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let id = hex(&random::<8>()?);
    let secret = hex(&random::<32>()?);
    let salt = SaltString::encode_b64(&random::<16>()?).map_err(|e| e.to_string())?;
    let hash = argon2::Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map_err(|e| format!("cannot hash the token: {e}"))?
        .to_string();
    Ok((id.clone(), format!("vme_{id}_{secret}"), hash))
}

/// Who is asking: the bearer token if one is shown (it takes precedence), else the
/// certificate's user (HTTPS), else the Unix peer's uid. Err: a message for the 401.
pub fn identify(d: &Daemon, token: Option<&str>, peer: &Peer) -> Result<Actor, String> {
    let levels = &d.auth.levels;
    let how = "authenticate with a token: `vme --token TOKEN ...` or VME_TOKEN=TOKEN (an admin \
               makes one with `vme token create USER`), or have an admin map your uid to a \
               user (`vme user add NAME --uid UID ...`)";
    if let Some(t) = token {
        let bad = || format!("the token is not valid (unknown, revoked or expired): {how}");
        let (id, secret) = t
            .strip_prefix("vme_")
            .and_then(|r| r.split_once('_'))
            .ok_or_else(bad)?;
        let rec = d.store().token_get(id).map_err(|e| e.to_string())?;
        let rec = rec.ok_or_else(bad)?;
        if rec.revoked_at.is_some() {
            return Err(format!("token {id} was revoked: {how}"));
        }
        if rec.expires_at.is_some_and(|e| e <= crate::store::now()) {
            return Err(format!("token {id} has expired: {how}"));
        }
        let fp = sha256(secret.as_bytes());
        let known = crate::daemon::lock(&d.auth.verified).get(id) == Some(&fp);
        if !known {
            use argon2::password_hash::{PasswordHash, PasswordVerifier};
            let ok = PasswordHash::new(&rec.hash).is_ok_and(|h| {
                argon2::Argon2::default()
                    .verify_password(secret.as_bytes(), &h)
                    .is_ok()
            });
            if !ok {
                return Err(bad());
            }
            crate::daemon::lock(&d.auth.verified).insert(id.to_string(), fp);
        }
        let user = d.store().user_get(&rec.user).map_err(|e| e.to_string())?;
        return user.map(|u| Actor::from_record(&u, levels)).ok_or_else(bad);
    }
    if let Some(fp) = &peer.cert {
        let user = d.store().user_by_cert(fp).map_err(|e| e.to_string())?;
        // A trusted certificate bound to no user acts as root, as before access control:
        // binding it (`vme user set NAME --cert FP`) is what limits it.
        let user = match user {
            Some(u) => Some(u),
            None => d.store().user_by_uid(0).map_err(|e| e.to_string())?,
        };
        return user
            .map(|u| Actor::from_record(&u, levels))
            .ok_or_else(|| format!("this certificate is bound to no user: {how}"));
    }
    match peer.uid {
        Some(uid) => {
            let user = d.store().user_by_uid(uid).map_err(|e| e.to_string())?;
            user.map(|u| Actor::from_record(&u, levels))
                .ok_or_else(|| format!("not authenticated: uid {uid} is mapped to no user; {how}"))
        }
        None => Err(format!("not authenticated: {how}")),
    }
}

/// Finds the object a request acts on, and the name its 404 uses.
fn resolve(
    d: &Daemon,
    perm: &Perm,
    params: &HashMap<&str, String>,
    project: Option<&str>,
) -> (Target, String, Option<String>) {
    let levels = &d.auth.levels;
    let name = params
        .get("name")
        .or(params.get("id"))
        .cloned()
        .unwrap_or_default();
    match perm.object {
        Object::None => (Target::None, String::new(), None),
        Collection => (
            Target::Collection(project.map(String::from)),
            String::new(),
            None,
        ),
        Vm => match d.store().get(&name) {
            Ok(vm) => (
                Target::Object {
                    project: vm.project.clone(),
                    label: levels.stored(&vm.label),
                    public: false,
                },
                format!("vm/{}/{name}", vm.project),
                Some(vm.label),
            ),
            Err(_) => (Target::Missing, format!("vm/{name}"), None),
        },
        Image | Alias => match d.store().image_get(&name) {
            Ok(im) => (
                Target::Object {
                    project: im.project.clone(),
                    label: levels.stored(&im.label),
                    public: im.public,
                },
                format!("image/{}/{}", im.project, im.name),
                Some(im.label),
            ),
            Err(_) => (Target::Missing, format!("image/{name}"), None),
        },
        Operation => {
            let vm = d.ops.get(&name).and_then(|op| {
                let v = op.view();
                let url = v.resources["vms"][0].as_str()?.to_string();
                url.strip_prefix("/1.0/vms/").map(String::from)
            });
            match vm.map(|v| d.store().get(&v)) {
                Some(Ok(vm)) => (
                    Target::Object {
                        project: vm.project.clone(),
                        label: levels.stored(&vm.label),
                        public: false,
                    },
                    format!("operation/{name}"),
                    Some(vm.label),
                ),
                // An operation whose VM does not exist (not yet, or no more): in the scope
                // of the request that began it, else the admin's only.
                Some(Err(_)) => match d.auth.op(&name) {
                    Some((project, label)) => (
                        Target::Object {
                            project,
                            label,
                            public: false,
                        },
                        format!("operation/{name}"),
                        None,
                    ),
                    None => (
                        Target::OwnedBy("root".into()),
                        format!("operation/{name}"),
                        None,
                    ),
                },
                None => (Target::Missing, format!("operation/{name}"), None),
            }
        }
        Token => match d.store().token_get(&name) {
            Ok(Some(t)) => (Target::OwnedBy(t.user), format!("token/{name}"), None),
            _ => (Target::Missing, format!("token/{name}"), None),
        },
    }
}

/// The 404 a hidden object answers: word for word the one a missing object gets.
fn not_found(perm: &Perm, name: &str) -> Response {
    let msg = match perm.object {
        Vm => StoreError::NotFound(name.into()).to_string(),
        Image | Alias => StoreError::NoImage(name.into()).to_string(),
        Operation => return crate::api::no_operation(name),
        Token => format!("no token {name:?}: see `vme token list`"),
        Collection => format!(
            "no project {name:?}: see `vme project list` (a project you have no role in \
             is not shown)"
        ),
        Object::None => "not found".into(),
    };
    crate::api::error(StatusCode::NOT_FOUND, msg, None)
}

/// The request's URI with its object's name (the template's `{name}` or `{id}`) replaced
/// by `ghost`.
fn ghost_uri(perm: &Perm, uri: &Uri, ghost: &str) -> Option<Uri> {
    let tsegs: Vec<&str> = perm.path.split('/').collect();
    let segs: Vec<&str> = uri.path().trim_end_matches('/').split('/').collect();
    if tsegs.len() != segs.len() {
        return None;
    }
    let path: Vec<&str> = tsegs
        .iter()
        .zip(&segs)
        .map(|(t, s)| if t.starts_with('{') { ghost } else { s })
        .collect();
    let pq = match uri.query() {
        Some(q) => format!("{}?{q}", path.join("/")),
        None => path.join("/"),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// The handler's reply about the ghost, with the real name put back.
async fn unghost(r: Response, ghost: &str, real: &str) -> Response {
    let (mut parts, body) = r.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return crate::api::error(StatusCode::NOT_FOUND, "not found".into(), None);
    };
    let text = String::from_utf8_lossy(&bytes).replace(ghost, real);
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(text))
}

/// Removes `project=` from the query (the handlers do not know it) and returns it.
fn take_project(uri: &Uri) -> (Option<String>, Option<Uri>) {
    let Some(q) = uri.query() else {
        return (None, None);
    };
    let mut project = None;
    let rest: Vec<&str> = q
        .split('&')
        .filter(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            if k == "project" {
                project = Some(percent_decode(v));
                false
            } else {
                true
            }
        })
        .collect();
    if project.is_none() {
        return (None, None);
    }
    let pq = if rest.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), rest.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = pq.parse().ok();
    (
        project.filter(|p| !p.is_empty()),
        Uri::from_parts(parts).ok(),
    )
}

/// The middleware every request passes: identify, find the route's permission and the
/// object, decide, and record the decision ([`RequestFacts`]) in the response.
pub async fn middleware(
    axum::extract::State(d): axum::extract::State<App>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map(|c| c.0.clone())
        .or_else(|| req.extensions().get::<Peer>().cloned())
        .unwrap_or_default();
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let (project, uri) = take_project(req.uri());
    if let Some(uri) = uri {
        *req.uri_mut() = uri;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let found = route(&method, &path);
    let action = found.as_ref().map(|(p, _)| p.action.to_string());
    let d2 = Arc::clone(&d);
    let proj = project.clone();
    let (actor, resolved) = crate::api::blocking(move || {
        let actor = identify(&d2, token.as_deref(), &peer);
        let resolved = match (&actor, found) {
            (Ok(_), Some((perm, params))) => {
                let (target, object, label) = resolve(&d2, perm, &params, proj.as_deref());
                let name = params.get("name").or(params.get("id")).cloned();
                Some((perm, target, object, label, name))
            }
            _ => None,
        };
        Ok((actor.map(Arc::new), resolved))
    })
    .await
    .unwrap_or_else(|e| (Err(e.to_string()), None));
    let source = req
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map(|c| c.0.source.clone())
        .or_else(|| req.extensions().get::<Peer>().map(|p| p.source.clone()))
        .unwrap_or_default();
    let mut facts = RequestFacts {
        actor: actor
            .as_ref()
            .map(|a| a.name.clone())
            .unwrap_or_else(|_| "anonymous".into()),
        project: project.clone(),
        action: action.unwrap_or_default(),
        source,
        ..RequestFacts::default()
    };
    let finish = |mut r: Response, facts: RequestFacts| {
        r.extensions_mut().insert(facts);
        r
    };
    let actor = match actor {
        Ok(a) => a,
        Err(msg) => {
            facts.reason = msg.clone();
            let r = crate::api::error(StatusCode::UNAUTHORIZED, msg, None);
            return finish(r, facts);
        }
    };
    let Some((perm, target, object, label, name)) = resolved else {
        // No permission declared for this method and path: never reaches a handler.
        facts.reason = "no such route".into();
        return finish(crate::api::no_route(&method, &path), facts);
    };
    let (mut target, mut project) = (target, project);
    if let (Target::Collection(None), true) = (&target, perm.need != Read) {
        // A new object goes to a project: the one named, or the user's only one.
        let ctx = Authz {
            actor: Arc::clone(&actor),
            project: None,
            levels: d.auth.levels.clone(),
        };
        match ctx.target_project() {
            Ok(p) => {
                target = Target::Collection(Some(p.clone()));
                project = Some(p);
            }
            Err(msg) => {
                facts.reason = msg.clone();
                return finish(crate::api::error(StatusCode::BAD_REQUEST, msg, None), facts);
            }
        }
    }
    facts.project = project.clone();
    facts.object = object;
    facts.label = label;
    if let Target::Object { project: p, .. } = &target {
        facts.project = Some(p.clone());
    }
    match decide(Some(&actor), perm, &target, project.as_deref()) {
        Ok(()) => {
            facts.allowed = true;
            let clearance = actor.clearance.clone();
            req.extensions_mut().insert(Authz {
                actor,
                project,
                levels: d.auth.levels.clone(),
            });
            let r = next.run(req).await;
            // An async operation: remember whose it is, at the requester's clearance.
            let op = r
                .headers()
                .get(axum::http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| l.strip_prefix("/1.0/operations/"));
            if let (StatusCode::ACCEPTED, Some(id), Some(p)) = (r.status(), op, &facts.project) {
                d.auth.remember_op(id, p.clone(), clearance);
            }
            finish(r, facts)
        }
        Err(Denial::Hidden(why)) => {
            facts.reason = format!("hidden: {why}");
            let Some(real) = name else {
                return finish(not_found(perm, &project.unwrap_or_default()), facts);
            };
            // The handler answers for an object that does not exist (a fresh random name),
            // so a hidden object gets, word for word and in the same order of checks,
            // what a missing one would.
            let ghost = format!("ghost-{}", hex(&random::<8>().unwrap_or([7; 8])));
            match ghost_uri(perm, req.uri(), &ghost) {
                Some(uri) => {
                    *req.uri_mut() = uri;
                    req.extensions_mut().insert(Authz {
                        actor,
                        project,
                        levels: d.auth.levels.clone(),
                    });
                    let r = unghost(next.run(req).await, &ghost, &real).await;
                    finish(r, facts)
                }
                None => finish(not_found(perm, &real), facts),
            }
        }
        Err(Denial::Forbidden(why)) => {
            facts.reason = why.clone();
            finish(crate::api::error(StatusCode::FORBIDDEN, why, None), facts)
        }
        Err(Denial::Unauthenticated(why)) => {
            facts.reason = why.clone();
            finish(
                crate::api::error(StatusCode::UNAUTHORIZED, why, None),
                facts,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(roles: &[(&str, Role)], clearance: &str) -> Actor {
        Actor {
            name: "a".into(),
            clearance: Levels::default().parse(clearance).unwrap(),
            roles: roles.iter().map(|(p, r)| (p.to_string(), *r)).collect(),
        }
    }

    fn perm(method: &str, path: &str) -> &'static Perm {
        route(&method.parse().unwrap(), path).unwrap().0
    }

    fn obj(project: &str, label: &str) -> Target {
        Target::Object {
            project: project.into(),
            label: Levels::default().parse(label).unwrap(),
            public: false,
        }
    }

    #[test]
    fn routes_match_templates_preferring_literals() {
        let (p, params) = route(&Method::GET, "/1.0/vms/web").unwrap();
        assert_eq!((p.action, params["name"].as_str()), ("vm.get", "web"));
        assert_eq!(perm("POST", "/1.0/images/aliases").action, "image.alias");
        assert_eq!(
            perm("DELETE", "/1.0/images/aliases/x").action,
            "image.unalias"
        );
        assert!(route(&Method::PATCH, "/1.0/vms/web").is_none());
        assert!(route(&Method::GET, "/1.0/nothing").is_none());
    }

    #[test]
    fn the_policy() {
        let get = perm("GET", "/1.0/vms/x");
        let start = perm("PUT", "/1.0/vms/x/state");
        let user = actor(&[("acme", Role::User)], "secret");
        assert!(decide(None, get, &obj("acme", "unclassified"), None).is_err());
        assert!(decide(Some(&user), start, &obj("acme", "secret"), None).is_ok());
        assert!(matches!(
            decide(Some(&user), get, &obj("other", "unclassified"), None),
            Err(Denial::Hidden(_))
        ));
        assert!(matches!(
            decide(Some(&user), get, &obj("acme", "topsecret"), None),
            Err(Denial::Hidden(_))
        ));
        assert!(matches!(
            decide(
                Some(&user),
                get,
                &obj("acme", "unclassified"),
                Some("other")
            ),
            Err(Denial::Hidden(_))
        ));
        let auditor = actor(&[("acme", Role::Auditor)], "topsecret");
        assert!(decide(Some(&auditor), get, &obj("acme", "secret"), None).is_ok());
        assert!(matches!(
            decide(Some(&auditor), start, &obj("acme", "secret"), None),
            Err(Denial::Forbidden(_))
        ));
        let users = perm("GET", "/1.0/users");
        assert!(matches!(
            decide(Some(&user), users, &Target::None, None),
            Err(Denial::Forbidden(_))
        ));
        let admin = actor(&[("default", Role::Admin)], "topsecret");
        assert!(decide(Some(&admin), users, &Target::None, None).is_ok());
        assert!(decide(Some(&admin), start, &obj("acme", "secret"), None).is_ok());
    }

    #[test]
    fn the_project_query_is_taken_out() {
        let uri: Uri = "/1.0/vms?async=true&project=acme".parse().unwrap();
        let (p, u) = take_project(&uri);
        assert_eq!(p.as_deref(), Some("acme"));
        assert_eq!(u.unwrap().to_string(), "/1.0/vms?async=true");
        let uri: Uri = "/1.0/vms?project=a%20b".parse().unwrap();
        let (p, u) = take_project(&uri);
        assert_eq!(
            (p.as_deref(), u.unwrap().to_string().as_str()),
            (Some("a b"), "/1.0/vms")
        );
        assert_eq!(take_project(&"/1.0/vms?x=1".parse().unwrap()).0, None);
    }

    #[test]
    fn every_route_has_a_permission() {
        let doc = serde_json::to_value(crate::api::openapi()).unwrap();
        let mut seen = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                let m: Method = method.to_uppercase().parse().unwrap();
                let line = PERMISSIONS
                    .iter()
                    .find(|p| p.method == m.as_str() && p.path == path);
                assert!(
                    line.is_some(),
                    "{method} {path} declares no permission in authz::PERMISSIONS"
                );
                seen += 1;
            }
        }
        assert_eq!(
            seen,
            PERMISSIONS.len(),
            "the table has lines for routes that do not exist"
        );
    }
}
