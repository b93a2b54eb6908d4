//! The audit log on the API: the layer that records requests (outside every other one, so
//! it sees each request's final status and the access-control facts), and the routes that
//! read the log: `GET /1.0/audit`, `/1.0/audit/verify`, `/1.0/audit/export`.

use super::{AuditLog, Entry, Outcome, Query, Record, RecordKind, Verdict};
use crate::api::{App, ErrorReply, Reply, blocking, ok, query};
use crate::daemon::OpError;
use crate::request_facts::RequestFacts;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, RawQuery, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(crate) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(audit_list))
        .routes(routes!(audit_verify))
        .routes(routes!(audit_export))
}

/// Error replies up to this size are read for the record's `detail`.
const DETAIL_BODY_MAX: u64 = 64 * 1024;

/// A refused request's body is read up to this much before the refusal is sent.
const DRAIN_MAX: usize = 1 << 20;

/// Whether a request of this method changes state (everything but reads is recorded).
fn changes_state(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The layer: runs the request, then appends its record (a state-changing request, or any
/// denial) and answers only once the record is durable. A log that cannot be written
/// refuses state-changing requests before they run: nothing changes unrecorded.
pub(crate) async fn layer(State(d): State<App>, req: Request, next: Next) -> Response {
    match d.audit.get().cloned() {
        Some(log) => record(log, req, next).await,
        None => next.run(req).await,
    }
}

/// [`layer`]'s work, on any router.
pub async fn record(log: Arc<AuditLog>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let changes = changes_state(&method);
    let peer = peer_source(&req);
    if changes && log.failed() {
        // Read (a bounded part of) the body first: a client still sending it would otherwise
        // see its connection reset instead of this reply.
        let _ = axum::body::to_bytes(req.into_body(), DRAIN_MAX).await;
        return OpError::Unavailable(
            "the audit log cannot be written, so vmed refuses state-changing requests: see \
             the daemon's log, fix the state dir's disk, then restart vmed"
                .into(),
        )
        .into_response();
    }
    let resp = next.run(req).await;
    let status = resp.status();
    let facts = resp.extensions().get::<RequestFacts>().cloned();
    let denied = facts.as_ref().is_some_and(|f| !f.allowed) || matches!(status.as_u16(), 401 | 403);
    if !changes && !denied {
        return resp;
    }
    let (resp, error) = error_message(resp).await;
    let f = facts.unwrap_or_default();
    let detail = match (f.reason.is_empty(), error) {
        (false, _) => f.reason,
        (true, Some(e)) => e,
        (true, None) => String::new(),
    };
    let entry = Entry {
        kind: RecordKind::Request,
        actor: nonempty(f.actor, "unknown"),
        project: f.project,
        action: nonempty(f.action, &format!("{method} {path}")),
        object: f.object,
        label: f.label,
        result: if denied {
            Outcome::Denied
        } else {
            Outcome::Allowed
        },
        status: status.as_u16(),
        source: nonempty(f.source, peer.as_deref().unwrap_or("unknown")),
        detail,
    };
    match log.append(entry).await {
        Ok(_) => resp,
        // The request is answered but unrecorded: say so rather than pretend all is well.
        Err(e) => OpError::Failed(format!(
            "the request was {} (HTTP {status}) but its audit record could not be written: {e}",
            if denied { "refused" } else { "carried out" }
        ))
        .into_response(),
    }
}

/// Where a request came from, as far as the connection tells (the access-control layer's
/// peer: the Unix socket's uid, or the HTTPS client's address), for a record whose facts
/// name no source.
fn peer_source(req: &Request) -> Option<String> {
    let peer = req
        .extensions()
        .get::<ConnectInfo<crate::authn::Peer>>()
        .map(|c| c.0.clone())
        .or_else(|| req.extensions().get::<crate::authn::Peer>().cloned())?;
    (!peer.source.is_empty()).then_some(peer.source)
}

fn nonempty(s: String, default: &str) -> String {
    if s.is_empty() { default.into() } else { s }
}

/// An error reply's message (our JSON `error` field), with the reply rebuilt to send.
async fn error_message(resp: Response) -> (Response, Option<String>) {
    let small = resp
        .body()
        .size_hint()
        .exact()
        .is_some_and(|n| n <= DETAIL_BODY_MAX);
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if resp.status().as_u16() < 400 || !small || !json {
        return (resp, None);
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, DETAIL_BODY_MAX as usize)
        .await
        .unwrap_or_default();
    let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from));
    (Response::from_parts(parts, Body::from(bytes)), msg)
}

