//! Authentication: who is asking. A bearer token (checked against its argon2 hash, with
//! its expiry and revocation read from the store at every request), else the HTTPS client
//! certificate's user, else the Unix socket peer's uid (SO_PEERCRED). See
//! docs/access-control.md.

use crate::authz::Actor;
use crate::daemon::Daemon;
use crate::labels::{Label, Levels};
use std::collections::HashMap;
use std::sync::Mutex;

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
    pub(crate) fn remember_op(&self, id: &str, project: String, label: Label) {
        let mut m = crate::daemon::lock(&self.op_scope);
        if m.len() >= OP_SCOPES {
            m.clear();
        }
        m.insert(id.to_string(), (project, label));
    }

    pub(crate) fn op(&self, id: &str) -> Option<(String, Label)> {
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

pub(crate) fn hex(b: &[u8]) -> String {
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
