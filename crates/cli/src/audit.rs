//! `vme audit ...`: the daemon's audit log: list records, verify the hash chain and its
//! anchors, export it as JSON lines (docs/audit.md says how to check an export alone).

use crate::output::{self, Format};
use crate::{Api, http, out, query_value, reply};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// List records, newest last: state-changing requests, denials, security events.
    #[command(alias = "ls")]
    List {
        /// Only this actor's records.
        #[arg(long)]
        actor: Option<String>,
        /// Only this project's records.
        #[arg(long)]
        project: Option<String>,
        /// Only this action (`vm.start`); a trailing `*` matches a prefix (`vm.*`).
        #[arg(long)]
        action: Option<String>,
        /// Only denials.
        #[arg(long)]
        denied: bool,
        /// From this time on: Unix seconds or RFC 3339 (2026-12-02T15:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Before this time: Unix seconds or RFC 3339.
        #[arg(long)]
        until: Option<String>,
        /// The newest this many (default 100).
        #[arg(long)]
        limit: Option<u64>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Check the hash chain and the anchors; fails (exit status 1) naming the first bad
    /// record.
    Verify {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Every record as JSON lines, oldest first, to FILE (default, or `-`: stdout).
    Export { file: Option<PathBuf> },
}

pub fn run(api: &Api, cmd: AuditCmd) -> Result<()> {
    let print = |format: Format, v: &Value| -> Result<()> { out(&output::encode(format, v)?) };
    match cmd {
        AuditCmd::List {
            actor,
            project,
            action,
            denied,
            since,
            until,
            limit,
            format,
        } => {
            let mut q = Vec::new();
            for (k, v) in [
                ("actor", actor),
                ("project", project),
                ("action", action),
                ("result", denied.then(|| "denied".to_string())),
                ("since", since),
                ("until", until),
                ("limit", limit.map(|l| l.to_string())),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", query_value(&v)));
                }
            }
            let path = if q.is_empty() {
                "/1.0/audit".to_string()
            } else {
                format!("/1.0/audit?{}", q.join("&"))
            };
            let records = api.call("GET", &path, None)?;
            match format {
                Format::Table => out(&table(
                    records.as_array().map(Vec::as_slice).unwrap_or_default(),
                ))?,
                f => print(f, &records)?,
            }
        }
        AuditCmd::Verify { format } => {
            let v = api.call("GET", "/1.0/audit/verify", None)?;
            match format {
                Format::Table if v["ok"] == true => println!(
                    "ok: {} records, {} anchors; head {} {}",
                    v["records"],
                    v["anchors"],
                    v["head_seq"],
                    short(&v["head_hash"])
                ),
                Format::Table => {}
                f => print(f, &v)?,
            }
            if v["ok"] != true {
                bail!(
                    "the audit log fails verification: {}",
                    v["first_bad"]["message"]
                        .as_str()
                        .unwrap_or("(no reason given)")
                );
            }
        }
        AuditCmd::Export { file } => {
            let file = file.filter(|f| f.as_os_str() != "-");
            let tmp = file.as_ref().map(|f| f.with_extension("partial"));
            let mut sink: Box<dyn Write> = match &tmp {
                None => Box::new(std::io::stdout().lock()),
                Some(t) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(t)
                        .with_context(|| format!("cannot create {}", t.display()))?,
                )),
            };
            let got = http::download(&api.ep, "/1.0/audit/export", &mut sink)
                .map_err(|e| api.unreachable(e))?;
            sink.flush()?;
            drop(sink);
            match (got, file, tmp) {
                (Ok(_), Some(f), Some(t)) => {
                    std::fs::rename(&t, &f)
                        .with_context(|| format!("cannot write {}", f.display()))?;
                    eprintln!("exported the audit log to {}", f.display());
                }
                (Ok(_), _, _) => {}
                (Err((code, text)), _, tmp) => {
                    if let Some(t) = tmp {
                        let _ = std::fs::remove_file(t);
                    }
                    reply(code, &text)?;
                }
            }
        }
    }
    Ok(())
}

/// A hash's first 16 digits: enough to tell heads apart on a screen.
fn short(v: &Value) -> String {
    v.as_str().unwrap_or_default().chars().take(16).collect()
}

/// The records of `GET /1.0/audit` as a table.
fn table(records: &[Value]) -> String {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    };
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let result = match r["status"].as_u64() {
                Some(0) | None => s(&r["result"]),
                Some(code) => format!("{} {code}", s(&r["result"])),
            };
            vec![
                s(&r["seq"]),
                s(&r["time"]),
                s(&r["actor"]),
                s(&r["project"]),
                s(&r["action"]),
                s(&r["object"]),
                result,
                s(&r["source"]),
                s(&r["detail"]).chars().take(80).collect(),
            ]
        })
        .collect();
    output::grid(
        &[
            "SEQ", "TIME", "ACTOR", "PROJECT", "ACTION", "OBJECT", "RESULT", "SOURCE", "DETAIL",
        ],
        &rows,
    )
}
