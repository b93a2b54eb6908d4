//! Access control against the real daemon over real HTTP: every route of the OpenAPI
//! document mediated (401 without an identity, 404/403 for another project's user, through
//! for the right role); one user cannot see or touch another's VMs and private images;
//! quotas; role changes at the next request; labels; revoked and expired tokens; a non-root
//! uid mapped to a user over the Unix socket (SO_PEERCRED). No VM boots.

use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

mod support;
#[path = "support/tenants.rs"]
mod tenants;
use support::{Vmed, image};
use tenants::{api, import, raw, user};

fn vm_from(image: &str, name: &str) -> Value {
    json!({"name": name, "image": image})
}

/// Every route in the OpenAPI document: 401 with a bad token; 403 or 404 for a user of
/// another project (and nothing of the owner's in what it may list); through for the
/// right role (not 401, 403 or 404).
#[test]
fn every_route_is_mediated() {
    let d = Vmed::start("access-routes", false, &[]);
    let alice = user(&d, "alice", "acme", "user", "topsecret");
    let bob = user(&d, "bob", "globex", "operator", "topsecret");
    let (c, b) = import(&d, Some(&bob), "img-b", "");
    assert_eq!(c, 201, "{b}");
    let (c, v) = api(
        &d,
        Some(&bob),
        "POST",
        "/1.0/vms?async=true",
        vm_from("img-b", "vm-b"),
    );
    assert_eq!(c, 202, "{v}");
    let op = v["metadata"]["id"].as_str().unwrap().to_string();
    let (c, _) = api(
        &d,
        Some(&bob),
        "GET",
        &format!("/1.0/operations/{op}/wait"),
        Value::Null,
    );
    assert_eq!(c, 200);
    let (c, v) = api(
        &d,
        Some(&bob),
        "POST",
        "/1.0/images/aliases",
        json!({"name": "alias-b", "target": "img-b"}),
    );
    assert_eq!(c, 200, "{v}");
    let (_, v) = api(&d, Some(&bob), "GET", "/1.0/tokens", Value::Null);
    let bob_token_id = v["metadata"][0]["id"].as_str().unwrap().to_string();

    let (c, doc) = api(&d, None, "GET", "/1.0/openapi.json", Value::Null);
    assert_eq!(c, 200);
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let concrete = if path.starts_with("/1.0/vms/") {
                path.replace("{name}", "vm-b")
            } else if path.starts_with("/1.0/images/aliases/") {
                path.replace("{name}", "alias-b")
            } else if path.starts_with("/1.0/images/") {
                path.replace("{name}", "img-b")
            } else if path.starts_with("/1.0/users/") {
                path.replace("{name}", "bob")
            } else if path.starts_with("/1.0/projects/") {
                path.replace("{name}", "globex")
            } else if path.starts_with("/1.0/tokens/") {
                path.replace("{id}", &bob_token_id)
            } else if path.starts_with("/1.0/operations/") {
                path.replace("{id}", &op)
            } else {
                path.clone()
            };
            assert!(!concrete.contains('{'), "no value for {path}'s parameter");
            routes.push((method.to_uppercase(), path.clone(), concrete));
        }
    }
    assert!(routes.len() >= 40, "{} routes", routes.len());
    let streams = |p: &str| p.ends_with("/events") || p.ends_with("/export");
    let wait = |p: &str| {
        if p.ends_with("/wait") {
            format!("{p}?timeout=1")
        } else {
            p.to_string()
        }
    };

    // Unauthenticated: a token no one has.
    for (m, _, p) in &routes {
        let (c, body) = raw(&d.socket, m, &wait(p), Some("vme_0_nope"), b"{}", false);
        assert_eq!(c, 401, "{m} {p} answered {c} without an identity: {body}");
        assert!(body.contains("--token"), "the 401 says how: {body}");
    }
    // Another project's user.
    for (m, t, p) in &routes {
        let (c, body) = raw(&d.socket, m, &wait(p), Some(&alice), b"{}", streams(p));
        if t.contains('{') {
            // 404 or 403; or else exactly what the same request about a missing object
            // gets (a bad body is a 400 either way): existence is never disclosed.
            let ghost = t
                .replace("{name}", "nothing-here")
                .replace("{id}", "nothing-here");
            let (c2, body2) = raw(&d.socket, m, &wait(&ghost), Some(&alice), b"{}", streams(p));
            let same = (c, body.clone())
                == (
                    c2,
                    body2.replace(
                        "nothing-here",
                        p.rsplit('/')
                            .find(|s| {
                                [
                                    "vm-b",
                                    "img-b",
                                    "alias-b",
                                    "bob",
                                    "globex",
                                    &op,
                                    &bob_token_id,
                                ]
                                .contains(s)
                            })
                            .unwrap_or("?"),
                    ),
                );
            assert!(
                c == 404 || c == 403 || same,
                "{m} {p} answered {c} to another project's user: {body} (missing: {c2} {body2})"
            );
            assert!(
                !(200..300).contains(&c),
                "{m} {p} let another project's user through"
            );
            if t.starts_with("/1.0/vms/") || t.starts_with("/1.0/images/") {
                assert!(
                    c == 404 || same,
                    "{m} {p}: another project's object is not disclosed"
                );
            }
        } else {
            assert_ne!(c, 401, "{m} {p}");
            for secret in ["vm-b", "img-b", "alias-b", "globex", &bob_token_id] {
                assert!(
                    !body.contains(secret),
                    "{m} {p} shows {secret} to alice: {body}"
                );
            }
        }
    }
    // The right role: bob (operator of globex) for his objects and collections, root for
    // the admin's and the auditor's routes. Deletions last, the user's own at the very end.
    let admin_only = |t: &str| {
        t.starts_with("/1.0/users")
            || t.starts_with("/1.0/projects/")
            || t == "/1.0/metrics"
            || t == "/1.0/images/prune"
            || t.ends_with("/label")
            || t.starts_with("/1.0/audit")
            || t == "/1.0/projects"
    };
    let rank = |m: &str, t: &str| match (m, t) {
        ("DELETE", t) if t.starts_with("/1.0/users") => 9,
        ("DELETE", t) if t.starts_with("/1.0/tokens") => 8,
        ("DELETE", t) if t.starts_with("/1.0/projects") => 7,
        ("DELETE", t) if t.starts_with("/1.0/images/{") => 6,
        ("DELETE", _) => 5,
        _ => 0,
    };
    routes.sort_by_key(|(m, t, _)| rank(m, t));
    for (m, t, p) in &routes {
        let who = if admin_only(t) && !(m == "GET" && t == "/1.0/projects") {
            None
        } else {
            Some(bob.as_str())
        };
        let (c, body) = raw(&d.socket, m, &wait(p), who, b"{}", streams(p));
        assert!(
            ![401, 403, 404].contains(&c),
            "{m} {p} answered {c} to the right role ({who:?}): {body}"
        );
    }
}

