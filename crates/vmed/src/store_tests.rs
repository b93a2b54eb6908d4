//! The store's unit tests (migrations, group commit, VMs, names per project, samples).
use super::*;

fn id(name: &str) -> VmId {
    VmId::plain(name)
}

/// A fresh directory per call (tests run in parallel threads of one process).
fn temp_db() -> (std::path::PathBuf, std::path::PathBuf) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("vmed-store-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("state.db");
    (dir, db)
}

#[test]
fn migrations_run_once_and_survive_reopen() {
    let (dir, db) = temp_db();
    let mut s = SqliteStore::open(&db).unwrap();
    assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
    s.create(
        &id("a"),
        &MachineSpec::new("/k"),
        RestartPolicy::Never,
        &VmLimits::default(),
    )
    .unwrap();
    drop(s);
    let s = SqliteStore::open(&db).unwrap();
    assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
    assert_eq!(s.list().unwrap().len(), 1);
    let mode: String = s
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = s
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 1, "synchronous=NORMAL: the barrier flushes");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Writers that reach the barrier together share flushes, each returns only after a
/// flush that began after its write, and a caller with nothing new does not flush.
#[test]
fn concurrent_writers_share_the_flushes() {
    let (dir, db) = temp_db();
    let store = Arc::new(Mutex::new(SqliteStore::open(&db).unwrap()));
    let barrier = store
        .lock()
        .unwrap()
        .barrier()
        .expect("a file store has a barrier");
    let before = barrier.flushes();
    const WRITERS: usize = 16;
    let gate = Arc::new(std::sync::Barrier::new(WRITERS));
    let threads: Vec<_> = (0..WRITERS)
        .map(|i| {
            let (store, barrier, gate) = (store.clone(), barrier.clone(), gate.clone());
            std::thread::spawn(move || {
                gate.wait();
                let mark = {
                    let mut s = store.lock().unwrap();
                    let limits = VmLimits::default();
                    s.create(
                        &id(&format!("vm{i}")),
                        &MachineSpec::new("/k"),
                        RestartPolicy::Never,
                        &limits,
                    )
                    .unwrap();
                    s.write_mark()
                };
                barrier.sync(mark);
                let s = barrier.state.lock().unwrap();
                assert!(
                    s.synced >= mark,
                    "sync({mark}) returned with {} synced",
                    s.synced
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let flushes = barrier.flushes() - before;
    assert!((1..=WRITERS as u64).contains(&flushes), "{flushes} flushes");
    let mark = store.lock().unwrap().write_mark();
    barrier.sync(mark);
    assert_eq!(barrier.flushes() - before, flushes, "nothing new, no flush");
    eprintln!("{WRITERS} concurrent writers, {flushes} flushes");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A database left by a vmed that knew only the first migration is brought up to date
/// with its records intact.
#[test]
fn an_old_database_is_migrated_in_order() {
    let (dir, db) = temp_db();
    let c = Connection::open(&db).unwrap();
    c.execute_batch(&format!(
        "CREATE TABLE schema_version (version INTEGER NOT NULL);
         INSERT INTO schema_version VALUES (1); {};
         INSERT INTO vms VALUES ('old', '{{\"kernel\":\"/k\"}}', 'stopped', '', 1, 2);",
        MIGRATIONS[0]
    ))
    .unwrap();
    drop(c);
    let mut s = SqliteStore::open(&db).unwrap();
    assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
    let r = s.get("old").unwrap();
    assert_eq!((r.state, r.pid, r.created_at), (State::Stopped, 0, 1));
    assert_eq!((r.name.as_str(), r.project.as_str()), ("old", "default"));
    assert_eq!(s.find("old").unwrap().len(), 1, "found by its name");
    assert_eq!(r.restart_policy, RestartPolicy::Never);
    s.set_pid("old", 42).unwrap();
    assert_eq!(s.get("old").unwrap().pid, 42);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_newer_schema_is_refused() {
    let (dir, db) = temp_db();
    drop(SqliteStore::open(&db).unwrap());
    let c = Connection::open(&db).unwrap();
    c.execute("UPDATE schema_version SET version = 99", [])
        .unwrap();
    drop(c);
    let e = SqliteStore::open(&db).err().unwrap();
    assert!(e.to_string().contains("newer vmed"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Names are unique per project; a VM stored before that keeps its key (its name), and
/// a new VM of that name in `default` then takes the `default_NAME` key.
#[test]
fn names_are_per_project_and_old_keys_stay() {
    let mut s = SqliteStore::open_in_memory().unwrap();
    let (spec, none) = (MachineSpec::new("/k"), VmLimits::default());
    // As migrated: acme's `web`, keyed `web`.
    let old = VmId {
        key: "web".into(),
        name: "web".into(),
        project: "acme".into(),
    };
    s.create(&old, &spec, RestartPolicy::Never, &none).unwrap();
    assert!(matches!(
        s.new_key("acme", "web"),
        Err(StoreError::Exists(_))
    ));
    assert_eq!(s.new_key("globex", "web").unwrap(), "globex_web");
    assert_eq!(s.new_key("default", "web").unwrap(), "default_web");
    assert_eq!(s.new_key("default", "db").unwrap(), "db");
    for project in ["globex", "default"] {
        let key = s.new_key(project, "web").unwrap();
        let id = VmId {
            key,
            name: "web".into(),
            project: project.into(),
        };
        s.create(&id, &spec, RestartPolicy::Never, &none).unwrap();
    }
    let found: Vec<_> = s
        .find("web")
        .unwrap()
        .into_iter()
        .map(|v| (v.project, v.key))
        .collect();
    assert_eq!(
        found,
        [
            ("acme".to_string(), "web".to_string()),
            ("default".to_string(), "default_web".to_string()),
            ("globex".to_string(), "globex_web".to_string())
        ]
    );
    // (project, name) is unique even under a fresh key.
    let again = VmId {
        key: "other".into(),
        ..old
    };
    assert!(matches!(
        s.create(&again, &spec, RestartPolicy::Never, &none),
        Err(StoreError::Exists(_))
    ));
}

#[test]
fn crud() {
    let mut s = SqliteStore::open_in_memory().unwrap();
    let mut spec = MachineSpec::new("/boot/Image");
    spec.vcpus = 3;
    let r = s
        .create(
            &id("web"),
            &spec,
            RestartPolicy::Always,
            &VmLimits::default(),
        )
        .unwrap();
    assert_eq!(r.restart_policy, RestartPolicy::Always);
    assert_eq!((r.state, r.spec.vcpus), (State::Defined, 3));
    assert!(matches!(
        s.create(
            &id("web"),
            &spec,
            RestartPolicy::Never,
            &VmLimits::default()
        ),
        Err(StoreError::Exists(_))
    ));
    s.create(&id("db"), &spec, RestartPolicy::Never, &VmLimits::default())
        .unwrap();
    let names: Vec<_> = s.list().unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["db", "web"]);
    s.set_state("web", State::Crashed, "boom").unwrap();
    let r = s.get("web").unwrap();
    assert_eq!((r.state, r.reason.as_str()), (State::Crashed, "boom"));
    s.delete("web").unwrap();
    assert!(matches!(s.get("web"), Err(StoreError::NotFound(_))));
    assert!(matches!(s.delete("web"), Err(StoreError::NotFound(_))));
    assert!(matches!(
        s.set_state("web", State::Running, ""),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn samples_are_stored_queried_pruned_and_go_with_their_vm() {
    let mut s = SqliteStore::open_in_memory().unwrap();
    let spec = MachineSpec::new("/k");
    for n in ["a", "b"] {
        s.create(&id(n), &spec, RestartPolicy::Never, &VmLimits::default())
            .unwrap();
    }
    let at = |vm: &str, at_ms: i64, cpu_usec: u64| Sample {
        vm: vm.into(),
        at_ms,
        pid: 9,
        cpu_usec,
        net_tx_bytes: u64::MAX,
        ..Sample::default()
    };
    s.add_samples(&[at("a", 1000, 1), at("b", 1000, 5), at("gone", 1000, 7)])
        .unwrap();
    s.add_samples(&[at("a", 2000, 2), at("a", 3000, 3)])
        .unwrap();
    let a = s.samples("a", 0).unwrap();
    assert_eq!(a.iter().map(|x| x.cpu_usec).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(a[0].net_tx_bytes, i64::MAX as u64, "clamped, not wrapped");
    assert_eq!(s.samples("a", 2000).unwrap().len(), 2);
    assert!(
        s.samples("gone", 0).unwrap().is_empty(),
        "no VM, no samples"
    );
    let latest: Vec<_> = s
        .latest_samples()
        .unwrap()
        .into_iter()
        .map(|x| (x.vm, x.at_ms))
        .collect();
    assert_eq!(latest, [("a".to_string(), 3000), ("b".to_string(), 1000)]);
    s.delete("b").unwrap();
    assert_eq!(
        s.latest_samples().unwrap().len(),
        1,
        "b's samples went with it"
    );
    assert_eq!(s.prune_samples(2000).unwrap(), 1);
    assert_eq!(s.samples("a", 0).unwrap().len(), 2);
}