fn the_log(d: &App) -> Result<Arc<AuditLog>, OpError> {
    d.audit.get().cloned().ok_or_else(|| {
        OpError::Unavailable("this daemon has no audit log open; see its log".into())
    })
}

/// `?...` of `GET /1.0/audit` as a [`Query`].
fn list_query(raw: Option<String>) -> Result<Query, OpError> {
    let mut q = Query::default();
    for (k, v) in query(raw) {
        let time = |v: &str, k: &str| {
            crate::usage::parse_since(v).map_err(|e| OpError::BadRequest(e.replacen("since", k, 1)))
        };
        match k.as_str() {
            "actor" => q.actor = Some(v),
            "project" => q.project = Some(v),
            "action" => q.action = Some(v),
            "result" => {
                q.result = Some(Outcome::parse(&v).ok_or_else(|| {
                    OpError::BadRequest(format!("result={v:?}: use allowed or denied"))
                })?)
            }
            "kind" => {
                q.kind = Some(RecordKind::parse(&v).ok_or_else(|| {
                    OpError::BadRequest(format!("kind={v:?}: use request or security"))
                })?)
            }
            "since" => q.since = Some(time(&v, "since")?),
            "until" => q.until = Some(time(&v, "until")?),
            "limit" => {
                q.limit = Some(v.parse().map_err(|_| {
                    OpError::BadRequest(format!("limit={v:?} is not a whole number"))
                })?)
            }
            _ => {
                return Err(OpError::BadRequest(format!(
                    "unknown query parameter {k:?}: this route takes actor, project, action, \
                     result, kind, since, until and limit"
                )));
            }
        }
    }
    Ok(q)
}

/// The records that match, oldest first: the newest `limit` (default 100).
#[utoipa::path(get, path = "/1.0/audit", tag = "audit",
    params(
        ("actor" = Option<String>, Query, description = "Only this actor's records"),
        ("project" = Option<String>, Query, description = "Only this project's records"),
        ("action" = Option<String>, Query,
            description = "Only this action; a trailing `*` matches a prefix (`vm.*`)"),
        ("result" = Option<String>, Query, description = "allowed or denied"),
        ("kind" = Option<String>, Query, description = "request or security"),
        ("since" = Option<String>, Query,
            description = "From this time on: Unix seconds or RFC 3339"),
        ("until" = Option<String>, Query,
            description = "Before this time: Unix seconds or RFC 3339"),
        ("limit" = Option<u64>, Query,
            description = "The newest this many (default 100, at most 100000)")),
    responses(
        (status = 200, description = "The records, oldest first", body = Reply<Vec<Record>>),
        (status = 400, description = "A bad filter", body = ErrorReply),
        (status = 500, description = "The log cannot be read", body = ErrorReply)))]
async fn audit_list(State(d): State<App>, RawQuery(q): RawQuery) -> Result<Response, OpError> {
    let q = list_query(q)?;
    let log = the_log(&d)?;
    let records =
        blocking(move || log.list(&q).map_err(|e| OpError::Failed(e.to_string()))).await?;
    Ok(ok(StatusCode::OK, records))
}

/// Walks the hash chain and the anchors. A log that fails is still a 200: the verdict says
/// `ok: false` and names the first bad record.
#[utoipa::path(get, path = "/1.0/audit/verify", tag = "audit",
    responses(
        (status = 200, description = "The verdict: ok, or the first bad record and what is \
            wrong with it", body = Reply<Verdict>),
        (status = 500, description = "The log cannot be read", body = ErrorReply)))]
async fn audit_verify(State(d): State<App>) -> Result<Response, OpError> {
    let log = the_log(&d)?;
    let v = blocking(move || log.verify().map_err(|e| OpError::Failed(e.to_string()))).await?;
    Ok(ok(StatusCode::OK, v))
}

/// Every record, oldest first, one JSON object a line (as `GET /1.0/audit` shows them, with
/// `prev_hash` and `hash`): what a third party verifies (see docs/audit.md).
#[utoipa::path(get, path = "/1.0/audit/export", tag = "audit",
    responses(
        (status = 200, description = "The records, one JSON object a line (chunked)",
            body = Record, content_type = "application/x-ndjson"),
        (status = 503, description = "No audit log is open", body = ErrorReply)))]
