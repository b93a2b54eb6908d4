//! Clones on the x86_64 machine with our probe guest, in seconds: the virtio-pci network
//! device's saved state takes the clone's new MAC (a plain restore refuses a MAC the guest
//! does not know), a MAC given with `--net mac=` is kept, and a clone without vsock says
//! in its status and log that its guest cannot be told. (The guest side, through the
//! agent, is checked with Linux guests in `riscv_clone.rs`.)

mod common;

use common::netns::{Netns, net_available};
use common::{Vm, kvm_available, temp_dir, x86_probe};
use std::path::Path;
use std::time::Duration;
use vme_api::control::{CloneGuestState, IdentityStatus, Request, call};

const T: Duration = Duration::from_secs(120);

fn identity(sock: &Path) -> IdentityStatus {
    let r = call(sock, &Request::Status, T).expect("ctl status");
    assert!(r.ok, "{r:?}");
    r.status
        .unwrap()
        .identity
        .expect("the status shows the identity")
}

fn stop(mut vm: Vm, sock: &Path) {
    let _ = call(sock, &Request::Stop, T);
    assert_eq!(vm.wait_exit(T).code(), Some(0));
    vm.assert_no_seccomp_violation();
}

#[test]
fn a_clone_gets_new_macs_on_pci_and_says_when_no_agent_can_be_told() {
    if !kvm_available() || !net_available() {
        return;
    }
    let dir = temp_dir("x86clone");
    let ns = Netns::new("x86clone");
    let snap = dir.join("snap");
    let sock = dir.join("o.sock");
    let mut vm = Vm::start_wrapped(
        &ns.exec(),
        &[
            common::STRICT[0],
            common::STRICT[1],
            "--kernel",
            x86_probe().to_str().unwrap(),
            "--memory",
            "64M",
            "--cmdline",
            "s",
            "--net",
            "tap=vmexc0",
            "--control-socket",
            sock.to_str().unwrap(),
        ],
    );
    vm.wait_for("tick ", T);
    let orig = identity(&sock).macs;
    assert_eq!(orig.len(), 1);
    common::ctl_args(&sock, &["snapshot", snap.to_str().unwrap()]);
    stop(vm, &sock);

    let given = "02:00:5e:c1:00:01";
    let clone = |tag: &str, net: &str| {
        let s = dir.join(format!("{tag}.sock"));
        let vm = Vm::start_wrapped(
            &ns.exec(),
            &[
                common::STRICT[0],
                common::STRICT[1],
                "--restore",
                snap.to_str().unwrap(),
                "--clone",
                "--net",
                net,
                "--control-socket",
                s.to_str().unwrap(),
                "--log-level",
                "info",
            ],
        );
        (vm, s)
    };
    let (mut a, a_sock) = clone("a", "tap=vmexc1");
    let (mut b, b_sock) = clone("b", &format!("tap=vmexc2,mac={given}"));
    // Both run on: the probe prints a tick a second.
    a.wait_for("tick ", T);
    b.wait_for("tick ", T);
    let (ia, ib) = (identity(&a_sock), identity(&b_sock));
    assert_ne!(ia.macs, orig, "a clone gets a new MAC");
    assert_eq!(ib.macs, vec![given.to_string()], "a given MAC is kept");
    for (id, vm) in [(&ia, &a), (&ib, &b)] {
        let c = id.clone.clone().expect("a clone says it is one");
        assert_eq!(c.guest, CloneGuestState::NoAgent, "{c:?}");
        assert!(c.detail.unwrap().contains("no vsock device"));
        let log = vm.stderr.lock().unwrap().clone();
        assert!(log.contains("no vsock device"), "{log}");
    }
    stop(a, &a_sock);
    stop(b, &b_sock);
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}
