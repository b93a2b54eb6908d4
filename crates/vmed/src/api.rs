//! The REST API, in the shape of Incus. Replies are
//! `{"type":"sync","status":"Success","status_code":200,"metadata":...}`; errors are
//! `{"type":"error","error_code":N,"error":"what went wrong and what to do"}`, and a refused
//! transition (409) adds the VM's state and its allowed actions.
//!
//! | route | |
//! | --- | --- |
//! | `GET /1.0` | the API's version |
//! | `GET /1.0/vms`, `POST /1.0/vms` | list, create |
//! | `GET /1.0/vms/{name}`, `DELETE /1.0/vms/{name}` | one VM, delete it |
//! | `PUT /1.0/vms/{name}/state` | start, stop, pause, resume, restart |
//! | `GET /1.0/vms/{name}/console` | the end of its console output |
//! | `GET /1.0/metrics` | Prometheus text |
//! | `GET /1.0/operations`, `GET /1.0/operations/{id}` | operations (running and recent) |
//! | `GET /1.0/operations/{id}/wait?timeout=SECS` | waits for one to end |
//! | `DELETE /1.0/operations/{id}` | cancel (none can be cancelled yet: 409) |
//! | `GET /1.0/events?type=lifecycle,operation` | the event stream: one JSON object a line |
//! | `GET /1.0/openapi.json` | this API as an OpenAPI 3 document |
//! | `/1.0/images...` | the image repository (see [`crate::images_api`]) |
//! | `GET /1.0/audit`, `/1.0/audit/verify`, `/1.0/audit/export` | the audit log (see [`crate::audit`]) |
//!
//! Long actions (`POST /1.0/vms`, `PUT /1.0/vms/{name}/state`, `DELETE /1.0/vms/{name}`)
//! are operations. By default they answer when done, as a plain sync reply; with
//! `?async=true` they answer `202 {"type":"async","status_code":100,"operation":
//! "/1.0/operations/ID","metadata":{...}}` at once and carry on in the background. Either
//! way a refusal (bad input 400, no such VM 404, a transition the lifecycle does not allow or
//! a busy VM 409) comes before any operation exists, as an error reply.
//!
//! The routes and the OpenAPI document come from the same declarations (utoipa's
//! `#[utoipa::path]` on each handler, collected with `routes!`): a new route must be added
//! that way so that it is documented. `docs/openapi.json` is this document, checked by a test;
//! regenerate it with `vmed --print-openapi > docs/openapi.json`.

use crate::authz::Authz;
use crate::daemon::{Daemon, OpError, Task};
use crate::events::{Event, Kind, LifecycleEvent, rfc3339};
use crate::lifecycle::{self, Action, RestartPolicy};
use crate::operations::Operation;
use crate::store::{StoreError, VmRecord};
use crate::validate::CreateVm;
use axum::Extension;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::sync::broadcast::error::RecvError;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(crate) type App = Arc<Daemon>;

/// Every route the fallback names (a 404 for an unknown path lists them).
const ROUTES: &str = "/1.0/vms, /1.0/vms/NAME, /1.0/vms/NAME/state, /1.0/vms/NAME/console, \
    /1.0/vms/NAME/usage, /1.0/vms/NAME/exec, /1.0/metrics, /1.0/operations, /1.0/operations/ID, \
    /1.0/operations/ID/wait, /1.0/events, /1.0/images, /1.0/images/NAME, \
    /1.0/images/NAME/manifest, /1.0/images/NAME/signature, /1.0/images/NAME/verify, \
    /1.0/images/NAME/export, /1.0/images/NAME/access, /1.0/images/aliases, \
    /1.0/images/aliases/NAME, /1.0/images/prune, /1.0/vms/NAME/label, /1.0/whoami, /1.0/users, \
    /1.0/users/NAME, /1.0/users/NAME/role, /1.0/projects, /1.0/projects/NAME, /1.0/tokens, \
    /1.0/tokens/ID, /1.0/audit, /1.0/audit/verify, /1.0/audit/export and /1.0/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "vmed",
        description = "The vme daemon's REST API, on its Unix socket (default /run/vme/vme.sock). \
            Replies are `{\"type\":\"sync\",...,\"metadata\":...}`, errors \
            `{\"type\":\"error\",\"error_code\":N,\"error\":\"...\"}`. Long actions are \
            operations: add `?async=true` to get one at once (202) instead of the result."
    ),
    components(schemas(LifecycleEvent, Action, RestartPolicy)),
    tags(
        (name = "vms", description = "Virtual machines and their lifecycle"),
        (name = "operations", description = "Long actions, running and recent"),
        (name = "events", description = "The event stream"),
        (name = "images", description = "The image repository"),
        (name = "audit", description = "The audit log: state-changing requests, denials, \
            security events; hash-chained and anchored"),
        (name = "access", description = "Users, projects, roles, tokens and labels"),
        (name = "daemon", description = "The daemon itself")
    )
)]
struct ApiDoc;