/// Alice cannot list, see, start, stop, attach to, run commands in or delete Bob's VM, nor
/// use his private image; she sees exactly what a missing VM would show.
#[test]
fn one_user_cannot_touch_anothers_vms_or_private_images() {
    let d = Vmed::start("access-tenants", false, &[]);
    let alice = user(&d, "alice", "acme", "user", "unclassified");
    let bob = user(&d, "bob", "globex", "user", "unclassified");
    assert_eq!(import(&d, Some(&bob), "img-b", "").0, 201);
    let (c, v) = api(&d, Some(&bob), "POST", "/1.0/vms", vm_from("img-b", "vm-b"));
    assert_eq!(c, 201, "{v}");
    assert_eq!(v["metadata"]["project"], "globex");

    let (_, v) = api(&d, Some(&alice), "GET", "/1.0/vms", Value::Null);
    assert_eq!(v["metadata"], json!([]), "alice lists none of bob's VMs");
    let (_, v) = api(&d, Some(&bob), "GET", "/1.0/vms", Value::Null);
    assert_eq!(v["metadata"].as_array().unwrap().len(), 1);
    for (m, p, body) in [
        ("GET", "/1.0/vms/NAME", Value::Null),
        ("PUT", "/1.0/vms/NAME/state", json!({"action": "start"})),
        ("PUT", "/1.0/vms/NAME/state", json!({"action": "stop"})),
        ("GET", "/1.0/vms/NAME/console", Value::Null),
        ("GET", "/1.0/vms/NAME/console?attach=1", Value::Null),
        ("POST", "/1.0/vms/NAME/exec", json!({"command": ["id"]})),
        ("DELETE", "/1.0/vms/NAME", Value::Null),
        ("GET", "/1.0/vms/NAME/usage", Value::Null),
    ] {
        let (c, theirs) = api(
            &d,
            Some(&alice),
            m,
            &p.replace("NAME", "vm-b"),
            body.clone(),
        );
        let (c2, missing) = api(&d, Some(&alice), m, &p.replace("NAME", "vm-zz"), body);
        assert_eq!(c, c2, "{m} {p}: {theirs}");
        assert!(c == 404 || c == 400, "{m} {p}: {theirs}");
        assert_eq!(
            theirs["error"].as_str().unwrap().replace("vm-b", "X"),
            missing["error"].as_str().unwrap().replace("vm-zz", "X"),
            "{m} {p}: bob's VM looks exactly like a missing one"
        );
    }
    // The VM is still there and defined.
    let (c, v) = api(&d, Some(&bob), "GET", "/1.0/vms/vm-b", Value::Null);
    assert_eq!((c, v["metadata"]["state"].as_str()), (200, Some("defined")));
    // Bob's private image is not alice's to use (names are per project: the VM name
    // is free in hers).
    let (c, v) = api(
        &d,
        Some(&alice),
        "POST",
        "/1.0/vms",
        vm_from("img-b", "vm-b"),
    );
    assert_eq!(c, 404, "bob's private image is not alice's to use: {v}");
    // Bob's private image: not listed, not usable, not readable.
    let (_, v) = api(&d, Some(&alice), "GET", "/1.0/images", Value::Null);
    assert_eq!(v["metadata"], json!([]));
    let (c, _) = api(&d, Some(&alice), "GET", "/1.0/images/img-b", Value::Null);
    assert_eq!(c, 404);
    let (c, v) = api(
        &d,
        Some(&alice),
        "POST",
        "/1.0/vms",
        vm_from("img-b", "vm-a"),
    );
    assert_eq!(c, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("no image"), "{v}");
    // Host paths are the admin's.
    let kernel = image("Image");
    let (c, v) = api(
        &d,
        Some(&alice),
        "POST",
        "/1.0/vms",
        json!({"name": "vm-k", "arch": "riscv64", "kernel": kernel}),
    );
    assert_eq!(c, 403, "{v}");
    // Made public, the image serves alice's project too.
    // (Publishing an image is an operator's: bob, a user, may not.)
    let (c, _) = api(
        &d,
        Some(&bob),
        "PUT",
        "/1.0/images/img-b/access",
        json!({"public": true}),
    );
    assert_eq!(c, 403);
    let (c, v) = api(
        &d,
        None,
        "PUT",
        "/1.0/images/img-b/access",
        json!({"public": true}),
    );
    assert_eq!(c, 200, "{v}");
    let (c, v) = api(
        &d,
        Some(&alice),
        "POST",
        "/1.0/vms",
        vm_from("img-b", "vm-a"),
    );
    assert_eq!(
        (c, v["metadata"]["project"].as_str()),
        (201, Some("acme")),
        "{v}"
    );
    // Names are unique per project: alice's vm-b is hers, next to bob's.
    let (c, v) = api(
        &d,
        Some(&alice),
        "POST",
        "/1.0/vms",
        vm_from("img-b", "vm-b"),
    );
    assert_eq!(
        (c, v["metadata"]["project"].as_str()),
        (201, Some("acme")),
        "{v}"
    );
    let (c, v) = api(
        &d,
        Some(&alice),
        "POST",
        "/1.0/vms",
        vm_from("img-b", "vm-b"),
    );
    assert_eq!(c, 409, "taken in her own project: {v}");
    // But alice cannot manage it (a user, and not its project's).
    let (c, _) = api(&d, Some(&alice), "DELETE", "/1.0/images/img-b", Value::Null);
    assert_eq!(c, 403);
    // An async create's operation is its requester's (even before the VM exists), and
    // hidden from others like a missing one.
    let (c, v) = api(
        &d,
        Some(&bob),
        "POST",
        "/1.0/vms?async=true",
        vm_from("img-b", "vm-c"),
    );
    assert_eq!(c, 202, "{v}");
    let op = v["metadata"]["id"].as_str().unwrap().to_string();
    let wait = format!("/1.0/operations/{op}/wait?timeout=30");
    let (c, v) = api(&d, Some(&bob), "GET", &wait, Value::Null);
    assert_eq!(
        (c, v["metadata"]["status"].as_str()),
        (200, Some("Success")),
        "{v}"
    );
    assert_eq!(api(&d, Some(&alice), "GET", &wait, Value::Null).0, 404);
    let (_, v) = api(&d, Some(&alice), "GET", "/1.0/operations", Value::Null);
    assert!(!v.to_string().contains(&op), "{v}");
    assert_eq!(
        api(&d, Some(&bob), "DELETE", "/1.0/vms/vm-c", Value::Null).0,
        200
    );
    // Root (the bootstrap admin, by its uid) sees all three.
    let (_, v) = api(&d, None, "GET", "/1.0/vms", Value::Null);
    assert_eq!(v["metadata"].as_array().unwrap().len(), 3);
}

