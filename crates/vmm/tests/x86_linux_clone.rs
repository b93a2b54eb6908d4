//! A clone of an x86_64 Linux guest (our minimal kernel, PVH): the guest's vmgenid driver
//! binds to the DSDT's VM Generation ID device at boot, and a `--clone` restore changes
//! the ID and notifies it, so the kernel reseeds its random generator by itself (it logs
//! "crng reseeded due to virtual machine fork"), besides the agent's reseed and the new
//! vsock CID. One boot: about two minutes on PVM hosts (see x86_linux.rs).

mod common;

use common::{Vm, image, kvm_available, temp_dir};
use std::path::Path;
use std::time::{Duration, Instant};
use vme_api::agent::AgentClient;
use vme_api::control::{CloneGuestState, IdentityStatus, Request, call};

/// Generous for PVM hosts.
const BOOT: Duration = Duration::from_secs(40 * 60);

fn sh(agent: &mut AgentClient, script: &str) -> String {
    let out = agent
        .exec(&["sh".into(), "-c".into(), script.into()], &[], BOOT)
        .expect("the guest agent runs a command");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn identity(sock: &Path) -> IdentityStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match call(sock, &Request::Status, Duration::from_secs(30)) {
            Ok(r) if r.ok => return r.status.unwrap().identity.expect("the identity is shown"),
            // The control socket appears once the monitor has started.
            other if Instant::now() > deadline => panic!("ctl status: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn a_linux_clone_is_told_its_new_generation_id_and_reseeds() {
    if !kvm_available() {
        return;
    }
    let dir = temp_dir("x86linuxclone");
    let (k, i) = (image("tiny", "vmlinux"), image("tiny", "initramfs.cpio"));
    let (a_sock, b_sock) = (dir.join("a.sock"), dir.join("b.sock"));
    let (a_uds, b_uds) = (dir.join("a.v"), dir.join("b.v"));
    let cmdline =
        r#"console=ttyS0 quiet panic=-1 vme.run="while [ ! -e /tmp/vme-done ]; do sleep 1; done""#;
    let vsock = format!("cid=3,uds={}", a_uds.display());
    let t0 = Instant::now();
    let mut a = Vm::start(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        i.to_str().unwrap(),
        "--memory",
        "256M",
        "--cmdline",
        cmdline,
        "--vsock",
        &vsock,
        "--control-socket",
        a_sock.to_str().unwrap(),
    ]);
    let mut agent = AgentClient::wait(&a_uds, BOOT)
        .unwrap_or_else(|e| a.fail(&format!("the guest agent does not answer: {e}")));
    agent.set_timeout(Some(BOOT)).unwrap();
    eprintln!("booted to the agent in {:?}", t0.elapsed());
    let bound = sh(&mut agent, "ls /sys/bus/acpi/drivers/vmgenid/");
    assert!(
        bound.contains("VMGENCTR"),
        "the vmgenid driver did not bind to the DSDT's device: {bound:?}"
    );
    let snap = dir.join("snap");
    common::ctl_args(&a_sock, &["snapshot", snap.to_str().unwrap()]);
    drop(agent);
    let _ = call(&a_sock, &Request::Stop, Duration::from_secs(30));
    assert_eq!(a.wait_exit(BOOT).code(), Some(0));

    let uds = format!("uds={}", b_uds.display());
    let mut b = Vm::start(&[
        "--restore",
        snap.to_str().unwrap(),
        "--clone",
        "--vsock",
        &uds,
        "--control-socket",
        b_sock.to_str().unwrap(),
        "--log-level",
        "info",
    ]);
    let deadline = Instant::now() + BOOT;
    let id = loop {
        let id = identity(&b_sock);
        let c = id.clone.clone().expect("a clone says it is one");
        match c.guest {
            CloneGuestState::Applied => break id,
            CloneGuestState::Pending if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            _ => b.fail(&format!("the clone's identity was not applied: {c:?}")),
        }
    };
    assert_ne!(id.vsock_cid, Some(3), "a clone gets a new CID");
    let mut agent = AgentClient::wait(&b_uds, BOOT).expect("the clone's agent answers");
    agent.set_timeout(Some(BOOT)).unwrap();
    let log = sh(&mut agent, "dmesg");
    assert!(
        log.contains("crng reseeded due to virtual machine fork"),
        "the guest was not told of its new generation ID:\n{log}"
    );
    drop(agent);
    let _ = call(&b_sock, &Request::Stop, Duration::from_secs(30));
    assert_eq!(b.wait_exit(BOOT).code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
