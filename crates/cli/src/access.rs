//! `vme user`, `vme token`, `vme project`, `vme role`, `vme label`, `vme whoami`: access
//! control, through the daemon's `/1.0/users`, `/1.0/tokens`, `/1.0/projects` routes.
//! Managing users, projects, roles and labels is the daemon's admin's; a user manages its
//! own tokens.

use crate::output::{self, Format};
use anyhow::{Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Add a user, with a role in a project.
    Add {
        name: String,
        /// The project it gets a role in.
        #[arg(long)]
        project: String,
        /// admin, operator, user or auditor.
        #[arg(long, default_value = "user")]
        role: String,
        /// Its clearance, like `secret` or `secret:nato` (default: the lowest level).
        #[arg(long)]
        clearance: Option<String>,
        /// A local uid that is this user on the Unix socket.
        #[arg(long)]
        uid: Option<u32>,
        /// The SHA-256 fingerprint of a TLS client certificate that is this user (--remote).
        #[arg(long, value_name = "SHA256")]
        cert: Option<String>,
    },
    /// Change a user's clearance, uid or certificate (`none` removes a uid or certificate).
    Set {
        name: String,
        #[arg(long)]
        clearance: Option<String>,
        #[arg(long)]
        uid: Option<String>,
        #[arg(long, value_name = "SHA256")]
        cert: Option<String>,
    },
    /// List the users and their roles.
    #[command(alias = "ls")]
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove a user and its tokens.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Make an API token and print it (the only time it is shown): give it as `--token` or
    /// VME_TOKEN.
    Create {
        /// Whose (default: yours; another user's needs admin).
        user: Option<String>,
        /// When it expires: like 90s, 30m, 12h, 30d (default: never).
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// List tokens (yours; an admin's: all), never their secrets.
    #[command(alias = "ls")]
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Revoke a token, by its id: refused from the next request on.
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
pub enum ProjectCmd {
    /// Make a project.
    Create {
        name: String,
        /// Limits, like vms=10,vcpus=16,memory=32G,disk=500G (default: none).
        #[arg(long, value_name = "LIMITS")]
        quota: Option<String>,
        /// Launch only images signed by a key the daemon trusts, whatever the daemon's own
        /// require_signed says.
        #[arg(long)]
        require_signed: bool,
    },
    /// Change a project's quota (replaced whole) or image policy.
    Set {
        name: String,
        #[arg(long, value_name = "LIMITS")]
        quota: Option<String>,
        /// Launch only images signed by a trusted key (true) or follow the daemon (false).
        #[arg(long, value_name = "BOOL")]
        require_signed: Option<bool>,
    },
    /// List projects (yours; an admin's: all), with quota and usage.
    #[command(alias = "ls")]
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove an empty project.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum RoleCmd {
    /// Give a user a role in a project (`none` removes it); in force at its next request.
    Set {
        user: String,
        #[arg(long)]
        project: String,
        /// admin, operator, user, auditor or none.
        #[arg(long)]
        role: String,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Labelled {
    Vm,
    Image,
    User,
}

#[derive(Subcommand, Debug)]
pub enum LabelCmd {
    /// Set a VM's or image's label, or a user's clearance: LEVEL[:CATEGORY,...].
    Set {
        #[arg(value_enum)]
        kind: Labelled,
        name: String,
        label: String,
    },
}

/// What access control needs of the CLI: one API call (metadata or the daemon's error).
pub trait Call {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value>;
}

/// A name as one URL path segment.
fn seg(name: &str) -> Result<&str> {
    if name.is_empty() || name.contains(['/', '?', '#', '%', ' ']) || name == "." || name == ".." {
        bail!("{name:?} is not a valid name: use only letters, digits and '-'");
    }
    Ok(name)
}

/// `vms=10,memory=32G` as a quota object.
pub fn quota(text: &str) -> Result<Value> {
    let mut q = json!({});
    for kv in text.split(',').filter(|s| !s.is_empty()) {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("quota item {kv:?} is not KEY=VALUE: use vms=N,vcpus=N,memory=SIZE,disk=SIZE");
        };
        let n = match k {
            "vms" | "vcpus" => v
                .parse::<u64>()
                .map_err(|_| anyhow::anyhow!("quota {k}={v:?} is not a whole number"))?,
            "memory" | "disk" => v
                .parse::<vme_api::ByteSize>()
                .map_err(|e| anyhow::anyhow!("quota {k}={v:?}: {e}"))?
                .bytes(),
            _ => bail!("unknown quota {k:?}: use vms, vcpus, memory or disk"),
        };
        q[k] = json!(n);
    }
    Ok(q)
}

/// `90s`, `30m`, `12h`, `30d` or plain seconds.
pub fn duration(text: &str) -> Result<u64> {
    let (num, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = num.parse().map_err(|_| {
        anyhow::anyhow!("{text:?} is not a duration: use like 90s, 30m, 12h or 30d")
    })?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("unknown unit in {text:?}: use s, m, h or d"),
    };
    Ok(n.saturating_mul(mult))
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

fn print(
    format: Format,
    v: &Value,
    rows: impl FnOnce(&[Value]) -> Vec<Vec<String>>,
) -> Result<String> {
    match format {
        Format::Table => Ok(table(&rows(
            v.as_array().map(Vec::as_slice).unwrap_or_default(),
        ))),
        f => output::encode(f, v),
    }
}

fn roles(u: &Value) -> String {
    u["roles"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|m| format!("{}:{}", s(&m["project"]), s(&m["role"])))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

pub fn whoami(api: &dyn Call, format: Format) -> Result<String> {
    let v = api.call("GET", "/1.0/whoami", None)?;
    match format {
        Format::Table => Ok(format!(
            "{} (clearance {}; roles {}{})\n",
            s(&v["name"]),
            s(&v["clearance"]),
            roles(&v),
            if v["admin"] == json!(true) {
                "; admin"
            } else {
                ""
            }
        )),
        f => output::encode(f, &v),
    }
}

pub fn user(api: &dyn Call, cmd: UserCmd) -> Result<String> {
    Ok(match cmd {
        UserCmd::Add {
            name,
            project,
            role,
            clearance,
            uid,
            cert,
        } => {
            let mut body = json!({"name": name, "project": project, "role": role});
            for (k, v) in [
                ("clearance", clearance.map(Value::from)),
                ("uid", uid.map(Value::from)),
                ("cert", cert.map(Value::from)),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            api.call("POST", "/1.0/users", Some(body))?;
            format!("user {name}: added ({role} in {project})\n")
        }
        UserCmd::Set {
            name,
            clearance,
            uid,
            cert,
        } => {
            let mut body = json!({});
            if let Some(c) = clearance {
                body["clearance"] = json!(c);
            }
            if let Some(u) = uid {
                body["uid"] = if u == "none" {
                    Value::Null
                } else {
                    json!(
                        u.parse::<u32>()
                            .map_err(|_| anyhow::anyhow!("--uid {u:?} is not a uid (or none)"))?
                    )
                };
            }
            if let Some(c) = cert {
                body["cert"] = if c == "none" { Value::Null } else { json!(c) };
            }
            let u = api.call("PUT", &format!("/1.0/users/{}", seg(&name)?), Some(body))?;
            format!(
                "user {name}: clearance {}, uid {}, cert {}\n",
                s(&u["clearance"]),
                s(&u["uid"]),
                s(&u["cert"])
            )
        }
        UserCmd::List { format } => {
            let v = api.call("GET", "/1.0/users", None)?;
            print(format, &v, |us| {
                let mut rows = vec![
                    ["NAME", "CLEARANCE", "UID", "ROLES"]
                        .map(String::from)
                        .to_vec(),
                ];
                rows.extend(
                    us.iter()
                        .map(|u| vec![s(&u["name"]), s(&u["clearance"]), s(&u["uid"]), roles(u)]),
                );
                rows
            })?
        }
        UserCmd::Rm { name } => {
            api.call("DELETE", &format!("/1.0/users/{}", seg(&name)?), None)?;
            format!("user {name}: removed\n")
        }
    })
}

pub fn token(api: &dyn Call, cmd: TokenCmd) -> Result<String> {
    Ok(match cmd {
        TokenCmd::Create { user, expires } => {
            let mut body = json!({});
            if let Some(u) = user {
                body["user"] = json!(u);
            }
            if let Some(e) = expires {
                body["expires_in"] = json!(duration(&e)?);
            }
            let v = api.call("POST", "/1.0/tokens", Some(body))?;
            eprintln!(
                "vme: token {} for {}: shown this once; use it as --token or VME_TOKEN",
                s(&v["id"]),
                s(&v["user"])
            );
            format!("{}\n", s(&v["token"]))
        }
        TokenCmd::List { format } => {
            let v = api.call("GET", "/1.0/tokens", None)?;
            print(format, &v, |ts| {
                let mut rows = vec![
                    ["ID", "USER", "EXPIRES", "REVOKED"]
                        .map(String::from)
                        .to_vec(),
                ];
                rows.extend(ts.iter().map(|t| {
                    vec![
                        s(&t["id"]),
                        s(&t["user"]),
                        s(&t["expires_at"]),
                        s(&t["revoked_at"]),
                    ]
                }));
                rows
            })?
        }
        TokenCmd::Revoke { id } => {
            api.call("DELETE", &format!("/1.0/tokens/{}", seg(&id)?), None)?;
            format!("token {id}: revoked\n")
        }
    })
}

pub fn project(api: &dyn Call, cmd: ProjectCmd) -> Result<String> {
    Ok(match cmd {
        ProjectCmd::Create {
            name,
            quota: q,
            require_signed,
        } => {
            let q = q.map(|q| quota(&q)).transpose()?.unwrap_or(json!({}));
            api.call(
                "POST",
                "/1.0/projects",
                Some(json!({"name": name, "quota": q, "require_signed": require_signed})),
            )?;
            format!("project {name}: created\n")
        }
        ProjectCmd::Set {
            name,
            quota: q,
            require_signed,
        } => {
            if q.is_none() && require_signed.is_none() {
                bail!("nothing to change: give --quota LIMITS, --require-signed BOOL or both");
            }
            let mut body = serde_json::Map::new();
            if let Some(q) = q {
                body.insert("quota".into(), quota(&q)?);
            }
            if let Some(on) = require_signed {
                body.insert("require_signed".into(), json!(on));
            }
            api.call(
                "PUT",
                &format!("/1.0/projects/{}", seg(&name)?),
                Some(Value::Object(body)),
            )?;
            format!("project {name}: changed\n")
        }
        ProjectCmd::List { format } => {
            let v = api.call("GET", "/1.0/projects", None)?;
            print(format, &v, |ps| {
                let mut rows = vec![
                    ["NAME", "VMS", "VCPUS", "MEMORY", "DISK"]
                        .map(String::from)
                        .to_vec(),
                ];
                let cell = |p: &Value, k: &str| {
                    let used = p["usage"][k].as_u64().unwrap_or(0);
                    match p["quota"][k].as_u64() {
                        Some(q) => format!("{used}/{q}"),
                        None => used.to_string(),
                    }
                };
                rows.extend(ps.iter().map(|p| {
                    vec![
                        s(&p["name"]),
                        cell(p, "vms"),
                        cell(p, "vcpus"),
                        cell(p, "memory"),
                        cell(p, "disk"),
                    ]
                }));
                rows
            })?
        }
        ProjectCmd::Rm { name } => {
            api.call("DELETE", &format!("/1.0/projects/{}", seg(&name)?), None)?;
            format!("project {name}: removed\n")
        }
    })
}

pub fn role(api: &dyn Call, cmd: RoleCmd) -> Result<String> {
    let RoleCmd::Set {
        user,
        project,
        role,
    } = cmd;
    api.call(
        "PUT",
        &format!("/1.0/users/{}/role", seg(&user)?),
        Some(json!({"project": project, "role": role})),
    )?;
    Ok(format!("user {user}: {role} in {project}\n"))
}

pub fn label(api: &dyn Call, cmd: LabelCmd) -> Result<String> {
    let LabelCmd::Set { kind, name, label } = cmd;
    let n = seg(&name)?;
    match kind {
        Labelled::Vm => api.call(
            "PUT",
            &format!("/1.0/vms/{n}/label"),
            Some(json!({"label": label})),
        )?,
        Labelled::Image => api.call(
            "PUT",
            &format!("/1.0/images/{n}/access"),
            Some(json!({"label": label})),
        )?,
        Labelled::User => api.call(
            "PUT",
            &format!("/1.0/users/{n}"),
            Some(json!({"clearance": label})),
        )?,
    };
    Ok(format!("{name}: {label}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_and_durations() {
        assert_eq!(
            quota("vms=2,memory=1G").unwrap(),
            json!({"vms": 2, "memory": 1u64 << 30})
        );
        assert!(quota("cpus=2").is_err());
        assert!(quota("vms").is_err());
        assert_eq!(duration("90").unwrap(), 90);
        assert_eq!(duration("2h").unwrap(), 7200);
        assert_eq!(duration("30d").unwrap(), 30 * 86400);
        assert!(duration("1w").is_err() && duration("h").is_err());
    }
}
