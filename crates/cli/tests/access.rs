//! `vme project`, `vme user`, `vme token`, `vme role`, `vme label`, `vme whoami` and
//! `--token`/VME_TOKEN/`--project` against the real daemon.

mod cli_support;
use cli_support::{fails, ok, vme_env as vme};

#[path = "../../vmed/tests/support/mod.rs"]
mod support;
use support::Vmed;

#[test]
fn users_projects_tokens_roles_and_labels_from_the_cli() {
    let d = Vmed::start("cli-access", false, &[]);
    let s = d.socket.as_path();
    let root = |args: &[&str]| vme(s, &[], args);
    ok(root(&[
        "project",
        "create",
        "acme",
        "--quota",
        "vms=1,memory=1G",
    ]));
    ok(root(&[
        "user",
        "add",
        "alice",
        "--project",
        "acme",
        "--role",
        "user",
        "--clearance",
        "secret",
    ]));
    let users = ok(root(&["user", "list"]));
    assert!(
        users.contains("alice") && users.contains("acme:user"),
        "{users}"
    );
    let token = ok(root(&["token", "create", "alice", "--expires", "1h"]));
    let token = token.trim();
    assert!(token.starts_with("vme_"), "{token}");

    // --token and VME_TOKEN: alice, over root's uid.
    let me = ok(vme(s, &[], &["--token", token, "whoami"]));
    assert!(
        me.starts_with("alice (clearance secret; roles acme:user"),
        "{me}"
    );
    let me = ok(vme(s, &[("VME_TOKEN", token)], &["whoami"]));
    assert!(me.starts_with("alice"), "{me}");
    assert!(ok(root(&["whoami"])).starts_with("root"));
    let err = fails(vme(s, &[("VME_TOKEN", token)], &["user", "list"]));
    assert!(err.contains("admin"), "{err}");
    let err = fails(vme(s, &[], &["--token", "vme_1_2", "list"]));
    assert!(
        err.contains("VME_TOKEN"),
        "the 401 says how to authenticate: {err}"
    );

    // Projects and quotas, seen by alice.
    let projects = ok(vme(s, &[("VME_TOKEN", token)], &["project", "list"]));
    assert!(
        projects.contains("acme") && projects.contains("0/1"),
        "{projects}"
    );
    assert!(!projects.contains("default"), "{projects}");
    ok(root(&["project", "set", "acme", "--quota", "vms=3"]));
    assert!(ok(root(&["project", "list"])).contains("0/3"));

    // Roles: an auditor's token still reads, no longer acts.
    ok(root(&[
        "role",
        "set",
        "alice",
        "--project",
        "acme",
        "--role",
        "auditor",
    ]));
    let me = ok(vme(s, &[("VME_TOKEN", token)], &["whoami"]));
    assert!(me.contains("acme:auditor"), "{me}");

    // Labels: set on a user; a bad one is refused with the levels.
    ok(root(&["label", "set", "user", "alice", "confidential"]));
    assert!(ok(vme(s, &[("VME_TOKEN", token)], &["whoami"])).contains("clearance confidential"));
    let err = fails(root(&["label", "set", "user", "alice", "cosmic"]));
    assert!(err.contains("unclassified"), "{err}");

    // Tokens: listed without their secrets, revoked at once.
    let list = ok(root(&["token", "list"]));
    let id = token.split('_').nth(1).unwrap();
    assert!(list.contains(id) && !list.contains(token), "{list}");
    ok(root(&["token", "revoke", id]));
    let err = fails(vme(s, &[("VME_TOKEN", token)], &["whoami"]));
    assert!(err.contains("revoked"), "{err}");

    // --project names a project the user has no role in: as if it did not exist.
    ok(root(&["user", "add", "bob", "--project", "default"]));
    let t = ok(root(&["token", "create", "bob"]));
    let err = fails(vme(
        s,
        &[("VME_TOKEN", t.trim())],
        &["--project", "acme", "list"],
    ));
    assert!(err.contains("no project \"acme\""), "{err}");

    // Cleanup paths.
    ok(root(&["user", "rm", "alice"]));
    assert!(!ok(root(&["user", "list"])).contains("alice"));
    ok(root(&["project", "rm", "acme"]));
    let err = fails(root(&["project", "rm", "default"]));
    assert!(err.contains("cannot be removed"), "{err}");
}
