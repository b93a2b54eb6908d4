//! The log's unit tests, and the append benchmark.

use super::*;

fn rec(seq: u64) -> Record {
    Record {
        seq,
        kind: RecordKind::Request,
        time: "2026-12-03T02:00:00.000Z".into(),
        actor: "alice".into(),
        project: Some("acme".into()),
        action: "vm.create".into(),
        object: "vm/acme/web".into(),
        label: None,
        result: Outcome::Allowed,
        status: 201,
        source: "unix:uid=1000".into(),
        detail: String::new(),
        prev_hash: hex(&GENESIS),
        hash: String::new(),
    }
}

#[test]
fn the_encoding_is_length_prefixed_in_a_fixed_order() {
    let e = rec(7).canonical();
    assert_eq!(&e[..5], b"\0\0\0\x017");
    assert_eq!(&e[5..9], &7u32.to_be_bytes());
    assert_eq!(&e[9..16], b"request");
    // A field's bytes cannot spill into the next: "ab"+"c" differs from "a"+"bc".
    let (mut a, mut b) = (rec(1), rec(1));
    a.actor = "ab".into();
    a.project = Some("c".into());
    b.actor = "a".into();
    b.project = Some("bc".into());
    assert_ne!(a.compute_hash(&GENESIS), b.compute_hash(&GENESIS));
    // The seq is covered: the same content at another place hashes differently.
    assert_ne!(rec(1).compute_hash(&GENESIS), rec(2).compute_hash(&GENESIS));
}

#[test]
fn hex_round_trips() {
    let h = rec(1).compute_hash(&GENESIS);
    assert_eq!(unhex32(&hex(&h)), Some(h));
    assert_eq!(unhex32("zz"), None);
    assert_eq!(unhex32(&"g".repeat(64)), None);
}

#[test]
fn a_security_event_is_a_durable_chained_record() {
    let dir = std::env::temp_dir().join(format!("vme-audit-sec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let events = Events::new();
    let mut rx = events.subscribe();
    let cfg = AuditConfig {
        anchor_every: 1,
        ..AuditConfig::default()
    };
    let log = AuditLog::open(&dir, cfg, events).unwrap();
    let seq = log
        .security_event(
            "monitor.seccomp-kill",
            "vm/web",
            "monitor:pid=42",
            "vme-vmm: seccomp: thread vcpu made forbidden syscall 57 (fork)",
        )
        .unwrap();
    assert_eq!(seq, 1);
    let q = Query {
        kind: Some(RecordKind::Security),
        ..Query::default()
    };
    let r = &log.list(&q).unwrap()[0];
    assert_eq!(
        (r.actor.as_str(), r.result, r.status),
        ("vmed", Outcome::Denied, 0)
    );
    assert_eq!(
        (r.action.as_str(), r.object.as_str()),
        ("monitor.seccomp-kill", "vm/web")
    );
    assert!(r.detail.contains("fork"));
    assert_eq!(r.prev_hash, hex(&GENESIS));
    // Anchored (every record here) and published.
    // The anchor follows the reply (the record is durable first).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let ev = loop {
        match rx.try_recv() {
            Ok(ev) => break ev,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("no anchor event: {e}"),
        }
    };
    assert_eq!(ev.kind, EventKind::AuditAnchor);
    assert_eq!(ev.metadata["hash"], r.hash);
    let anchors = std::fs::read_to_string(dir.join(ANCHORS_FILE)).unwrap();
    assert!(anchors.starts_with(&format!("1 {} ", r.hash)), "{anchors}");
    log.close();
    // Reopened, the chain goes on from its head.
    let log = AuditLog::open(&dir, cfg, Events::new()).unwrap();
    assert_eq!(log.security_event("x", "", "", "").unwrap(), 2);
    // Its anchor follows the append (the record is durable first): wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let v = loop {
        let v = log.verify().unwrap();
        if v.anchors == 2 || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(v.ok && v.records == 2 && v.anchors == 2, "{v:?}");
    log.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn long_fields_are_capped() {
    let s = cap("é".repeat(5000));
    assert!(s.len() <= FIELD_MAX + 3 && s.ends_with('…'));
}

/// The cost of an append, printed (a benchmark, not a check): `cargo test --release -p vmed
/// --lib audit::bench -- --ignored --nocapture`.
mod bench {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore = "a benchmark: run it by name"]
    fn append_cost() {
        let dir = std::env::temp_dir().join(format!("vme-audit-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = AuditLog::open(&dir, AuditConfig::default(), Events::new()).unwrap();
        let entry = Entry {
            kind: RecordKind::Request,
            actor: "alice".into(),
            project: Some("acme".into()),
            action: "vm.create".into(),
            object: "vm/acme/web".into(),
            label: None,
            result: Outcome::Allowed,
            status: 201,
            source: "unix:uid=1000".into(),
            detail: String::new(),
        };
        let n = 500;
        let t = Instant::now();
        for _ in 0..n {
            log.append_blocking(entry.clone()).unwrap();
        }
        let one = t.elapsed() / n;
        // 20 appenders at once: the writer commits what has queued in one transaction.
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..20 {
                s.spawn(|| {
                    for _ in 0..n / 20 {
                        log.append_blocking(entry.clone()).unwrap();
                    }
                });
            }
        });
        let many = t.elapsed() / n;
        println!("append, one at a time: {one:?} each; 20 at once: {many:?} each (amortized)");
        assert!(log.verify().unwrap().ok);
        log.close();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
