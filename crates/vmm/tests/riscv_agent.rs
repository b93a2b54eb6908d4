//! The guest agent on the riscv64 software machine: the same checks as on x86_64 (commands
//! through `vme-vmm exec`, files both ways over virtio-vsock, a guest-initiated connection,
//! stats), with two harts so the guest's vsock driver runs on more than one CPU. Runs on
//! every host (no KVM); altered data is an error here, on every host.

mod common;

use common::{Vm, riscv_tiny_args, temp_dir};
use std::time::Duration;

/// Generous for an interpreted guest on a loaded 2-core host.
const TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn agent_runs_commands_and_moves_files_over_vsock_with_two_harts() {
    let dir = temp_dir("riscv-agent");
    let (uds, ctl) = (dir.join("v.sock"), dir.join("ctl.sock"));
    let run = r#"vme.run="while [ ! -e /tmp/vme-done ]; do sleep 1; done""#;
    let mut args = riscv_tiny_args("2", "256M", run);
    args.extend([
        "--vsock".into(),
        format!("cid=3,uds={}", uds.display()),
        "--control-socket".into(),
        ctl.display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::start(&args);
    vm.wait_for("VME-GUEST-READY", TIMEOUT);
    common::agent::checks(&uds, ctl.to_str().unwrap(), TIMEOUT, false);
    vm.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
    assert_eq!(
        vm.wait_exit(TIMEOUT).code(),
        Some(0),
        "{}",
        vm.stderr.lock().unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
