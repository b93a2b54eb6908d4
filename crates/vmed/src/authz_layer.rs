//! The access-control middleware: every request passes it before it is routed. It finds
//! who is asking ([`crate::authn::identify`]), the route's permission and the object it
//! acts on, asks the one policy function ([`crate::authz::decide`]), and records the
//! decision as [`RequestFacts`] in the response for the audit log.

use crate::api::App;
use crate::authn::{Peer, hex, identify, random};
use crate::authz::Need::Read;
use crate::authz::Object::{Alias, Collection, Image, Operation, Token, Vm};
use crate::authz::{Actor, Authz, Denial, Object, Perm, Target, decide, percent_decode, route};
use crate::daemon::Daemon;
use crate::names::{pick_image, pick_vm};
use crate::request_facts::RequestFacts;
use crate::store::StoreError;
use axum::extract::Request;
use axum::http::{StatusCode, Uri};
use axum::middleware::Next;
use axum::response::Response;
use std::collections::HashMap;
use std::sync::Arc;

/// What a request acts on, as the middleware found it.
struct Found {
    target: Target,
    /// Its name in the audit log (`vm/PROJECT/NAME`).
    object: String,
    label: Option<String>,
    /// The name the handler gets instead of the URL's: the object's internal key (see
    /// `store::VmId`), or for a missing object a fresh ghost name, so that a name the
    /// caller cannot resolve never reaches an object of another project.
    route_as: Option<RouteAs>,
    /// The project the object was found in (the request's, when it names one).
    project: Option<String>,
}

enum RouteAs {
    Key(String),
    Ghost,
}

impl Found {
    fn new(target: Target, object: String, label: Option<String>) -> Found {
        Found {
            target,
            object,
            label,
            route_as: None,
            project: None,
        }
    }
}

/// Finds the object a request acts on. Err: a name that needs a project to say which.
fn resolve(
    d: &Daemon,
    actor: &Arc<Actor>,
    perm: &Perm,
    params: &HashMap<&str, String>,
    project: Option<&str>,
) -> Result<Found, (StatusCode, String)> {
    let levels = &d.auth.levels;
    let name = params
        .get("name")
        .or(params.get("id"))
        .cloned()
        .unwrap_or_default();
    Ok(match perm.object {
        Object::None => Found::new(Target::None, String::new(), None),
        Collection => Found::new(
            Target::Collection(project.map(String::from)),
            String::new(),
            None,
        ),
        Vm => {
            // A name the API refuses never reaches the handler, which takes keys.
            crate::validate::name(&name).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
            match pick_vm(d, actor, &name, project) {
                Ok(Some(vm)) => Found {
                    target: Target::Object {
                        project: vm.project.clone(),
                        label: levels.stored(&vm.label),
                        public: false,
                    },
                    object: format!("vm/{}/{}", vm.project, vm.name),
                    label: Some(vm.label),
                    route_as: Some(RouteAs::Key(vm.key)),
                    project: Some(vm.project),
                },
                Ok(None) => Found {
                    route_as: Some(RouteAs::Ghost),
                    ..Found::new(Target::Missing, format!("vm/{name}"), None)
                },
                Err(refusal) => return Err(refusal),
            }
        }
        Image | Alias => {
            vme_image::manifest::check_name(&name).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
            match pick_image(d, actor, &name, project, perm.object == Alias) {
                Ok(Some((by, im))) => Found {
                    target: Target::Object {
                        project: im.project.clone(),
                        label: levels.stored(&im.label),
                        public: im.public,
                    },
                    object: format!("image/{}/{}", im.project, im.name),
                    label: Some(im.label),
                    route_as: Some(RouteAs::Key(by)),
                    project: Some(im.project),
                },
                Ok(None) => Found {
                    route_as: Some(RouteAs::Ghost),
                    ..Found::new(Target::Missing, format!("image/{name}"), None)
                },
                Err(refusal) => return Err(refusal),
            }
        }
        Operation => {
            let vm = d.ops.get(&name).map(|op| op.view().vm_key);
            match vm.map(|v| d.store().get(&v)) {
                Some(Ok(vm)) => Found::new(
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
                    Some((project, label)) => Found::new(
                        Target::Object {
                            project,
                            label,
                            public: false,
                        },
                        format!("operation/{name}"),
                        None,
                    ),
                    None => Found::new(
                        Target::OwnedBy("root".into()),
                        format!("operation/{name}"),
                        None,
                    ),
                },
                None => Found::new(Target::Missing, format!("operation/{name}"), None),
            }
        }
        Token => match d.store().token_get(&name) {
            Ok(Some(t)) => Found::new(Target::OwnedBy(t.user), format!("token/{name}"), None),
            _ => Found::new(Target::Missing, format!("token/{name}"), None),
        },
    })
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

/// A fresh name no object has.
fn ghost_name() -> String {
    format!("ghost-{}", hex(&random::<8>().unwrap_or([7; 8])))
}

/// The handler's reply about the object keyed `key`: an error's message names the object
/// by its key, which is put back as its name. Other replies show names already.
async fn show_name(r: Response, key: &str, name: &str) -> Response {
    if !r.status().is_client_error() && !r.status().is_server_error() {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return crate::api::error(StatusCode::INTERNAL_SERVER_ERROR, "reply lost".into(), None);
    };
    let text = crate::operations::show_name(&String::from_utf8_lossy(&bytes), key, name);
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(text))
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
        let actor = identify(&d2, token.as_deref(), &peer).map(Arc::new);
        let resolved = match (&actor, found) {
            (Ok(a), Some((perm, params))) => {
                let found = resolve(&d2, a, perm, &params, proj.as_deref());
                let name = params.get("name").or(params.get("id")).cloned();
                Some((perm, found, name))
            }
            _ => None,
        };
        Ok((actor, resolved))
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
    let Some((perm, found, name)) = resolved else {
        // No permission declared for this method and path: never reaches a handler.
        facts.reason = "no such route".into();
        return finish(crate::api::no_route(&method, &path), facts);
    };
    let Found {
        target,
        object,
        label,
        route_as,
        project: found_in,
    } = match found {
        Ok(f) => f,
        Err((code, msg)) => {
            facts.reason = msg.clone();
            return finish(crate::api::error(code, msg, None), facts);
        }
    };
    let (mut target, mut project) = (target, project.or(found_in));
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
            let r = match (route_as, &name) {
                (Some(RouteAs::Key(key)), Some(real)) if key != *real => {
                    match ghost_uri(perm, req.uri(), &key) {
                        Some(uri) => {
                            *req.uri_mut() = uri;
                            show_name(next.run(req).await, &key, real).await
                        }
                        None => not_found(perm, real),
                    }
                }
                (Some(RouteAs::Ghost), Some(real)) => {
                    let ghost = ghost_name();
                    match ghost_uri(perm, req.uri(), &ghost) {
                        Some(uri) => {
                            *req.uri_mut() = uri;
                            unghost(next.run(req).await, &ghost, real).await
                        }
                        None => not_found(perm, real),
                    }
                }
                _ => next.run(req).await,
            };
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
            let ghost = ghost_name();
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
}
