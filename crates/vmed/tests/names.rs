//! Names unique per project, against the real daemon over real HTTP with real riscv64 VMs:
//! projects acme and globex each have a VM `web` (both running at once) and an image
//! `base`; each user sees only its own; root names one with `?project=`, and an ambiguous
//! name gets an error listing the projects; stopping and deleting acme's `web` leaves
//! globex's running; events, operations and audit records show names and projects, never
//! the daemon's internal keys. And a VM stored before names were per project is still
//! reachable (the store's migration keeps its key).

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod support;
#[path = "support/tenants.rs"]
mod tenants;
use support::{Vmed, send};
use tenants::{api, import, user};

/// Root's event stream: the events come on the channel as JSON values.
fn events(d: &Vmed) -> mpsc::Receiver<Value> {
    let s = send(&d.socket, "GET", "/1.0/events", "");
    s.set_read_timeout(None).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Chunked: each chunk is one event line; the size lines are not JSON.
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(line.trim()) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Events from `rx` until one satisfies `want`, or a panic after 60 s.
fn until(rx: &mpsc::Receiver<Value>, got: &mut Vec<Value>, want: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the event expected did not come; got {got:#?}"));
        let done = want(&e);
        got.push(e);
        if done {
            return;
        }
    }
}

fn names(list: &Value) -> Vec<(String, String)> {
    let mut v: Vec<_> = list["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["name"].as_str().unwrap().to_string(),
                x["project"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn pair(name: &str, project: &str) -> (String, String) {
    (name.to_string(), project.to_string())
}

#[test]
fn two_projects_each_have_a_running_web_and_a_base_image() {
    let d = Vmed::start("names", false, &[]);
    let rx = events(&d);
    let mut seen = Vec::new();
    let alice = user(&d, "alice", "acme", "operator", "unclassified");
    let bob = user(&d, "bob", "globex", "operator", "unclassified");
    for (token, project) in [(&alice, "acme"), (&bob, "globex")] {
        let (c, b) = import(&d, Some(token), "base", "");
        assert_eq!(c, 201, "{b}");
        let (_, v) = api(&d, Some(token), "GET", "/1.0/images", Value::Null);
        assert_eq!(names(&v), [pair("base", project)], "its own image only");
        let (c, v) = api(
            &d,
            Some(token),
            "POST",
            "/1.0/vms?async=true",
            json!({"name": "web", "image": "base"}),
        );
        assert_eq!(c, 202, "{v}");
        let url = format!("/1.0/vms/web?project={project}");
        assert_eq!(v["metadata"]["resources"]["vms"], json!([url]));
        let op = v["metadata"]["id"].as_str().unwrap().to_string();
        let wait = format!("/1.0/operations/{op}/wait?timeout=60");
        let (c, v) = api(&d, Some(token), "GET", &wait, Value::Null);
        assert_eq!(
            (c, v["metadata"]["status"].as_str()),
            (200, Some("Success")),
            "{v}"
        );
        let vm = &v["metadata"]["metadata"];
        assert_eq!(
            (vm["name"].as_str(), vm["project"].as_str()),
            (Some("web"), Some(project))
        );
        let (c, v) = api(
            &d,
            Some(token),
            "PUT",
            "/1.0/vms/web/state",
            json!({"action": "start"}),
        );
        assert_eq!(
            (c, v["metadata"]["state"].as_str()),
            (200, Some("running")),
            "{v}"
        );
        let (_, v) = api(&d, Some(token), "GET", "/1.0/vms", Value::Null);
        assert_eq!(names(&v), [pair("web", project)]);
    }
    // Both run at once, each in its own directory.
    let (_, v) = api(&d, None, "GET", "/1.0/vms", Value::Null);
    assert_eq!(names(&v), [pair("web", "acme"), pair("web", "globex")]);
    assert!(
        v["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["state"] == "running")
    );
    assert_eq!(d.monitors_of("acme_web").len(), 1);
    assert_eq!(d.monitors_of("globex_web").len(), 1);

    // Each user reaches its own by name; another project's, named, is a missing one.
    let (c, v) = api(&d, Some(&alice), "GET", "/1.0/vms/web", Value::Null);
    assert_eq!((c, v["metadata"]["project"].as_str()), (200, Some("acme")));
    let (c, theirs) = api(
        &d,
        Some(&alice),
        "GET",
        "/1.0/vms/web?project=globex",
        Value::Null,
    );
    let (c2, missing) = api(
        &d,
        Some(&alice),
        "GET",
        "/1.0/vms/zz?project=globex",
        Value::Null,
    );
    assert_eq!((c, c2), (404, 404), "{theirs}");
    assert_eq!(
        theirs["error"].as_str().unwrap().replace("web", "X"),
        missing["error"].as_str().unwrap().replace("zz", "X")
    );
    // Root, who sees both: ambiguous without a project, each with one.
    let (c, v) = api(&d, None, "GET", "/1.0/vms/web", Value::Null);
    let msg = v["error"].as_str().unwrap_or_default();
    assert_eq!(c, 409, "{v}");
    assert!(
        msg.contains("acme, globex") && msg.contains("--project"),
        "{msg}"
    );
    let (c, v) = api(&d, None, "GET", "/1.0/images/base", Value::Null);
    assert_eq!(c, 409, "{v}");
    for p in ["acme", "globex"] {
        let (c, v) = api(
            &d,
            None,
            "GET",
            &format!("/1.0/vms/web?project={p}"),
            Value::Null,
        );
        assert_eq!(
            (c, v["metadata"]["project"].as_str()),
            (200, Some(p)),
            "{v}"
        );
        let (c, v) = api(
            &d,
            None,
            "GET",
            &format!("/1.0/images/base?project={p}"),
            Value::Null,
        );
        assert_eq!(
            (c, v["metadata"]["project"].as_str()),
            (200, Some(p)),
            "{v}"
        );
    }
    // The internal key is no name: it reaches nothing.
    let (c, _) = api(&d, None, "GET", "/1.0/vms/acme_web", Value::Null);
    assert_eq!(c, 400);
    let (c, _) = api(&d, None, "GET", "/1.0/images/acme:base", Value::Null);
    assert_eq!(c, 400);

    // Stopping and deleting acme's leaves globex's running.
    let (c, v) = api(
        &d,
        Some(&alice),
        "PUT",
        "/1.0/vms/web/state",
        json!({"action": "stop", "force": true}),
    );
    assert_eq!(
        (c, v["metadata"]["state"].as_str()),
        (200, Some("stopped")),
        "{v}"
    );
    // An error about it names it, not its key.
    let (c, v) = api(
        &d,
        Some(&alice),
        "POST",
        "/1.0/vms/web/exec",
        json!({"command": ["id"]}),
    );
    let msg = v["error"].as_str().unwrap_or_default();
    assert_eq!(c, 409, "{v}");
    assert!(
        msg.contains("\"web\"") && msg.contains("`vme start web`"),
        "{msg}"
    );
    assert!(!msg.contains("acme_web"), "{msg}");
    let (c, v) = api(&d, Some(&alice), "DELETE", "/1.0/vms/web", Value::Null);
    assert_eq!(c, 200, "{v}");
    let (c, v) = api(&d, None, "GET", "/1.0/vms/web", Value::Null);
    assert_eq!(
        (c, v["metadata"]["project"].as_str()),
        (200, Some("globex")),
        "now unique"
    );
    assert_eq!(v["metadata"]["state"], "running");
    assert_eq!(d.monitors_of("globex_web").len(), 1);

    // Events name the VM and its project; operations show names; no key leaks.
    until(&rx, &mut seen, |e| {
        e["type"] == "lifecycle"
            && e["metadata"]["project"] == "acme"
            && e["metadata"]["to"].is_null()
    });
    let lifecycle: Vec<_> = seen.iter().filter(|e| e["type"] == "lifecycle").collect();
    assert!(
        lifecycle.iter().all(|e| e["metadata"]["vm"] == "web"),
        "{lifecycle:#?}"
    );
    for p in ["acme", "globex"] {
        assert!(
            lifecycle
                .iter()
                .any(|e| e["metadata"]["project"] == p && e["metadata"]["to"] == "running"),
            "{p} running: {lifecycle:#?}"
        );
    }
    let (_, ops) = api(&d, None, "GET", "/1.0/operations", Value::Null);
    // (A VM's spec names host paths, which are under its key: names are checked.)
    let all = format!("{} {}", json!(seen), ops);
    for key in ["acme_web", "globex_web", "acme:base", "globex:base"] {
        for shown in [
            format!("\"{key}\""),
            format!("/1.0/vms/{key}"),
            format!("VM {key}"),
        ] {
            assert!(!all.contains(&shown), "{shown} shown: {all}");
        }
    }
    assert!(ops.to_string().contains("Starting VM web"), "{ops}");
    // The audit log names objects by project and name.
    let (c, v) = api(&d, None, "GET", "/1.0/audit?action=vm.delete", Value::Null);
    assert_eq!(c, 200, "{v}");
    let objects: Vec<_> = v["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["object"].clone())
        .collect();
    assert_eq!(objects, [json!("vm/acme/web")]);

    let (c, _) = api(
        &d,
        Some(&bob),
        "PUT",
        "/1.0/vms/web/state",
        json!({"action": "stop", "force": true}),
    );
    assert_eq!(c, 200);
}

/// Launching by image name: the project's own image first, then the one public image of
/// that name; several public ones need `PROJECT/NAME`.
#[test]
fn images_launch_own_then_public() {
    let d = Vmed::start("names-images", false, &[]);
    let alice = user(&d, "alice", "acme", "operator", "unclassified");
    let bob = user(&d, "bob", "globex", "operator", "unclassified");
    let carol = user(&d, "carol", "initech", "user", "unclassified");
    for t in [&alice, &bob] {
        assert_eq!(import(&d, Some(t), "base", "&public=true").0, 201);
    }
    // Carol has none of her own: two public ones.
    let (c, v) = api(
        &d,
        Some(&carol),
        "POST",
        "/1.0/vms",
        json!({"name": "a", "image": "base"}),
    );
    let msg = v["error"].as_str().unwrap_or_default();
    assert_eq!(c, 409, "{v}");
    assert!(
        msg.contains("acme, globex") && msg.contains("PROJECT/NAME"),
        "{msg}"
    );
    let (c, v) = api(
        &d,
        Some(&carol),
        "POST",
        "/1.0/vms",
        json!({"name": "a", "image": "globex/base"}),
    );
    assert_eq!(
        (c, v["metadata"]["project"].as_str()),
        (201, Some("initech")),
        "{v}"
    );
    // One made private again: the other is the one.
    let (c, v) = api(
        &d,
        Some(&alice),
        "PUT",
        "/1.0/images/base/access",
        json!({"public": false}),
    );
    assert_eq!(
        (c, v["metadata"]["public"].as_bool()),
        (200, Some(false)),
        "{v}"
    );
    let (c, v) = api(
        &d,
        Some(&carol),
        "POST",
        "/1.0/vms",
        json!({"name": "b", "image": "base"}),
    );
    assert_eq!(c, 201, "{v}");
    let (c, _) = api(
        &d,
        Some(&carol),
        "POST",
        "/1.0/vms",
        json!({"name": "c", "image": "acme/base"}),
    );
    assert_eq!(c, 404, "acme's is private again");
    // Her own, once she has one, comes first.
    assert_eq!(import(&d, Some(&carol), "base", "").0, 201);
    let (c, v) = api(
        &d,
        Some(&carol),
        "POST",
        "/1.0/vms",
        json!({"name": "d", "image": "base"}),
    );
    assert_eq!(c, 201, "{v}");
    let (_, v) = api(&d, Some(&carol), "GET", "/1.0/images", Value::Null);
    assert_eq!(names(&v), [pair("base", "globex"), pair("base", "initech")]);
}

/// A VM stored before names were per project (keyed by its name, in project acme) is still
/// reached by its name and runs; a new `web` of `default` then gets a key of its own.
#[test]
fn a_vm_stored_before_the_migration_is_still_reachable() {
    let mut d = Vmed::start("names-old", false, &[]);
    let alice = user(&d, "alice", "acme", "user", "unclassified");
    assert_eq!(import(&d, None, "base", "&public=true").0, 201);
    let (c, v) = api(
        &d,
        None,
        "POST",
        "/1.0/vms",
        json!({"name": "web", "image": "base"}),
    );
    assert_eq!(c, 201, "{v}");
    // Back to the schema before the migration, the VM then acme's (as it could be then).
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let db = rusqlite::Connection::open(d.dir.join("state/vmed.db")).unwrap();
    let version: i64 = db
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .unwrap();
    db.execute_batch(&format!(
        "DROP INDEX vms_by_project_name; DROP INDEX images_by_project_name;
         ALTER TABLE vms DROP COLUMN short; ALTER TABLE images DROP COLUMN short;
         ALTER TABLE image_aliases DROP COLUMN short;
         UPDATE vms SET project = 'acme' WHERE name = 'web';
         UPDATE schema_version SET version = {};",
        version - 1
    ))
    .unwrap();
    drop(db);
    d.launch(None);
    let (c, v) = api(&d, Some(&alice), "GET", "/1.0/vms/web", Value::Null);
    assert_eq!(
        (c, v["metadata"]["project"].as_str()),
        (200, Some("acme")),
        "{v}"
    );
    let (c, v) = api(
        &d,
        Some(&alice),
        "PUT",
        "/1.0/vms/web/state",
        json!({"action": "start"}),
    );
    assert_eq!(
        (c, v["metadata"]["state"].as_str()),
        (200, Some("running")),
        "{v}"
    );
    assert_eq!(d.monitors_of("web").len(), 1, "its files keep their place");
    // default's own `web` next to it.
    let (c, v) = api(
        &d,
        None,
        "POST",
        "/1.0/vms",
        json!({"name": "web", "image": "base"}),
    );
    assert_eq!(
        (c, v["metadata"]["project"].as_str()),
        (201, Some("default")),
        "{v}"
    );
    let (c, v) = api(
        &d,
        None,
        "PUT",
        "/1.0/vms/web/state",
        json!({"action": "start"}),
    );
    assert_eq!(
        (c, v["metadata"]["state"].as_str()),
        (200, Some("running")),
        "{v}"
    );
    assert_eq!(d.monitors_of("default_web").len(), 1);
    for (who, p) in [(Some(alice.as_str()), "?project=acme"), (None, "")] {
        let (c, _) = api(
            &d,
            who,
            "PUT",
            &format!("/1.0/vms/web/state{p}"),
            json!({"action": "stop", "force": true}),
        );
        assert_eq!(c, 200);
    }
}

/// A VM whose key (project and name) would make its sockets longer than Unix sockets allow
/// is refused at create, saying so, instead of failing at start.
#[test]
fn a_name_too_long_for_its_sockets_is_refused_at_create() {
    let d = Vmed::start("names-long", false, &[]);
    let project = "p".repeat(30);
    let (c, v) = api(
        &d,
        None,
        "POST",
        "/1.0/projects",
        json!({ "name": project }),
    );
    assert_eq!(c, 201, "{v}");
    assert_eq!(import(&d, None, "base", "&public=true").0, 201);
    let (c, v) = api(
        &d,
        None,
        "POST",
        &format!("/1.0/vms?project={project}"),
        json!({"name": "n".repeat(60), "image": "base"}),
    );
    let msg = v["error"].as_str().unwrap_or_default();
    assert_eq!(c, 400, "{v}");
    assert!(
        msg.contains("Unix sockets") && msg.contains("shorter"),
        "{msg}"
    );
    let (c, v) = api(
        &d,
        None,
        "POST",
        &format!("/1.0/vms?project={project}"),
        json!({"name": "short", "image": "base"}),
    );
    assert_eq!(c, 201, "{v}");
}
