//! The audit log against the real daemon, over real HTTP: what is recorded (state-changing
//! requests and refusals, not reads), the chain and its anchors, `vme audit verify` naming
//! the first bad record after each kind of tampering with the file (done with SQLite
//! directly, the daemon stopped), an export checked by a computation of its own here, and a
//! record that survives a kill -9 right after its request. No VM boots.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod support;
use support::{Vmed, bin, gather, http, send};

/// Any file will do as a kernel: no VM is started here.
fn create_body(name: &str) -> String {
    json!({"name": name, "kernel": env!("CARGO_BIN_EXE_vmed")}).to_string()
}

/// `vme --socket S ARGS`: exit status, stdout, stderr.
fn vme(d: &Vmed, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("vme"))
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn records(d: &Vmed) -> Vec<Value> {
    let (code, v) = http(&d.socket, "GET", "/1.0/audit?limit=1000", "");
    assert_eq!(code, 200, "{v}");
    v["metadata"].as_array().unwrap().clone()
}

/// An export's records checked the way docs/audit.md tells a third party to, without
/// vmed's code: each hash is SHA-256(previous hash ‖ length-prefixed fields).
fn check_export(text: &str) -> usize {
    let mut prev = [0u8; 32];
    let mut n = 0;
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        n += 1;
        assert_eq!(r["seq"], n as u64, "{line}");
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let fields = [
            r["seq"].to_string(),
            s("kind"),
            s("time"),
            s("actor"),
            s("project"),
            s("action"),
            s("object"),
            s("label"),
            s("result"),
            r["status"].to_string(),
            s("source"),
            s("detail"),
        ];
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&prev);
        for f in &fields {
            ctx.update(&(f.len() as u32).to_be_bytes());
            ctx.update(f.as_bytes());
        }
        let h = ctx.finish();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(s("prev_hash"), hex(&prev), "record {n}");
        assert_eq!(s("hash"), hex(h.as_ref()), "record {n}");
        prev.copy_from_slice(h.as_ref());
    }
    n
}

