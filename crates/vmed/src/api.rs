//! The REST API, in the shape of Incus: `/1.0/vms`, `/1.0/vms/{name}`,
//! `/1.0/vms/{name}/state`. Replies are `{"type":"sync","status_code":200,"metadata":...}`;
//! errors are `{"type":"error","error_code":N,"error":"what went wrong and what to do"}`,
//! and a refused transition (409) adds the VM's state and its allowed actions.

use crate::daemon::{Daemon, OpError};
use crate::lifecycle::{self, Action};
use crate::store::StoreError;
use crate::validate::CreateVm;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::sync::Arc;

type App = Arc<Daemon>;

pub fn router(daemon: App) -> Router {
    Router::new()
        .route(
            "/1.0",
            get(|| async { ok(StatusCode::OK, json!({"api_version": "1.0"})) }),
        )
        .route("/1.0/vms", get(list).post(create))
        .route("/1.0/metrics", get(metrics))
        .route("/1.0/vms/{name}", get(info).delete(delete))
        .route("/1.0/vms/{name}/state", put(state))
        .route("/1.0/vms/{name}/console", get(console))
        .route("/1.0/vms/{name}/exec", axum::routing::post(exec))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such route: see /1.0/vms, /1.0/vms/NAME, /1.0/vms/NAME/state, /1.0/vms/NAME/console, /1.0/vms/NAME/exec and /1.0/metrics".into(),
                None,
            )
        })
        .with_state(daemon)
}

fn ok(code: StatusCode, metadata: Value) -> Response {
    let body = json!({"type": "sync", "status": "Success", "status_code": code.as_u16(), "metadata": metadata});
    (code, axum::Json(body)).into_response()
}

fn error(code: StatusCode, msg: String, metadata: Option<Value>) -> Response {
    let mut body = json!({"type": "error", "error_code": code.as_u16(), "error": msg});
    if let Some(m) = metadata {
        body["metadata"] = m;
    }
    (code, axum::Json(body)).into_response()
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
            OpError::Store(_) | OpError::Failed(_) => {
                error(StatusCode::INTERNAL_SERVER_ERROR, msg, None)
            }
        }
    }
}

/// Parses a JSON body ourselves rather than with axum's extractor, so that every refusal
/// (bad syntax, unknown fields, wrong types) is a 400 with our JSON error shape.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, OpError> {
    serde_json::from_slice(body).map_err(|e| {
        OpError::BadRequest(format!(
            "invalid request body: {e}; see the API's documented fields"
        ))
    })
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

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Prometheus text format (not the JSON envelope: scrapers expect the bare text).
async fn metrics(State(d): State<App>) -> Result<Response, OpError> {
    let text = blocking(move || d.metrics()).await?;
    let ctype = "text/plain; version=0.0.4; charset=utf-8";
    Ok(([(axum::http::header::CONTENT_TYPE, ctype)], text).into_response())
}

async fn list(State(d): State<App>) -> Result<Response, OpError> {
    let vms = blocking(move || d.list()).await?;
    Ok(ok(StatusCode::OK, to_value(&vms)))
}

async fn create(State(d): State<App>, body: Bytes) -> Result<Response, OpError> {
    let req: CreateVm = parse(&body)?;
    let vm = blocking(move || d.create(&req)).await?;
    Ok(ok(StatusCode::CREATED, to_value(&vm)))
}

async fn info(State(d): State<App>, Path(name): Path<String>) -> Result<Response, OpError> {
    let vm = blocking(move || d.get(&name)).await?;
    Ok(ok(StatusCode::OK, to_value(&vm)))
}

async fn delete(State(d): State<App>, Path(name): Path<String>) -> Result<Response, OpError> {
    blocking(move || d.delete(&name)).await?;
    Ok(ok(StatusCode::OK, json!({})))
}

/// The end of the VM's console output (what its serial port printed); with `?attach=1`,
/// the console itself (see [`crate::console_attach`]).
async fn console(
    State(d): State<App>,
    Path(name): Path<String>,
    req: axum::extract::Request,
) -> Result<Response, OpError> {
    if crate::console_attach::wanted(req.uri().query()).map_err(OpError::BadRequest)? {
        return crate::console_attach::attach(d, name, req).await;
    }
    let log = blocking(move || d.console_log(&name)).await?;
    Ok(ok(StatusCode::OK, json!({ "log": log })))
}

/// Runs a command in the guest through its agent (see [`crate::guest::ExecRequest`]).
async fn exec(
    State(d): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, OpError> {
    let req: crate::guest::ExecRequest = parse(&body)?;
    let out = blocking(move || d.exec(&name, &req)).await?;
    Ok(ok(StatusCode::OK, to_value(&out)))
}

/// The body of `PUT /1.0/vms/{name}/state`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateChange {
    action: Action,
    /// Stop (or restart) without asking the guest first.
    #[serde(default)]
    force: bool,
}

async fn state(
    State(d): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, OpError> {
    let req: StateChange = parse(&body)?;
    let vm = blocking(move || d.act(&name, req.action, req.force)).await?;
    Ok(ok(StatusCode::OK, to_value(&vm)))
}