/// The routes, with their OpenAPI description.
fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(root))
        .routes(routes!(list, create))
        .routes(routes!(info, delete))
        .routes(routes!(state))
        .routes(routes!(console))
        .routes(routes!(usage))
        .routes(routes!(exec))
        .routes(routes!(metrics))
        .routes(routes!(operations))
        .routes(routes!(operation, cancel))
        .routes(routes!(wait))
        .routes(routes!(events))
        .routes(routes!(openapi_json))
        .merge(crate::images_api::routes())
        .merge(crate::audit::http::routes())
        .merge(crate::authz_api::routes())
}

pub fn router(daemon: App) -> Router {
    let (router, _) = routes().split_for_parts();
    let inner = router
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                format!("no such route: see {ROUTES}"),
                None,
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method: see /1.0/openapi.json".into(),
                None,
            )
        })
        .with_state(daemon.clone());
    // Every request passes the access-control middleware before it is routed (so that it
    // can answer for a hidden object as for a missing one, see crate::authz).
    let policy = axum::middleware::from_fn_with_state(daemon.clone(), crate::authz::middleware);
    // The audit layer last, so outermost: it sees every request's final status and the
    // facts the policy put in the response, its own 401s and 403s included.
    let audit = axum::middleware::from_fn_with_state(daemon, crate::audit::http::layer);
    Router::new()
        .fallback_service(inner)
        .layer(policy)
        .layer(audit)
}

/// The answer to a method and path no route takes: 405 if the path is a route's, else 404
/// naming the routes. The access-control middleware answers it, so that a request with no
/// declared permission never reaches a handler.
pub(crate) fn no_route(method: &axum::http::Method, path: &str) -> Response {
    use axum::http::Method;
    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ];
    if methods
        .iter()
        .any(|m| m != method && crate::authz::route(m, path).is_some())
    {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "this route does not take that method: see /1.0/openapi.json".into(),
            None,
        );
    }
    error(
        StatusCode::NOT_FOUND,
        format!("no such route: see {ROUTES}"),
        None,
    )
}

/// The OpenAPI 3 document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().split_for_parts().1
}

/// [`openapi`] as pretty JSON with a final newline: what `GET /1.0/openapi.json` serves,
/// `vmed --print-openapi` prints and `docs/openapi.json` holds.
pub fn openapi_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let mut t = openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        t.push('\n');
        t
    })
}

/// A sync reply.
#[derive(Serialize, ToSchema)]
pub(crate) struct Reply<T> {
    /// `sync`
    #[serde(rename = "type")]
    kind: &'static str,
    /// `Success`
    status: &'static str,
    /// The HTTP status code.
    status_code: u16,
    metadata: T,
}

/// An error reply.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorReply {
    /// `error`
    #[serde(rename = "type")]
    kind: &'static str,
    /// The HTTP status code.
    error_code: u16,
    /// What went wrong and what to do about it.
    error: String,
    /// For a refused transition (409): `{"state": ..., "allowed_actions": [...]}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
}

/// The reply to a long action asked for with `?async=true` (HTTP 202).
#[derive(Serialize, ToSchema)]
struct AsyncReply {
    /// `async`
    #[serde(rename = "type")]
    kind: &'static str,
    /// `Operation created`
    status: &'static str,
    /// 100
    status_code: u16,
    /// The operation's URL: wait on it with `GET {operation}/wait`.
    operation: String,
    metadata: Operation,
}

#[derive(Serialize, ToSchema)]
struct ApiVersion {
    /// `1.0`
    api_version: &'static str,
}

#[derive(Serialize, ToSchema)]
struct ConsoleLog {
    /// The end of what the VM's serial console printed (empty before its first start).
    log: String,
}

/// An empty object.
#[derive(Serialize, ToSchema)]
pub(crate) struct Empty {}

