//! The API as documented: the committed OpenAPI document is the one the code generates, it is
//! a sound OpenAPI 3 document, and every route and method it names answers on a real daemon.
//! Then operations and events against a real riscv64 VM: an async start is an operation one
//! can list and wait on, and every state change (the user's and the supervisor's) is an
//! event on the stream.

use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod support;
use support::{Vmed, image, request, send};

/// A daemon without cgroups (they have their own tests).
fn start_vmed(test: &str) -> Vmed {
    Vmed::start(test, false, &[])
}

/// One request; the status code and the body (JSON, or the text as a JSON string).
fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (code, text) = request(socket, method, path, body);
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, json)
}

/// One request whose reply may never end (the event stream): the status code and headers.
fn head(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut r = BufReader::new(send(socket, method, path, body));
    let mut head = String::new();
    loop {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "no end of headers");
        if l == "\r\n" {
            break;
        }
        head.push_str(&l);
    }
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, head)
}

/// Subscribes to `/1.0/events{query}`; the events come on the channel. Returns once the
/// daemon has answered (so the subscription exists).
fn subscribe(socket: &Path, query: &str) -> mpsc::Receiver<Value> {
    let s = send(socket, "GET", &format!("/1.0/events{query}"), "");
    s.set_read_timeout(None).unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert!(r.read_line(&mut head).unwrap() > 0, "no end of headers");
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut pending = Vec::new();
        loop {
            let mut size = String::new();
            if r.read_line(&mut size).unwrap_or(0) == 0 {
                return;
            }
            let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
                return;
            };
            if n == 0 {
                return;
            }
            let mut chunk = vec![0; n + 2];
            if r.read_exact(&mut chunk).is_err() {
                return;
            }
            pending.extend_from_slice(&chunk[..n]);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let event = serde_json::from_slice(&line).expect("an event is one JSON line");
                if tx.send(event).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Events from `rx` until `done` says enough (all of them, in order), or a panic after 60 s.
fn events_until(rx: &mpsc::Receiver<Value>, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) => got.push(e),
            Err(_) => panic!("the events expected did not come; got {got:#?}"),
        }
    }
    got
}

/// The lifecycle events of `vm` among `events`, as "from>to action".
fn transitions(events: &[Value], vm: &str) -> Vec<String> {
    let state = |s: &Value| s.as_str().unwrap_or("-").to_string();
    events
        .iter()
        .filter(|e| e["type"] == "lifecycle" && e["metadata"]["vm"] == vm)
        .map(|e| {
            let m = &e["metadata"];
            format!(
                "{}>{} {}",
                state(&m["from"]),
                state(&m["to"]),
                m["action"].as_str().unwrap()
            )
        })
        .collect()
}

fn docs_openapi() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

#[test]
fn the_committed_openapi_document_is_current() {
    let committed = std::fs::read_to_string(docs_openapi()).unwrap_or_default();
    assert!(
        committed == vmed::api::openapi_text(),
        "docs/openapi.json differs from the API the code declares: regenerate it with \
         `cargo run -p vmed -- --print-openapi > docs/openapi.json` and commit it"
    );
}

/// The checks of an OpenAPI 3 validator that matter here: the required fields, every
/// operation with responses (each described), every `{param}` of a path declared, unique
/// operation ids, and every `$ref` resolved.
#[test]
fn the_openapi_document_is_sound() {
    let doc: Value = serde_json::from_str(vmed::api::openapi_text()).unwrap();
    let version = doc["openapi"].as_str().unwrap();
    assert!(version.starts_with("3."), "openapi: {version}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let paths = doc["paths"].as_object().unwrap();
    assert!(!paths.is_empty());
    let mut ids = BTreeSet::new();
    for (path, item) in paths {
        assert!(path.starts_with("/1.0"), "{path}");
        let wanted: BTreeSet<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .map(String::from)
            .collect();
        for (method, op) in item.as_object().unwrap() {
            assert!(
                ["get", "put", "post", "delete", "patch"].contains(&method.as_str()),
                "{method} {path}"
            );
            let responses = op["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {path}: no responses");
            for (code, r) in responses {
                assert!(code.parse::<u16>().is_ok(), "{method} {path}: {code}");
                assert!(r["description"].is_string(), "{method} {path} {code}");
            }
            let declared: BTreeSet<String> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| {
                    assert_eq!(p["required"], true, "{method} {path}: {p}");
                    p["name"].as_str().unwrap().to_string()
                })
                .collect();
            assert_eq!(declared, wanted, "{method} {path}: path parameters");
            assert!(
                ids.insert(op["operationId"].as_str().unwrap().to_string()),
                "{method} {path}: operationId used twice"
            );
        }
    }
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{r} does not resolve"
        );
    }
}