#[test]
fn state_changes_and_refusals_are_recorded_and_the_chain_verifies() {
    let d = Vmed::start("audit-records", false, &["--audit-anchor-every", "2"]);
    let s = d.socket.as_path();
    // Anchors are published on the event stream.
    let stream = send(s, "GET", "/1.0/events?type=audit-anchor", "");
    stream.set_read_timeout(None).unwrap();
    let seen = gather(stream);
    std::thread::sleep(Duration::from_millis(200));

    let (code, v) = http(s, "POST", "/1.0/vms", &create_body("a1"));
    assert_eq!(code, 201, "{v}");
    // Reads, successful or not, are not recorded.
    assert_eq!(http(s, "GET", "/1.0/vms", "").0, 200);
    assert_eq!(http(s, "GET", "/1.0/vms/a1", "").0, 200);
    assert_eq!(http(s, "GET", "/1.0/vms/nope", "").0, 404);
    assert_eq!(http(s, "POST", "/1.0/vms", &create_body("a1")).0, 409);
    assert_eq!(http(s, "POST", "/1.0/vms", "{\"bogus\": 1}").0, 400);
    assert_eq!(http(s, "DELETE", "/1.0/vms/a1", "").0, 200);
    assert_eq!(
        http(s, "PUT", "/1.0/vms/nope/state", r#"{"action":"start"}"#).0,
        404
    );

    let recs = records(&d);
    let got: Vec<(u64, &str, u64, &str)> = recs
        .iter()
        .map(|r| {
            (
                r["seq"].as_u64().unwrap(),
                r["action"].as_str().unwrap(),
                r["status"].as_u64().unwrap(),
                r["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "vm.create", 201, "allowed"),
            (2, "vm.create", 409, "allowed"),
            (3, "vm.create", 400, "allowed"),
            (4, "vm.delete", 200, "allowed"),
            (5, "vm.state", 404, "allowed"),
        ]
    );
    // SAFETY: getuid(2) has no preconditions.
    let source = format!("unix:uid={}", unsafe { libc::getuid() });
    for r in &recs {
        // The socket's peer, whatever the access-control layer says (or does not).
        assert_eq!(r["source"].as_str(), Some(source.as_str()));
        // The access-control layer's facts: uid 0 on the socket is the bootstrap admin.
        assert_eq!(
            (r["kind"].as_str(), r["actor"].as_str()),
            (Some("request"), Some("root"))
        );
        let t = r["time"].as_str().unwrap();
        assert!(
            t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{t}"
        );
        assert_eq!(r["hash"].as_str().unwrap().len(), 64);
    }
    assert!(
        recs[1]["detail"]
            .as_str()
            .unwrap()
            .contains("already exists"),
        "{}",
        recs[1]
    );
    assert!(
        recs[2]["detail"]
            .as_str()
            .unwrap()
            .contains("invalid request body")
    );
    assert_eq!(recs[3]["prev_hash"], recs[2]["hash"]);

    // Filters, and the CLI.
    let (code, v) = http(s, "GET", "/1.0/audit?action=vm.create&limit=2", "");
    assert_eq!(code, 200);
    let seqs: Vec<_> = v["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].clone())
        .collect();
    assert_eq!(
        seqs,
        vec![json!(2), json!(3)],
        "newest last, the newest two"
    );
    assert_eq!(http(s, "GET", "/1.0/audit?result=maybe", "").0, 400);
    assert_eq!(
        http(s, "GET", "/1.0/audit?result=denied", "").1["metadata"],
        json!([])
    );
    let (code, out, err) = vme(&d, &["audit", "list", "--action", "vm.delete"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("SEQ") && out.contains("allowed 200"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 2, "{out}");
    let (code, out, err) = vme(&d, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("ok: 5 records, 2 anchors; head 5 "),
        "{out}"
    );
    let (code, v) = http(s, "GET", "/1.0/audit/verify", "");
    assert_eq!(code, 200);
    assert_eq!(
        (
            v["metadata"]["ok"].clone(),
            v["metadata"]["records"].clone()
        ),
        (json!(true), json!(5))
    );

    // Anchors: every second record, in the file and on the stream.
    let anchors = std::fs::read_to_string(d.dir.join("state/audit.anchors")).unwrap();
    let lines: Vec<_> = anchors.lines().collect();
    assert_eq!(lines.len(), 2, "{anchors}");
    assert!(lines[0].starts_with(&format!("2 {} ", recs[1]["hash"].as_str().unwrap())));
    assert!(lines[1].starts_with("4 "));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        if text.contains("\"audit-anchor\"") && text.contains(recs[3]["hash"].as_str().unwrap()) {
            break;
        }
        assert!(Instant::now() < deadline, "no audit-anchor event: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The export, checked independently; to a file and to stdout alike.
    let file = d.dir.join("audit.jsonl");
    let (code, _, err) = vme(&d, &["audit", "export", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(check_export(&text), 5);
    let (code, out, _) = vme(&d, &["audit", "export"]);
    assert_eq!((code, out), (0, text));
}

/// What a tamperer does to the file, with the daemon stopped.
fn tamper(db: &Path, sql: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    // The triggers refuse changes first...
    if !sql.starts_with("INSERT") {
        let refused = c.execute_batch(sql);
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("append-only")),
            "{refused:?}"
        );
    }
    // ... until dropped, which whoever can write the file can do.
    c.execute_batch(&format!(
        "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete; {sql}"
    ))
    .unwrap();
}

/// Recomputes every hash from record `from` on, as a tamperer who knows the format would
/// after editing a record: the chain then holds, and only the anchors can tell.
fn rechain(db: &Path, from: i64) {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut rows: Vec<(i64, Vec<String>, i64)> = c
        .prepare(
            "SELECT seq, kind, time, actor, project, action, object, label, result, \
                  status, source, detail FROM audit ORDER BY seq",
        )
        .unwrap()
        .query_map([], |r| {
            let f: Vec<String> = (1..=8).chain(10..=11).map(|i| r.get(i).unwrap()).collect();
            Ok((r.get(0)?, f, r.get(9)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut prev = [0u8; 32];
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    for (seq, f, status) in rows.drain(..) {
        let fields = [
            seq.to_string(),
            f[0].clone(),
            f[1].clone(),
            f[2].clone(),
            f[3].clone(),
            f[4].clone(),
            f[5].clone(),
            f[6].clone(),
            f[7].clone(),
            status.to_string(),
            f[8].clone(),
            f[9].clone(),
        ];
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&prev);
        for x in &fields {
            ctx.update(&(x.len() as u32).to_be_bytes());
            ctx.update(x.as_bytes());
        }
        let h = ctx.finish();
        if seq >= from {
            c.execute(
                "UPDATE audit SET prev_hash = ?1, hash = ?2 WHERE seq = ?3",
                rusqlite::params![hex(&prev), hex(h.as_ref()), seq],
            )
            .unwrap();
        }
        prev.copy_from_slice(h.as_ref());
    }
}

/// One way of spoiling the log's file.
type Spoil = dyn Fn(&Path);

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn verify_names_the_first_edited_dropped_swapped_or_truncated_record() {
    let mut d = Vmed::start("audit-tamper", false, &["--audit-anchor-every", "3"]);
    for i in 0..4 {
        let name = format!("t{i}");
        assert_eq!(
            http(&d.socket, "POST", "/1.0/vms", &create_body(&name)).0,
            201
        );
        let path = format!("/1.0/vms/{name}");
        assert_eq!(http(&d.socket, "DELETE", &path, "").0, 200);
    }
    assert_eq!(vme(&d, &["audit", "verify"]).0, 0);
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    // 8 records, anchored at 3 and 6.
    let state = d.dir.join("state");
    let pristine: PathBuf = d.dir.join("pristine");
    copy_dir(&state, &pristine);
    let db = state.join("audit.db");

    let cases: [(&str, &Spoil, &str); 6] = [
        (
            "edit",
            &|db| tamper(db, "UPDATE audit SET actor = 'mallory' WHERE seq = 4"),
            "record 4: hash does not match its content (edited)",
        ),
        (
            "delete",
            &|db| tamper(db, "DELETE FROM audit WHERE seq = 5"),
            "record 5 missing (dropped)",
        ),
        (
            "swap",
            &|db| {
                tamper(
                    db,
                    "UPDATE audit SET seq = 100 WHERE seq = 2; \
                     UPDATE audit SET seq = 2 WHERE seq = 3; \
                     UPDATE audit SET seq = 3 WHERE seq = 100",
                )
            },
            "record 2: holds record 3's content (reordered",
        ),
        (
            "truncate",
            &|db| tamper(db, "DELETE FROM audit WHERE seq >= 5"),
            "records 5 to 6 missing (dropped: line 2 of the anchors recorded record 6",
        ),
        (
            "rewrite",
            &|db| {
                tamper(db, "UPDATE audit SET actor = 'mallory' WHERE seq = 2");
                rechain(db, 2);
            },
            "record 3: its hash is not the one line 1 of the anchors recorded",
        ),
        (
            "insert",
            &|db| {
                tamper(
                    db,
                    "INSERT INTO audit SELECT 9, kind, time, actor, project, action, object, \
                     label, result, status, source, detail, prev_hash, hash FROM audit \
                     WHERE seq = 8",
                )
            },
            "record 9: holds record 8's content",
        ),
    ];
    for (what, spoil, want) in cases {
        copy_dir(&pristine, &state);
        spoil(&db);
        d.launch(None);
        let (code, out, err) = vme(&d, &["audit", "verify"]);
        assert_eq!(code, 1, "{what}: {out}{err}");
        assert!(err.contains(want), "{what}: want {want:?}, got {err}");
        let (_, v) = http(&d.socket, "GET", "/1.0/audit/verify", "");
        assert_eq!(v["metadata"]["ok"], json!(false), "{what}");
        d.child.kill().unwrap();
        d.child.wait().unwrap();
    }
    // The untouched copy still verifies (the cases did not share one spoiled file).
    copy_dir(&pristine, &state);
    d.launch(None);
    let (code, out, err) = vme(&d, &["audit", "verify", "--format", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["records"], 8);
}

#[test]
fn a_record_survives_a_kill_9_right_after_its_request() {
    let mut d = Vmed::start("audit-kill9", false, &[]);
    let (code, v) = http(&d.socket, "POST", "/1.0/vms", &create_body("k1"));
    assert_eq!(code, 201, "{v}");
    // Killed at once: the reply came only after the record was synced.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let c = rusqlite::Connection::open(d.dir.join("state/audit.db")).unwrap();
    let (seq, action, status): (i64, String, i64) = c
        .query_row("SELECT seq, action, status FROM audit", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((seq, action.as_str(), status), (1, "vm.create", 201));
    drop(c);
    // Not anchored before the kill (every 100 records by default): it is once vmed is back.
    let anchors = d.dir.join("state/audit.anchors");
    assert!(!anchors.exists());
    d.launch(None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&anchors).is_ok_and(|a| a.starts_with("1 ")) {
        assert!(
            Instant::now() < deadline,
            "record 1 was not anchored at startup"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(http(&d.socket, "DELETE", "/1.0/vms/k1", "").0, 200);
    let (code, out, err) = vme(&d, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok: 2 records"), "{out}");
}

#[test]
fn a_log_that_cannot_be_written_stops_state_changes() {
    let mut d = Vmed::start("audit-broken", false, &[]);
    assert_eq!(
        http(&d.socket, "POST", "/1.0/vms", &create_body("f1")).0,
        201
    );
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    // The database now refuses every append (as a full or failing disk would).
    let c = rusqlite::Connection::open(d.dir.join("state/audit.db")).unwrap();
    c.execute_batch(
        "CREATE TRIGGER no_insert BEFORE INSERT ON audit \
         BEGIN SELECT RAISE(ABORT, 'disk says no'); END;",
    )
    .unwrap();
    drop(c);
    d.launch(None);
    // Carried out, but the client is told it went unrecorded...
    let (code, v) = http(&d.socket, "DELETE", "/1.0/vms/f1", "");
    assert_eq!(code, 500, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("carried out") && msg.contains("disk says no"),
        "{msg}"
    );
    // ... and nothing more changes until the log can be written.
    let (code, v) = http(&d.socket, "POST", "/1.0/vms", &create_body("f2"));
    assert_eq!(code, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("audit log"), "{v}");
    let (code, v) = http(&d.socket, "GET", "/1.0/vms", "");
    assert_eq!((code, v["metadata"].clone()), (200, json!([])));
}