pub(crate) fn ok<T: Serialize>(code: StatusCode, metadata: T) -> Response {
    let body = Reply {
        kind: "sync",
        status: "Success",
        status_code: code.as_u16(),
        metadata,
    };
    (code, axum::Json(body)).into_response()
}

pub(crate) fn error(code: StatusCode, msg: String, metadata: Option<Value>) -> Response {
    let body = ErrorReply {
        kind: "error",
        error_code: code.as_u16(),
        error: msg,
        metadata,
    };
    (code, axum::Json(body)).into_response()
}

fn accepted(op: Operation) -> Response {
    let url = format!("/1.0/operations/{}", op.id);
    let body = AsyncReply {
        kind: "async",
        status: "Operation created",
        status_code: 100,
        operation: url.clone(),
        metadata: op,
    };
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, url)],
        axum::Json(body),
    )
        .into_response()
}

impl IntoResponse for OpError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        match self {
            OpError::BadRequest(_) => error(StatusCode::BAD_REQUEST, msg, None),
            OpError::Store(StoreError::NotFound(_)) => error(StatusCode::NOT_FOUND, msg, None),
            OpError::Store(StoreError::Exists(_)) | OpError::Busy(_) | OpError::Capacity(_) => {
                error(StatusCode::CONFLICT, msg, None)
            }
            OpError::Illegal(i) => {
                let allowed: Vec<_> = lifecycle::allowed(i.state)
                    .iter()
                    .map(|a| a.as_str())
                    .collect();
                error(
                    StatusCode::CONFLICT,
                    msg,
                    Some(json!({"state": i.state, "allowed_actions": allowed})),
                )
            }
            OpError::NotRunning { state, .. } => {
                error(StatusCode::CONFLICT, msg, Some(json!({ "state": state })))
            }
            OpError::Unavailable(_) => error(StatusCode::SERVICE_UNAVAILABLE, msg, None),
            OpError::Forbidden(_) => error(StatusCode::FORBIDDEN, msg, None),
            OpError::Conflict(_)
            | OpError::Store(StoreError::ImageExists(_) | StoreError::Refused(_)) => {
                error(StatusCode::CONFLICT, msg, None)
            }
            OpError::Store(StoreError::NoImage(_)) => error(StatusCode::NOT_FOUND, msg, None),
            OpError::Store(_) | OpError::Failed(_) => {
                error(StatusCode::INTERNAL_SERVER_ERROR, msg, None)
            }
        }
    }
}

/// Parses a JSON body ourselves rather than with axum's extractor, so that every refusal
/// (bad syntax, unknown fields, wrong types) is a 400 with our JSON error shape.
pub(crate) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, OpError> {
    serde_json::from_slice(body).map_err(|e| {
        OpError::BadRequest(format!(
            "invalid request body: {e}; see the API's documented fields"
        ))
    })
}

/// The query's parameters (percent-decoded), parsed here so a bad one is our JSON 400.
pub(crate) fn query(raw: Option<String>) -> HashMap<String, String> {
    let decode = |s: &str| -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let hex = || std::str::from_utf8(b.get(i + 1..i + 3)?).ok();
            match (b[i], hex().and_then(|h| u8::from_str_radix(h, 16).ok())) {
                (b'%', Some(x)) => {
                    out.push(x);
                    i += 3;
                }
                (b'+', _) => {
                    out.push(b' ');
                    i += 1;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    raw.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// `?async=true`: answer with the operation at once.
fn is_async(q: &HashMap<String, String>) -> Result<bool, OpError> {
    match q.get("async").map(String::as_str) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1" | "") => Ok(true),
        Some(v) => Err(OpError::BadRequest(format!(
            "async={v:?} is not a boolean: use async=true or async=false"
        ))),
    }
}

/// Runs a blocking daemon operation off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(OpError::Failed(format!(
            "the operation failed unexpectedly ({e}); see the daemon's log"
        )))
    })
}

/// Carries out a checked long action: in the background with the operation as the reply
/// (`async`), or now with its result as a `code` reply.
async fn carry_out(task: Task, in_background: bool, code: StatusCode) -> Result<Response, OpError> {
    if in_background {
        let op = task.op.view();
        tokio::task::spawn_blocking(move || {
            let _ = task.run();
        });
        return Ok(accepted(op));
    }
    let v = blocking(move || task.run()).await?;
    Ok(ok(code, v))
}

