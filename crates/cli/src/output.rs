//! How `vme` prints what the daemon answers: `--format table` (aligned columns for a
//! listing, `key: value` lines for one object), `json` or `yaml`.

use anyhow::Result;
use serde_json::Value;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// A value as a table cell: strings bare, anything else as JSON.
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

/// Rows under a header, each column as wide as its widest cell.
pub fn grid(head: &[&str], rows: &[Vec<String>]) -> String {
    let head: Vec<String> = head.iter().map(|h| h.to_string()).collect();
    let mut w = vec![0; head.len()];
    for r in std::iter::once(&head).chain(rows) {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&head).chain(rows) {
        let line: Vec<_> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<0$}", w[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The VMs of `GET /1.0/vms`.
pub fn vm_table(vms: &[Value]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                cell(&v["name"]),
                cell(&v["project"]),
                cell(&v["state"]),
                cell(&v["spec"]["arch"]),
                cell(&v["spec"]["vcpus"]),
                cell(&v["spec"]["memory"]),
            ]
        })
        .collect();
    grid(
        &["NAME", "PROJECT", "STATE", "ARCH", "VCPUS", "MEMORY"],
        &rows,
    )
}

/// The operations of `GET /1.0/operations`.
pub fn op_table(ops: &[Value]) -> String {
    let rows: Vec<Vec<String>> = ops
        .iter()
        .map(|o| {
            vec![
                cell(&o["id"]),
                cell(&o["status"]),
                cell(&o["description"]),
                cell(&o["created_at"]),
                cell(&o["err"]),
            ]
        })
        .collect();
    grid(&["ID", "STATUS", "DESCRIPTION", "CREATED", "ERROR"], &rows)
}

/// One object as `key: value` lines, nested objects as dotted keys.
pub fn fields(v: &Value) -> String {
    fn walk(prefix: &str, v: &Value, rows: &mut Vec<Vec<String>>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, rows);
                }
            }
            v => rows.push(vec![format!("{prefix}:"), cell(v)]),
        }
    }
    let mut rows = Vec::new();
    walk("", v, &mut rows);
    let mut out = grid(&["", ""], &rows);
    // The empty header line.
    out.remove(0);
    out
}

/// A value (a listing or one object) in a machine format.
pub fn encode(format: Format, v: &Value) -> Result<String> {
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(v)? + "\n",
        Format::Yaml => serde_norway::to_string(v)?,
        Format::Table => fields(v),
    })
}

/// The VM an event names: `NAME`, or `PROJECT/NAME` outside the `default` project (names
/// are unique per project).
fn event_vm(m: &Value) -> String {
    match m["project"].as_str() {
        Some(p) if p != "default" => format!("{p}/{}", cell(&m["vm"])),
        _ => cell(&m["vm"]),
    }
}

/// One event of `GET /1.0/events` as one line of `vme events`.
pub fn event_line(format: Format, e: &Value) -> Result<String> {
    let m = &e["metadata"];
    Ok(match format {
        Format::Json => e.to_string() + "\n",
        Format::Yaml => format!("---\n{}", serde_norway::to_string(e)?),
        Format::Table => {
            let what = match e["type"].as_str() {
                Some("lifecycle") => {
                    let state = |s: &Value| match s {
                        Value::Null => "-".to_string(),
                        s => cell(s),
                    };
                    let mut t = format!(
                        "{}: {} -> {} ({})",
                        event_vm(m),
                        state(&m["from"]),
                        state(&m["to"]),
                        cell(&m["action"])
                    );
                    if let Some(r) = m["reason"].as_str().filter(|r| !r.is_empty()) {
                        t.push_str(": ");
                        t.push_str(r.lines().next().unwrap_or(r));
                    }
                    t
                }
                Some("security") => {
                    format!("{}: SECURITY: {}", event_vm(m), cell(&m["reason"]))
                }
                Some("operation") => {
                    let mut t = format!(
                        "{}: {} [{}]",
                        cell(&m["description"]),
                        cell(&m["status"]),
                        cell(&m["id"])
                    );
                    if let Some(r) = m["err"].as_str().filter(|r| !r.is_empty()) {
                        t.push_str(": ");
                        t.push_str(r);
                    }
                    t
                }
                Some("audit-anchor") => format!(
                    "audit log anchored at record {}: {}",
                    cell(&m["seq"]),
                    cell(&m["hash"])
                ),
                Some("lagged") => format!(
                    "missed {} events: this reader was too slow",
                    cell(&m["missed"])
                ),
                _ => m.to_string(),
            };
            format!(
                "{:<24}  {:<9}  {what}\n",
                cell(&e["timestamp"]),
                cell(&e["type"])
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vm_table_aligns_columns() {
        let vms = [
            json!({"name":"a","project":"acme","state":"running","spec":{"arch":"riscv64","vcpus":2,"memory":"128M"}}),
        ];
        assert_eq!(
            vm_table(&vms),
            "NAME  PROJECT  STATE    ARCH     VCPUS  MEMORY\n\
             a     acme     running  riscv64  2      128M\n"
        );
        assert_eq!(vm_table(&[]), "NAME  PROJECT  STATE  ARCH  VCPUS  MEMORY\n");
    }

    #[test]
    fn one_object_as_fields() {
        let v = json!({"name": "a", "spec": {"vcpus": 2, "net": []}, "pid": 0});
        assert_eq!(
            fields(&v),
            "name:        a\npid:         0\nspec.net:    []\nspec.vcpus:  2\n"
        );
    }

    #[test]
    fn machine_formats_parse_back() {
        let v = json!([{"name": "a", "n": 1, "x": null}]);
        for f in [Format::Json, Format::Yaml] {
            let text = encode(f, &v).unwrap();
            let back: Value = match f {
                Format::Json => serde_json::from_str(&text).unwrap(),
                _ => serde_norway::from_str(&text).unwrap(),
            };
            assert_eq!(back, v, "{f:?}");
        }
    }

    #[test]
    fn events_as_lines() {
        let e = json!({"type": "lifecycle", "timestamp": "2024-01-01T00:00:00.000Z",
                       "metadata": {"vm": "a", "from": null, "to": "defined", "reason": "",
                                    "action": "create"}});
        assert_eq!(
            event_line(Format::Table, &e).unwrap(),
            "2024-01-01T00:00:00.000Z  lifecycle  a: - -> defined (create)\n"
        );
        let line = event_line(Format::Json, &e).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap(), e);
        let y = event_line(Format::Yaml, &e).unwrap();
        assert!(y.starts_with("---\n"), "{y}");
        assert_eq!(serde_norway::from_str::<Value>(&y).unwrap(), e);
        let e = json!({"type": "security", "timestamp": "t",
                       "metadata": {"vm": "web", "project": "acme", "reason": "the monitor ..."}});
        let line = event_line(Format::Table, &e).unwrap();
        assert!(
            line.ends_with("  acme/web: SECURITY: the monitor ...\n"),
            "{line}"
        );
    }
}