/// Calls every route and method the served document names, with objects that exist (a VM,
/// an operation), and checks that none is an unknown route (404 "no such route") or method
/// (405), and that each answers a code it documents.
#[test]
fn every_documented_route_answers() {
    let d = start_vmed("routes");
    let s = d.socket.as_path();
    let (code, doc) = http(s, "GET", "/1.0/openapi.json", "");
    assert_eq!(code, 200);
    let served: Value = serde_json::from_str(vmed::api::openapi_text()).unwrap();
    assert_eq!(doc, served, "the served document is not the generated one");

    // Any file will do as a kernel: no VM is started here.
    let kernel = env!("CARGO_BIN_EXE_vmed");
    let create = |name: &str| json!({"name": name, "kernel": kernel}).to_string();
    let (code, v) = http(s, "POST", "/1.0/vms", &create("api-1"));
    assert_eq!(code, 201, "{v}");
    let ops = http(s, "GET", "/1.0/operations", "").1;
    let id = ops["metadata"][0]["id"].as_str().unwrap().to_string();

    let bodies: HashMap<(&str, &str), String> = HashMap::from([
        (("post", "/1.0/vms"), create("api-2")),
        (
            ("put", "/1.0/vms/{name}/state"),
            r#"{"action":"stop"}"#.into(),
        ),
        // An empty archive, a signature that is none, an alias of no image: documented
        // 400s and 404s.
        (("post", "/1.0/images"), String::new()),
        (("put", "/1.0/images/{name}/signature"), "{}".into()),
        (
            ("post", "/1.0/images/aliases"),
            r#"{"name":"x","target":"api-1"}"#.into(),
        ),
        // The VM has no disk to publish: a documented 400.
        (
            ("post", "/1.0/vms/{name}/publish"),
            r#"{"image":"api-pub"}"#.into(),
        ),
        // The VM is not running: a documented 409.
        (
            ("post", "/1.0/vms/{name}/exec"),
            r#"{"command":["true"]}"#.into(),
        ),
        // Access control (root is the admin): no user or project named api-1, a 409.
        (("put", "/1.0/images/{name}/access"), "{}".into()),
        (
            ("put", "/1.0/vms/{name}/label"),
            r#"{"label":"secret"}"#.into(),
        ),
        (("post", "/1.0/users"), r#"{"name":"u1"}"#.into()),
        (("put", "/1.0/users/{name}"), "{}".into()),
        (
            ("put", "/1.0/users/{name}/role"),
            r#"{"project":"default","role":"user"}"#.into(),
        ),
        (("post", "/1.0/projects"), r#"{"name":"p1"}"#.into()),
        (("put", "/1.0/projects/{name}"), r#"{"quota":{}}"#.into()),
        (("post", "/1.0/tokens"), "{}".into()),
    ]);
    let mut calls: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            calls.push((method.clone(), path.clone()));
        }
    }
    // Deletes last, so the objects are there for the rest.
    calls.sort_by_key(|(m, _)| m == "delete");
    for (method, path) in calls {
        let op = &doc["paths"][&path][&method];
        let body = match bodies.get(&(method.as_str(), path.as_str())) {
            Some(b) => b.clone(),
            None => {
                assert!(
                    op["requestBody"].is_null(),
                    "{method} {path} takes a body: add one to this test"
                );
                String::new()
            }
        };
        let url = path.replace("{name}", "api-1").replace("{id}", &id);
        let (code, head) = head(s, &method.to_uppercase(), &url, &body);
        assert_ne!(code, 405, "{method} {url}: {head}");
        if code == 404 {
            let (_, v) = http(s, &method.to_uppercase(), &url, &body);
            assert!(
                !v["error"].as_str().unwrap_or("").contains("no such route"),
                "{method} {url} is documented but not routed: {v}"
            );
        }
        assert!(
            op["responses"][code.to_string()].is_object(),
            "{method} {url} answered {code}, which it does not document"
        );
    }
    // The deletes did their work: the VM and the operation (finished: not cancelled).
    assert_eq!(http(s, "GET", "/1.0/vms/api-1", "").0, 404);
    assert_eq!(http(s, "GET", &format!("/1.0/operations/{id}"), "").0, 200);

    // Unknown routes and methods, in the error shape.
    let (code, v) = http(s, "GET", "/1.0/nothing", "");
    assert_eq!(code, 404);
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("no such route")
            && msg.contains("/1.0/operations")
            && msg.contains("/1.0/events"),
        "{msg}"
    );
    let (code, v) = http(s, "PATCH", "/1.0/vms", "");
    assert_eq!((code, v["type"].as_str()), (405, Some("error")), "{v}");
}