const NAME: &str = "The VM's name";

#[utoipa::path(get, path = "/1.0", tag = "daemon",
    responses((status = 200, description = "The API's version", body = Reply<ApiVersion>)))]
async fn root() -> Response {
    ok(StatusCode::OK, ApiVersion { api_version: "1.0" })
}

/// Prometheus text format (not the JSON envelope: scrapers expect the bare text).
#[utoipa::path(get, path = "/1.0/metrics", tag = "daemon",
    responses(
        (status = 200, description = "VMs by state, each VM's resources, the host's capacity \
            (Prometheus text format)", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 500, description = "The store failed", body = ErrorReply)))]
async fn metrics(State(d): State<App>) -> Result<Response, OpError> {
    let text = blocking(move || d.metrics()).await?;
    let ctype = "text/plain; version=0.0.4; charset=utf-8";
    Ok(([(header::CONTENT_TYPE, ctype)], text).into_response())
}

/// Every VM, ordered by name.
#[utoipa::path(get, path = "/1.0/vms", tag = "vms",
    responses(
        (status = 200, description = "The VMs", body = Reply<Vec<VmRecord>>),
        (status = 500, description = "The store failed", body = ErrorReply)))]
async fn list(State(d): State<App>, Extension(a): Extension<Authz>) -> Result<Response, OpError> {
    let mut vms = blocking(move || d.list()).await?;
    vms.retain(|v| a.sees(&v.project, &v.label, false));
    Ok(ok(StatusCode::OK, vms))
}

/// Defines a VM (state `defined`; it is not started).
#[utoipa::path(post, path = "/1.0/vms", tag = "vms",
    params(("async" = Option<bool>, Query,
        description = "Answer at once with the operation (202) instead of the VM")),
    request_body = CreateVm,
    responses(
        (status = 201, description = "Created", body = Reply<VmRecord>),
        (status = 202, description = "Accepted (`?async=true`): the operation", body = AsyncReply),
        (status = 400, description = "Invalid request (the message names the field), or \
            the host could never run it", body = ErrorReply),
        (status = 409, description = "A VM of that name exists", body = ErrorReply)))]
async fn create(
    State(d): State<App>,
    Extension(a): Extension<Authz>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<Response, OpError> {
    let background = is_async(&query(q))?;
    let mut req: CreateVm = parse(&body)?;
    let d2 = Arc::clone(&d);
    req = blocking(move || crate::authz_checks::admit_create(&d2, &a, req)).await?;
    let task = blocking(move || d.create_task(req)).await?;
    carry_out(task, background, StatusCode::CREATED).await
}

/// One VM: its state, the reason of its last failure, its spec.
#[utoipa::path(get, path = "/1.0/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = NAME)),
    responses(
        (status = 200, description = "The VM", body = Reply<VmRecord>),
        (status = 400, description = "Not a valid VM name", body = ErrorReply),
        (status = 404, description = "No such VM", body = ErrorReply)))]
async fn info(State(d): State<App>, Path(name): Path<String>) -> Result<Response, OpError> {
    let vm = blocking(move || d.get(&name)).await?;
    Ok(ok(StatusCode::OK, vm))
}

/// Deletes a VM that has no monitor (defined, stopped or crashed), and its files.
#[utoipa::path(delete, path = "/1.0/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = NAME),
        ("async" = Option<bool>, Query, description = "Answer at once with the operation (202)")),
    responses(
        (status = 200, description = "Deleted", body = Reply<Empty>),
        (status = 202, description = "Accepted (`?async=true`): the operation", body = AsyncReply),
        (status = 400, description = "Not a valid VM name", body = ErrorReply),
        (status = 404, description = "No such VM", body = ErrorReply),
        (status = 409, description = "The VM runs (stop it first) or is busy", body = ErrorReply),
        (status = 500, description = "Its files could not be removed", body = ErrorReply)))]
