//! `GET /1.0/vms/{name}/console?attach=1`: the VM's serial console over an upgraded HTTP
//! connection. The client sends `Connection: upgrade` and `Upgrade: vme-console`; after the
//! `101 Switching Protocols` reply, bytes flow raw both ways between it and the monitor's
//! console socket (keystrokes to the guest's UART, its output back). The monitor serves one
//! client at a time: a newer attach takes over from an older one, which is told so and
//! closed. Every refusal comes before the upgrade, as a JSON error.

use crate::api::blocking;
use crate::daemon::{Daemon, OpError};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::Response;
use std::sync::Arc;

/// The protocol name in the `Upgrade` header.
pub const PROTOCOL: &str = "vme-console";

/// Whether the query asks to attach: `attach=1` or `attach=true`; `0`/`false` or no
/// `attach` reads the log.
pub fn wanted(query: Option<&str>) -> Result<bool, String> {
    let mut attach = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("attach", "1" | "true") => attach = true,
            ("attach", "0" | "false") => attach = false,
            ("attach", v) => {
                return Err(format!(
                    "attach={v:?} is not a switch: use attach=1 (or leave it out for the log)"
                ));
            }
            (k, _) => {
                return Err(format!(
                    "unknown query parameter {k:?}: the console route takes only attach=1"
                ));
            }
        }
    }
    Ok(attach)
}

/// Whether a header's comma-separated tokens include `token` (case-insensitive).
fn has_token(req: &Request, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

pub async fn attach(d: Arc<Daemon>, name: String, mut req: Request) -> Result<Response, OpError> {
    if !has_token(&req, header::CONNECTION, "upgrade")
        || !has_token(&req, header::UPGRADE, PROTOCOL)
    {
        return Err(OpError::BadRequest(format!(
            "attaching to a console upgrades the connection: send the headers \
             `Connection: upgrade` and `Upgrade: {PROTOCOL}` (or use `vme console NAME`)"
        )));
    }
    let n = name.clone();
    let path = blocking(move || d.console_attach(&n)).await?;
    let monitor = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
        OpError::Unavailable(format!(
            "the console of VM {name:?} does not answer at {} ({e}); a VM started by an \
             older vmed has only a log: restart it to get an attachable console",
            path.display()
        ))
    })?;
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = upgrade.await {
            let mut client = hyper_util::rt::TokioIo::new(up);
            let mut monitor = monitor;
            // Ends when either side closes: a detached client, or the monitor's exit.
            let _ = tokio::io::copy_bidirectional(&mut client, &mut monitor).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Body::empty())
        .map_err(|e| OpError::Failed(format!("cannot build the upgrade reply: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_says_whether_to_attach() {
        assert_eq!(wanted(None), Ok(false));
        assert_eq!(wanted(Some("attach=1")), Ok(true));
        assert_eq!(wanted(Some("attach=true")), Ok(true));
        assert_eq!(wanted(Some("attach=0")), Ok(false));
        assert!(
            wanted(Some("attach=maybe"))
                .unwrap_err()
                .contains("attach=1")
        );
        assert!(wanted(Some("tail=5")).unwrap_err().contains("unknown"));
    }
}