#[test]
fn operations_and_events_of_a_riscv64_vm() {
    let d = start_vmed("ops");
    let s = d.socket.as_path();
    let all = subscribe(s, "");
    let lifecycle_only = subscribe(s, "?type=lifecycle");
    assert_eq!(
        head(s, "GET", "/1.0/events?type=lifecycle,bogus", "").0,
        400
    );

    // An async create answers at once with its operation.
    let body = json!({"name": "o1", "arch": "riscv64", "kernel": image("Image"),
                      "initrd": image("initramfs.cpio"), "memory": "128M",
                      "restart_policy": "on-failure"});
    let (code, v) = http(s, "POST", "/1.0/vms?async=true", &body.to_string());
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["type"], "async");
    assert_eq!(v["status_code"], 100);
    let op = &v["metadata"];
    assert_eq!(
        v["operation"],
        format!("/1.0/operations/{}", op["id"].as_str().unwrap())
    );
    assert_eq!(op["class"], "task");
    assert_eq!(op["description"], "Creating VM o1");
    assert_eq!(op["resources"], json!({"vms": ["/1.0/vms/o1"]}));
    let wait = format!("{}/wait?timeout=30", v["operation"].as_str().unwrap());
    let (code, w) = http(s, "GET", &wait, "");
    assert_eq!(code, 200, "{w}");
    assert_eq!(w["metadata"]["status"], "Success", "{w}");
    assert_eq!(w["metadata"]["metadata"]["state"], "defined", "{w}");

    // Refusals come before any operation: synchronously, in the error shape.
    let before = http(s, "GET", "/1.0/operations", "").1["metadata"]
        .as_array()
        .unwrap()
        .len();
    let (code, v) = http(
        s,
        "PUT",
        "/1.0/vms/o1/state?async=true",
        r#"{"action":"pause"}"#,
    );
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["metadata"]["allowed_actions"], json!(["start", "delete"]));
    let (code, _) = http(
        s,
        "PUT",
        "/1.0/vms/nope/state?async=true",
        r#"{"action":"start"}"#,
    );
    assert_eq!(code, 404);
    let (code, _) = http(s, "POST", "/1.0/vms?async=true", &body.to_string());
    assert_eq!(code, 409, "the name is taken");
    let (code, _) = http(
        s,
        "PUT",
        "/1.0/vms/o1/state?async=maybe",
        r#"{"action":"start"}"#,
    );
    assert_eq!(code, 400);
    let after = http(s, "GET", "/1.0/operations", "").1["metadata"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after, "a refused request made an operation");

    // An async start: listed while it runs or after, waited on, a success with the VM.
    let (code, v) = http(
        s,
        "PUT",
        "/1.0/vms/o1/state?async=true",
        r#"{"action":"start"}"#,
    );
    assert_eq!(code, 202, "{v}");
    let id = v["metadata"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["metadata"]["description"], "Starting VM o1");
    let (_, list) = http(s, "GET", "/1.0/operations", "");
    assert!(
        list["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["id"] == id),
        "{list}"
    );
    let (code, w) = http(s, "GET", &format!("/1.0/operations/{id}/wait"), "");
    assert_eq!(code, 200);
    let op = &w["metadata"];
    assert_eq!(
        (op["status"].as_str(), op["status_code"].as_u64()),
        (Some("Success"), Some(200)),
        "{w}"
    );
    assert_eq!(op["metadata"]["state"], "running");
    assert_eq!(op["err"], "");
    let (code, v) = http(s, "DELETE", &format!("/1.0/operations/{id}"), "");
    assert_eq!(code, 409, "{v}");
    let (code, v) = http(
        s,
        "GET",
        "/1.0/operations/00000000-0000-4000-8000-000000000000",
        "",
    );
    assert_eq!(code, 404, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("see /1.0/operations"),
        "{v}"
    );

    // The supervisor's changes are events too: a killed monitor (a crash), then the restart
    // its policy makes, as an operation of its own.
    let (_, vm) = http(s, "GET", "/1.0/vms/o1", "");
    let pid = vm["metadata"]["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) with plain integers, on o1's monitor.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let seen = events_until(&all, |got| {
        transitions(got, "o1").contains(&"starting>running auto-restart".to_string())
            && got.iter().any(|e| {
                e["type"] == "operation"
                    && e["metadata"]["description"] == "Starting VM o1 again (its restart policy)"
                    && e["metadata"]["status"] == "Success"
            })
    });
    assert_eq!(
        transitions(&seen, "o1"),
        [
            "->defined create",
            "defined>starting start",
            "starting>running start",
            "running>crashed exit",
            "crashed>starting auto-restart",
            "starting>running auto-restart",
        ]
    );
    let crash = seen
        .iter()
        .find(|e| e["metadata"]["to"] == "crashed")
        .unwrap();
    assert!(
        crash["metadata"]["reason"]
            .as_str()
            .unwrap()
            .contains("killed by signal 9"),
        "{crash}"
    );
    for e in &seen {
        let t = e["timestamp"].as_str().unwrap();
        assert!(t.len() == 24 && t.ends_with('Z'), "{t}");
    }
    // Each operation was announced when made and when ended.
    for id in seen
        .iter()
        .filter(|e| e["type"] == "operation")
        .map(|e| e["metadata"]["id"].as_str().unwrap())
        .collect::<BTreeSet<_>>()
    {
        let statuses: Vec<_> = seen
            .iter()
            .filter(|e| e["type"] == "operation" && e["metadata"]["id"] == id)
            .map(|e| e["metadata"]["status"].as_str().unwrap())
            .collect();
        assert_eq!(statuses, ["Running", "Success"], "{id}");
    }

    // A synchronous stop (the default) is an operation as well, and the filter holds.
    let (code, v) = http(
        s,
        "PUT",
        "/1.0/vms/o1/state",
        r#"{"action":"stop","force":true}"#,
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["metadata"]["state"], "stopped");
    let seen = events_until(&all, |got| {
        transitions(got, "o1").contains(&"stopping>stopped stop".to_string())
    });
    assert!(
        seen.iter()
            .any(|e| e["type"] == "operation" && e["metadata"]["description"] == "Stopping VM o1"),
        "{seen:#?}"
    );
    let only = events_until(&lifecycle_only, |got| {
        transitions(got, "o1").contains(&"stopping>stopped stop".to_string())
    });
    assert!(only.iter().all(|e| e["type"] == "lifecycle"), "{only:#?}");
    let (code, _) = http(s, "DELETE", "/1.0/vms/o1", "");
    assert_eq!(code, 200);
    events_until(&all, |got| transitions(got, "o1") == ["stopped>- delete"]);
}