async fn delete(
    State(d): State<App>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, OpError> {
    let background = is_async(&query(q))?;
    let task = blocking(move || d.delete_task(&name)).await?;
    carry_out(task, background, StatusCode::OK).await
}

/// The end of the VM's console output (what its serial port printed); with `?attach=1`
/// and `Upgrade: vme-console`, the console itself, raw both ways (see
/// [`crate::console_attach`]).
#[utoipa::path(get, path = "/1.0/vms/{name}/console", tag = "vms",
    params(("name" = String, Path, description = NAME),
        ("attach" = Option<u8>, Query, description = "1: attach (needs `Connection: upgrade` \
            and `Upgrade: vme-console`); a second client takes the console over")),
    responses(
        (status = 200, description = "The console log's last 64 KiB", body = Reply<ConsoleLog>),
        (status = 101, description = "Attached: raw bytes both ways"),
        (status = 400, description = "A bad query, or attach without the upgrade headers",
            body = ErrorReply),
        (status = 404, description = "No such VM", body = ErrorReply),
        (status = 409, description = "Attach to a VM that is not running", body = ErrorReply),
        (status = 503, description = "The VM's console does not answer", body = ErrorReply)))]
async fn console(
    State(d): State<App>,
    Path(name): Path<String>,
    req: axum::extract::Request,
) -> Result<Response, OpError> {
    if crate::console_attach::wanted(req.uri().query()).map_err(OpError::BadRequest)? {
        return crate::console_attach::attach(d, name, req).await;
    }
    let log = blocking(move || d.console_log(&name)).await?;
    Ok(ok(StatusCode::OK, ConsoleLog { log }))
}

/// The reply of `GET /1.0/vms/{name}/usage`: `name`, `state`, `sample_interval_seconds`,
/// `samples` (oldest first), `totals`, `latest` and `rates` (per second, `cpu_percent`).
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)] // Only its schema is used: the reply is built as JSON.
struct UsageReport(Value);

/// The VM's accounting samples since `since`, with their totals and latest rates.
#[utoipa::path(get, path = "/1.0/vms/{name}/usage", tag = "vms",
    params(("name" = String, Path, description = NAME),
        ("since" = Option<String>, Query,
            description = "Unix seconds or RFC 3339; default: every stored sample")),
    responses(
        (status = 200, description = "Samples (10 s apart by default), totals, latest rates",
            body = Reply<UsageReport>),
        (status = 400, description = "Not a valid VM name, or a bad `since`", body = ErrorReply),
        (status = 404, description = "No such VM", body = ErrorReply)))]
async fn usage(
    State(d): State<App>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, OpError> {
    let mut q = query(q);
    if let Some(k) = q.keys().find(|k| *k != "since") {
        return Err(OpError::BadRequest(format!(
            "unknown query parameter {k:?}: this route takes since=TIME"
        )));
    }
    let since = q.remove("since");
    let v = blocking(move || d.usage(&name, since.as_deref())).await?;
    Ok(ok(StatusCode::OK, v))
}

/// The body of `POST /1.0/vms/{name}/exec`: `command` (program and arguments), optional
/// `env` (object), `timeout_secs` (default 300, 0: none) and `output` (`text` or `base64`).
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)] // Only its schema is used: the body is parsed as ExecRequest.
struct ExecBody(Value);

/// The reply of an exec: `status` (as a shell reports it), `signal`, `timed_out`,
/// `truncated`, `encoding`, `stdout`, `stderr`.
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)] // Only its schema is used.
struct ExecReport(Value);

/// Runs a command in the guest through its agent (see [`crate::guest::ExecRequest`]).
#[utoipa::path(post, path = "/1.0/vms/{name}/exec", tag = "vms",
    params(("name" = String, Path, description = NAME)),
    request_body = ExecBody,
    responses(
        (status = 200, description = "The command ran; its status and output",
            body = Reply<ExecReport>),
        (status = 400, description = "A bad request, or a VM without vsock", body = ErrorReply),
        (status = 404, description = "No such VM", body = ErrorReply),
        (status = 409, description = "The VM is not running", body = ErrorReply),
        (status = 503, description = "The guest agent does not answer", body = ErrorReply)))]