/// Quotas refuse with the numbers; a role change is in force at the next request.
#[test]
fn quotas_and_role_changes() {
    let d = Vmed::start("access-quota", false, &[]);
    let bob = user(&d, "bob", "globex", "user", "unclassified");
    assert_eq!(import(&d, Some(&bob), "img", "").0, 201);
    let (c, v) = api(
        &d,
        None,
        "PUT",
        "/1.0/projects/globex",
        json!({"quota": {"vms": 1, "memory": 100 << 20}}),
    );
    assert_eq!(c, 200, "{v}");
    assert_eq!(
        api(&d, Some(&bob), "POST", "/1.0/vms", vm_from("img", "one")).0,
        201
    );
    let (c, v) = api(&d, Some(&bob), "POST", "/1.0/vms", vm_from("img", "two"));
    assert_eq!(c, 403, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("may have 1 VMs, has 1 in use and this VM needs 1"),
        "{msg}"
    );
    let (c, _) = api(
        &d,
        None,
        "PUT",
        "/1.0/projects/globex",
        json!({"quota": {"vms": 5, "memory": 100 << 20}}),
    );
    assert_eq!(c, 200);
    let (c, v) = api(&d, Some(&bob), "POST", "/1.0/vms", vm_from("img", "two"));
    assert_eq!(c, 403, "64M + 64M > 100M: {v}");
    assert!(v["error"].as_str().unwrap().contains("memory bytes"), "{v}");
    let (_, v) = api(&d, Some(&bob), "GET", "/1.0/projects", Value::Null);
    assert_eq!(v["metadata"][0]["usage"]["vms"], 1, "{v}");

    // Demoted to auditor: reads, but no longer creates or stops.
    let (c, _) = api(
        &d,
        None,
        "PUT",
        "/1.0/users/bob/role",
        json!({"project": "globex", "role": "auditor"}),
    );
    assert_eq!(c, 200);
    assert_eq!(
        api(&d, Some(&bob), "GET", "/1.0/vms/one", Value::Null).0,
        200
    );
    let (c, v) = api(
        &d,
        Some(&bob),
        "PUT",
        "/1.0/vms/one/state",
        json!({"action": "start"}),
    );
    assert_eq!(c, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("auditor"), "{v}");
    // Removed from the project: the VM is no longer there for him.
    let (c, _) = api(
        &d,
        None,
        "PUT",
        "/1.0/users/bob/role",
        json!({"project": "globex", "role": "none"}),
    );
    assert_eq!(c, 200);
    assert_eq!(
        api(&d, Some(&bob), "GET", "/1.0/vms/one", Value::Null).0,
        404
    );
    // And back.
    api(
        &d,
        None,
        "PUT",
        "/1.0/users/bob/role",
        json!({"project": "globex", "role": "user"}),
    );
    assert_eq!(
        api(&d, Some(&bob), "DELETE", "/1.0/vms/one", Value::Null).0,
        200
    );
    // A user may not manage users, nor promote himself.
    let (c, _) = api(
        &d,
        Some(&bob),
        "PUT",
        "/1.0/users/bob/role",
        json!({"project": "globex", "role": "admin"}),
    );
    assert_eq!(c, 403);
}