async fn audit_export(State(d): State<App>) -> Result<Response, OpError> {
    let log = the_log(&d)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::with_capacity(64 * 1024);
        let r = log.export(&mut |line| {
            buf.extend_from_slice(line);
            if buf.len() >= 60 * 1024 {
                let chunk = Bytes::from(std::mem::take(&mut buf));
                tx.blocking_send(Ok(chunk))
                    .map_err(|_| std::io::Error::other("the client went away"))?;
            }
            Ok(())
        });
        let _ = match r {
            Ok(()) => tx.blocking_send(Ok(Bytes::from(buf))),
            // Cut short: the client sees a broken chunked body, not a complete export.
            Err(e) => tx.blocking_send(Err(std::io::Error::other(e.to_string()))),
        };
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditConfig;
    use crate::events::Events;
    use axum::Router;
    use axum::routing::{get, post};
    use std::io::{Read, Write};

    fn with_facts(code: StatusCode, facts: RequestFacts) -> Response {
        let mut r = (code, axum::Json(serde_json::json!({"error": "no"}))).into_response();
        r.extensions_mut().insert(facts);
        r
    }

    fn raw(sock: &std::path::Path, method: &str, path: &str) -> u16 {
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: vme\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply.split(' ').nth(1).unwrap().parse().unwrap()
    }

    /// The contract with the access-control layer: its facts, read from the reply, make the
    /// record; a denial is recorded whatever its method (and even when it answers 404 to hide
    /// the object), a successful read is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_layer_records_what_the_policy_decided() {
        let dir = std::env::temp_dir().join(format!("vme-audit-layer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = AuditLog::open(&dir, AuditConfig::default(), Events::new()).unwrap();
        let facts = |allowed: bool, reason: &str| RequestFacts {
            actor: "alice".into(),
            project: Some("acme".into()),
            action: "vm.info".into(),
            object: "vm/beta/web".into(),
            label: Some("secret".into()),
            allowed,
            reason: reason.into(),
            source: "unix:uid=1000".into(),
        };
        let (f1, f2) = (
            facts(true, ""),
            facts(false, "clearance confidential < secret"),
        );
        let l = log.clone();
        let app = Router::new()
            .route(
                "/read",
                get(move || async move { with_facts(StatusCode::OK, f1) }),
            )
            .route(
                "/hidden",
                get(move || async move { with_facts(StatusCode::NOT_FOUND, f2) }),
            )
            .route(
                "/write",
                post(|| async {
                    let body = serde_json::json!({"type": "error", "error": "not yours"});
                    (StatusCode::FORBIDDEN, axum::Json(body))
                }),
            )
            .layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    let l = l.clone();
                    async move { record(l, req, next).await }
                },
            ));
        let sock = dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        for (m, p, code) in [
            ("GET", "/read", 200),
            ("GET", "/hidden", 404),
            ("POST", "/write", 403),
        ] {
            let s = sock.clone();
            let got = tokio::task::spawn_blocking(move || raw(&s, m, p))
                .await
                .unwrap();
            assert_eq!(got, code, "{m} {p}");
        }
        let recs = log.list(&Query::default()).unwrap();
        assert_eq!(recs.len(), 2, "{recs:#?}");
        let (a, b) = (&recs[0], &recs[1]);
        assert_eq!(
            (a.seq, a.actor.as_str(), a.action.as_str()),
            (1, "alice", "vm.info")
        );
        assert_eq!((a.result, a.status), (Outcome::Denied, 404));
        assert_eq!(a.object, "vm/beta/web");
        assert_eq!(
            (a.project.as_deref(), a.label.as_deref()),
            (Some("acme"), Some("secret"))
        );
        assert_eq!(a.source, "unix:uid=1000");
        assert_eq!(a.detail, "clearance confidential < secret");
        // No facts (a route the policy did not see): still recorded, by method and path.
        assert_eq!(
            (b.actor.as_str(), b.action.as_str()),
            ("unknown", "POST /write")
        );
        assert_eq!(
            (b.result, b.status, b.detail.as_str()),
            (Outcome::Denied, 403, "not yours")
        );
        assert!(log.verify().unwrap().ok);
        log.close();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