async fn exec(
    State(d): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, OpError> {
    let req: crate::guest::ExecRequest = parse(&body)?;
    let out = blocking(move || d.exec(&name, &req)).await?;
    Ok(ok(StatusCode::OK, out))
}

/// The body of `PUT /1.0/vms/{name}/state`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"action": "stop", "force": false}))]
struct StateChange {
    /// start, stop, pause, resume or restart.
    action: Action,
    /// Stop (or restart) without asking the guest first.
    #[serde(default)]
    force: bool,
}

/// Changes a VM's state. A stop asks the guest first (the ACPI power button) and forces it
/// after the daemon's stop timeout.
#[utoipa::path(put, path = "/1.0/vms/{name}/state", tag = "vms",
    params(("name" = String, Path, description = NAME),
        ("async" = Option<bool>, Query,
            description = "Answer at once with the operation (202) instead of the VM")),
    request_body = StateChange,
    responses(
        (status = 200, description = "Done: the VM after it", body = Reply<VmRecord>),
        (status = 202, description = "Accepted (`?async=true`): the operation", body = AsyncReply),
        (status = 400, description = "Invalid request", body = ErrorReply),
        (status = 404, description = "No such VM", body = ErrorReply),
        (status = 409, description = "Not allowed in the VM's state (the metadata says what \
            is), the VM is busy, or the host has no room to start it", body = ErrorReply),
        (status = 500, description = "The action failed (the message says why)",
            body = ErrorReply)))]
async fn state(
    State(d): State<App>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<Response, OpError> {
    let background = is_async(&query(q))?;
    let req: StateChange = parse(&body)?;
    let task = blocking(move || d.act_task(&name, req.action, req.force)).await?;
    carry_out(task, background, StatusCode::OK).await
}

const OP_ID: &str = "The operation's id";

pub(crate) fn no_operation(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no operation {id:?}: see /1.0/operations (finished operations are kept {} \
             minutes, and none survives a restart of vmed)",
            crate::operations::KEEP.as_secs() / 60
        ),
        None,
    )
}

/// The operations running and recently ended, oldest first.
#[utoipa::path(get, path = "/1.0/operations", tag = "operations",
    responses((status = 200, description = "The operations", body = Reply<Vec<Operation>>)))]
async fn operations(State(d): State<App>, Extension(a): Extension<Authz>) -> Response {
    let d2 = Arc::clone(&d);
    let ops = blocking(move || {
        let mut ops = d2.ops.list();
        ops.retain(|op| a.sees_op(&d2, &op.id, &op.vm_key));
        Ok(ops)
    })
    .await
    .unwrap_or_default();
    ok(StatusCode::OK, ops)
}

#[utoipa::path(get, path = "/1.0/operations/{id}", tag = "operations",
    params(("id" = String, Path, description = OP_ID)),
    responses(
        (status = 200, description = "The operation", body = Reply<Operation>),
        (status = 404, description = "No such operation (or expired)", body = ErrorReply)))]
async fn operation(State(d): State<App>, Path(id): Path<String>) -> Response {
    match d.ops.get(&id) {
        Some(op) => ok(StatusCode::OK, op.view()),
        None => no_operation(&id),
    }
}

/// Cancels an operation. None of the daemon's operations can be cancelled yet.
#[utoipa::path(delete, path = "/1.0/operations/{id}", tag = "operations",
    params(("id" = String, Path, description = OP_ID)),
    responses(
        (status = 404, description = "No such operation (or expired)", body = ErrorReply),
        (status = 409, description = "It cannot be cancelled, or has ended", body = ErrorReply)))]
async fn cancel(State(d): State<App>, Path(id): Path<String>) -> Response {
    let Some(op) = d.ops.get(&id) else {
        return no_operation(&id);
    };
    let v = op.view();
    let msg = if op.is_done() {
        format!("operation {id} ({}) has already ended", v.description)
    } else {
        format!(
            "operation {id} ({}) cannot be cancelled: wait for it to end (GET \
             /1.0/operations/{id}/wait), then undo it with another action",
            v.description
        )
    };
    error(StatusCode::CONFLICT, msg, None)
}

/// Waits until the operation has ended, or the timeout has passed, and returns it then (its
/// `status` says which: `Running` after a timeout).
#[utoipa::path(get, path = "/1.0/operations/{id}/wait", tag = "operations",
    params(("id" = String, Path, description = OP_ID),
        ("timeout" = Option<f64>, Query,
            description = "Seconds to wait at most; none or -1: until it ends")),
    responses(
        (status = 200, description = "The operation, ended or (after the timeout) still \
            running", body = Reply<Operation>),
        (status = 400, description = "timeout is not a number", body = ErrorReply),
        (status = 404, description = "No such operation (or expired)", body = ErrorReply)))]
