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

use crate::daemon::Daemon;
use crate::labels::{Label, Levels};
use crate::store_auth::UserRecord;
use axum::http::Method;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub use crate::authn::{AuthState, Peer, identify, new_token};
pub use crate::authz_layer::middleware;

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
#[rustfmt::skip]
pub const PERMISSIONS: &[Perm] = &[
    p("GET", "/1.0", "daemon.info", Authenticated, Object::None),
    p("GET", "/1.0/openapi.json", "daemon.openapi", Authenticated, Object::None),
    p("GET", "/1.0/metrics", "metrics.read", Metrics, Object::None),
    p("GET", "/1.0/events", "event.read", Authenticated, Object::None),
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
    p("GET", "/1.0/operations", "operation.list", Authenticated, Object::None),
    p("GET", "/1.0/operations/{id}", "operation.get", Read, Operation),
    p("DELETE", "/1.0/operations/{id}", "operation.cancel", Use, Operation),
    p("GET", "/1.0/operations/{id}/wait", "operation.wait", Read, Operation),
    p("GET", "/1.0/images", "image.list", Authenticated, Object::None),
    p("POST", "/1.0/images", "image.import", Use, Collection),
    p("GET", "/1.0/images/{name}", "image.get", Read, Image),
    p("DELETE", "/1.0/images/{name}", "image.delete", Manage, Image),
    p("GET", "/1.0/images/{name}/manifest", "image.manifest", Read, Image),
    p("PUT", "/1.0/images/{name}/signature", "image.sign", Manage, Image),
    p("POST", "/1.0/images/{name}/verify", "image.verify", Manage, Image),
    p("GET", "/1.0/images/{name}/export", "image.export", Read, Image),
    p("PUT", "/1.0/images/{name}/access", "image.access", Manage, Image),
    p("POST", "/1.0/images/aliases", "image.alias", Manage, Collection),
    p("DELETE", "/1.0/images/aliases/{name}", "image.unalias", Manage, Alias),
    p("POST", "/1.0/images/prune", "image.prune", Admin, Object::None),
    p("GET", "/1.0/whoami", "self.info", Authenticated, Object::None),
    p("GET", "/1.0/users", "user.list", Admin, Object::None),
    p("POST", "/1.0/users", "user.create", Admin, Object::None),
    p("PUT", "/1.0/users/{name}", "user.update", Admin, Object::None),
    p("DELETE", "/1.0/users/{name}", "user.delete", Admin, Object::None),
    p("PUT", "/1.0/users/{name}/role", "user.role", Admin, Object::None),
    p("GET", "/1.0/projects", "project.list", Authenticated, Object::None),
    p("POST", "/1.0/projects", "project.create", Admin, Object::None),
    p("PUT", "/1.0/projects/{name}", "project.update", Admin, Object::None),
    p("DELETE", "/1.0/projects/{name}", "project.delete", Admin, Object::None),
    p("GET", "/1.0/tokens", "token.list", Authenticated, Object::None),
    p("POST", "/1.0/tokens", "token.create", Authenticated, Object::None),
    p("DELETE", "/1.0/tokens/{id}", "token.revoke", Authenticated, Token),
    p("GET", "/1.0/audit", "audit.read", Audit, Object::None),
    p("GET", "/1.0/audit/verify", "audit.verify", Audit, Object::None),
    p("GET", "/1.0/audit/export", "audit.export", Audit, Object::None),
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
    pub(crate) fn from_record(u: &UserRecord, levels: &Levels) -> Actor {
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

pub(crate) fn percent_decode(s: &str) -> String {
    let q = crate::api::query(Some(format!("x={s}")));
    q.get("x").cloned().unwrap_or_default()
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

    /// Whether the user may see the VM keyed `name` (for operations and events, which name
    /// a VM).
    pub fn sees_vm(&self, d: &Daemon, name: &str) -> bool {
        match d.store().get(name) {
            Ok(vm) => self.sees(&vm.project, &vm.label, false),
            // A deleted VM's operations and events: only for the admin.
            Err(_) => self.actor.is_admin(),
        }
    }

    /// Whether the user may see operation `op` on the VM keyed `vm` (which may not exist
    /// yet).
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