/// Labels: a confidential user does not see a secret VM; a secret VM cannot boot a
/// topsecret image.
#[test]
fn labels() {
    let d = Vmed::start("access-labels", false, &[]);
    let carol = user(&d, "carol", "acme", "user", "confidential");
    assert_eq!(import(&d, None, "img", "&project=acme").0, 201);
    // Root creates a secret VM in acme.
    let mut body = vm_from("img", "sec");
    body["label"] = json!("secret");
    let (c, v) = api(&d, None, "POST", "/1.0/vms?project=acme", body);
    assert_eq!(
        (c, v["metadata"]["label"].as_str()),
        (201, Some("secret")),
        "{v}"
    );
    let mut body = vm_from("img", "low");
    body["label"] = json!("confidential");
    assert_eq!(api(&d, Some(&carol), "POST", "/1.0/vms", body).0, 201);
    let (_, v) = api(&d, Some(&carol), "GET", "/1.0/vms", Value::Null);
    let names: Vec<_> = v["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, [json!("low")]);
    assert_eq!(
        api(&d, Some(&carol), "GET", "/1.0/vms/sec", Value::Null).0,
        404
    );
    // Nor may she make one above her clearance.
    let mut body = vm_from("img", "up");
    body["label"] = json!("secret");
    assert_eq!(api(&d, Some(&carol), "POST", "/1.0/vms", body).0, 403);
    // Raised, she sees it at the next request.
    let (c, _) = api(
        &d,
        None,
        "PUT",
        "/1.0/users/carol",
        json!({"clearance": "secret"}),
    );
    assert_eq!(c, 200);
    assert_eq!(
        api(&d, Some(&carol), "GET", "/1.0/vms/sec", Value::Null).0,
        200
    );
    // A topsecret image: a secret VM cannot boot it; a topsecret one can.
    let (c, v) = api(
        &d,
        None,
        "PUT",
        "/1.0/images/img/access",
        json!({"label": "topsecret"}),
    );
    assert_eq!(c, 200, "{v}");
    let mut body = vm_from("img", "sec2");
    body["label"] = json!("secret");
    let (c, v) = api(&d, None, "POST", "/1.0/vms?project=acme", body);
    assert_eq!(c, 403, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("cannot boot image"),
        "{v}"
    );
    let mut body = vm_from("img", "ts");
    body["label"] = json!("topsecret");
    assert_eq!(api(&d, None, "POST", "/1.0/vms?project=acme", body).0, 201);
    // Categories: secret:nato is hidden from a secret clearance without nato.
    let (c, _) = api(
        &d,
        None,
        "PUT",
        "/1.0/vms/sec/label",
        json!({"label": "secret:nato"}),
    );
    assert_eq!(c, 200);
    assert_eq!(
        api(&d, Some(&carol), "GET", "/1.0/vms/sec", Value::Null).0,
        404
    );
    let (c, v) = api(
        &d,
        None,
        "PUT",
        "/1.0/vms/sec/label",
        json!({"label": "cosmic"}),
    );
    assert_eq!(c, 400, "{v}");
}

/// Tokens: a revoked one and an expired one are refused at the very next request; a token
/// takes precedence over the socket's uid.
#[test]
fn revoked_and_expired_tokens_are_refused_at_once() {
    let d = Vmed::start("access-tokens", false, &[]);
    let bob = user(&d, "bob", "globex", "user", "unclassified");
    let (c, v) = api(&d, Some(&bob), "GET", "/1.0/whoami", Value::Null);
    assert_eq!(
        (c, v["metadata"]["name"].as_str()),
        (200, Some("bob")),
        "token over uid 0"
    );
    let (_, v) = api(&d, None, "GET", "/1.0/whoami", Value::Null);
    assert_eq!(v["metadata"]["name"], "root");
    // Bob makes a second token himself, lists it (no secret), revokes it.
    let (c, v) = api(&d, Some(&bob), "POST", "/1.0/tokens", json!({}));
    assert_eq!(c, 201);
    let (t2, id2) = (
        v["metadata"]["token"].as_str().unwrap().to_string(),
        v["metadata"]["id"].as_str().unwrap().to_string(),
    );
    let (_, v) = api(&d, Some(&t2), "GET", "/1.0/tokens", Value::Null);
    assert_eq!(v["metadata"].as_array().unwrap().len(), 2);
    assert!(
        !v.to_string().contains(&t2[t2.len() - 20..]),
        "no secret listed"
    );
    assert_eq!(
        api(
            &d,
            Some(&bob),
            "DELETE",
            &format!("/1.0/tokens/{id2}"),
            Value::Null
        )
        .0,
        200
    );
    let (c, v) = api(&d, Some(&t2), "GET", "/1.0/whoami", Value::Null);
    assert_eq!(c, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("revoked"), "{v}");
    // Another user's token id is not disclosed.
    let (_, v) = api(&d, None, "POST", "/1.0/tokens", json!({}));
    let root_id = v["metadata"]["id"].as_str().unwrap().to_string();
    let (c, v) = api(
        &d,
        Some(&bob),
        "DELETE",
        &format!("/1.0/tokens/{root_id}"),
        Value::Null,
    );
    assert_eq!(c, 404, "{v}");
    assert_eq!(
        v["error"],
        format!("no token {root_id:?}: see `vme token list`")
    );
    // A wrong secret for a real id.
    let forged = format!("{}0", &bob[..bob.len() - 1]);
    let forged = if forged == bob {
        format!("{}1", &bob[..bob.len() - 1])
    } else {
        forged
    };
    assert_eq!(
        api(&d, Some(&forged), "GET", "/1.0/whoami", Value::Null).0,
        401
    );
    // Bob may not make tokens for others.
    assert_eq!(
        api(
            &d,
            Some(&bob),
            "POST",
            "/1.0/tokens",
            json!({"user": "root"})
        )
        .0,
        403
    );
    // Expiry.
    let (c, v) = api(
        &d,
        None,
        "POST",
        "/1.0/tokens",
        json!({"user": "bob", "expires_in": 2}),
    );
    assert_eq!(c, 201);
    let t3 = v["metadata"]["token"].as_str().unwrap().to_string();
    assert_eq!(api(&d, Some(&t3), "GET", "/1.0/whoami", Value::Null).0, 200);
    std::thread::sleep(Duration::from_millis(3100));
    let (c, v) = api(&d, Some(&t3), "GET", "/1.0/whoami", Value::Null);
    assert_eq!(c, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("expired"), "{v}");
    // Deleting the user kills its tokens.
    assert_eq!(
        api(&d, None, "DELETE", "/1.0/users/bob", Value::Null).0,
        200
    );
    assert_eq!(
        api(&d, Some(&bob), "GET", "/1.0/whoami", Value::Null).0,
        401
    );
    // Every refusal above is in the audit log, GETs included, and the chain holds.
    let (c, v) = api(&d, None, "GET", "/1.0/audit?result=denied", Value::Null);
    assert_eq!(c, 200, "{v}");
    let denied = v["metadata"].as_array().unwrap();
    let count = |status: u64, action: &str| {
        denied
            .iter()
            .filter(|r| r["status"] == status && r["action"] == action)
            .count()
    };
    // revoked, forged, expired, deleted user: four 401s on whoami.
    assert_eq!(count(401, "self.info"), 4, "{v}");
    assert_eq!(count(403, "token.create"), 1, "{v}");
    assert!(
        denied
            .iter()
            .any(|r| r["status"] == 403 && r["actor"] == "bob"),
        "{v}"
    );
    let (c, v) = api(&d, None, "GET", "/1.0/audit/verify", Value::Null);
    assert_eq!((c, &v["metadata"]["ok"]), (200, &json!(true)), "{v}");
}

/// A non-root process on the Unix socket is the user its uid is mapped to (SO_PEERCRED);
/// an unmapped uid gets a 401 that says how to authenticate.
#[test]
fn a_mapped_uid_is_its_user_on_the_socket() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let d = Vmed::start("access-uid", false, &[]);
    user(&d, "dave", "acme", "user", "unclassified");
    let (c, v) = api(&d, None, "PUT", "/1.0/users/dave", json!({"uid": 64123}));
    assert_eq!(c, 200, "{v}");
    // Let the test uids reach the socket (the daemon's group would, in production).
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut dir = d.socket.parent().unwrap().to_path_buf();
    while dir != Path::new("/") {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode | 0o011)).unwrap();
        dir.pop();
    }
    let curl = |uid: u32, path: &str| -> (u16, Value) {
        let out = std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&d.socket)
            .arg(format!("http://vme{path}"))
            .uid(uid)
            .gid(uid)
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (
            code.parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    };
    let (c, v) = curl(64123, "/1.0/whoami");
    assert_eq!(
        (c, v["metadata"]["name"].as_str()),
        (200, Some("dave")),
        "{v}"
    );
    let (c, v) = curl(64123, "/1.0/users");
    assert_eq!(c, 403, "{v}");
    let (c, v) = curl(64124, "/1.0/vms");
    assert_eq!(c, 401, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("uid 64124") && msg.contains("--token"),
        "{msg}"
    );
}