async fn wait(State(d): State<App>, Path(id): Path<String>, RawQuery(q): RawQuery) -> Response {
    let timeout = match query(q).get("timeout").map(|t| t.parse::<f64>()) {
        None => None,
        Some(Ok(t)) if t < 0.0 => None,
        Some(Ok(t)) if t.is_finite() => Some(Duration::from_secs_f64(t.min(1e9))),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "timeout must be a number of seconds (or -1 for no limit)".into(),
                None,
            );
        }
    };
    let Some(op) = d.ops.get(&id) else {
        return no_operation(&id);
    };
    ok(StatusCode::OK, op.wait(timeout).await)
}

/// The event stream: one JSON [`Event`] a line, as they happen, until the client goes away
/// (or vmed stops). A client that reads too slowly loses the oldest events and gets a
/// `lagged` event saying how many.
#[utoipa::path(get, path = "/1.0/events", tag = "events",
    params(("type" = Option<String>, Query,
        description = "Only these types, comma-separated: lifecycle, operation, audit-anchor, security")),
    responses(
        (status = 200, description = "Events, one JSON object a line (chunked)", body = Event,
            content_type = "application/x-ndjson"),
        (status = 400, description = "An unknown event type", body = ErrorReply)))]
async fn events(
    State(d): State<App>,
    Extension(a): Extension<Authz>,
    RawQuery(q): RawQuery,
) -> Result<Response, OpError> {
    let filter = match query(q).get("type") {
        None => None,
        Some(types) => Some(
            types
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| {
                    Kind::parse(t).ok_or_else(|| {
                        OpError::BadRequest(format!(
                            "unknown event type {t:?}: use lifecycle, operation, \
                             audit-anchor, security or several (comma-separated)"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let bus = d.events.clone();
    let rx = bus.subscribe();
    let seen = (d, Arc::new(a));
    let stream = futures_util::stream::unfold(
        (rx, bus, filter, seen),
        |(mut rx, bus, filter, seen)| async move {
            loop {
                let got = tokio::select! {
                    r = rx.recv() => r,
                    _ = bus.closed() => return None,
                };
                let event = match got {
                    Ok(e) if filter.as_ref().is_none_or(|f| f.contains(&e.kind)) => {
                        // Only events about VMs the user may see.
                        let (d, a) = (Arc::clone(&seen.0), Arc::clone(&seen.1));
                        let visible = match e.vm_key.clone() {
                            Some(vm) => blocking(move || Ok(a.sees_vm(&d, &vm)))
                                .await
                                .unwrap_or(false),
                            None => true,
                        };
                        if !visible {
                            continue;
                        }
                        e
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => Event {
                        kind: Kind::Lagged,
                        timestamp: rfc3339(SystemTime::now(), true),
                        metadata: json!({ "missed": n }),
                        vm_key: None,
                    },
                    Err(RecvError::Closed) => return None,
                };
                let mut line = serde_json::to_vec(&event).unwrap_or_default();
                line.push(b'\n');
                let chunk: Result<Bytes, std::convert::Infallible> = Ok(Bytes::from(line));
                return Some((chunk, (rx, bus, filter, seen)));
            }
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// This API as an OpenAPI 3 document (not in the reply envelope).
#[utoipa::path(get, path = "/1.0/openapi.json", tag = "daemon",
    responses((status = 200, description = "The OpenAPI document", body = Object,
        content_type = "application/json")))]
async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_text()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        let q = query(Some("async=true&type=lifecycle%2Coperation&x&t=a+b".into()));
        assert_eq!(q["async"], "true");
        assert_eq!(q["type"], "lifecycle,operation");
        assert_eq!(q["x"], "");
        assert_eq!(q["t"], "a b");
        assert!(query(None).is_empty());
        assert_eq!(query(Some("a=%zz%2".into()))["a"], "%zz%2");
        assert!(is_async(&q).unwrap());
        assert!(!is_async(&HashMap::new()).unwrap());
        let bad = HashMap::from([("async".to_string(), "maybe".to_string())]);
        assert!(
            is_async(&bad)
                .unwrap_err()
                .to_string()
                .contains("async=true")
        );
    }

    #[test]
    fn every_route_is_documented_with_responses() {
        let doc = serde_json::to_value(openapi()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        for route in ROUTES.split([',', ' ']).filter(|r| r.starts_with('/')) {
            let path = route.replace("NAME", "{name}").replace("ID", "{id}");
            assert!(paths.contains_key(&path), "{path} is not documented");
        }
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object();
                assert!(
                    responses.is_some_and(|r| !r.is_empty()),
                    "{method} {path} has no responses"
                );
            }
        }
    }
}
