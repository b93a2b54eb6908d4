//! What a starting daemon does with the VMs its store says have a monitor: the previous
//! daemon may have been killed (-9) while they ran. A monitor that still runs (its recorded
//! pid is alive, its command line names the VM's machine file, and its control socket
//! answers) is re-adopted and its VM keeps running untouched; a VM whose monitor is gone is
//! marked crashed with the reason. Half-done operations are settled: a start whose monitor
//! answers is complete (running), a stop is carried on.

use crate::daemon::{Daemon, control_path, machine_file, monitor_log};
use crate::lifecycle::State;
use crate::store::{StoreError, VmRecord};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use vme_api::control::{self, Request, RunState};

pub fn run(d: &Arc<Daemon>) -> Result<(), StoreError> {
    let vms = d.store().list()?;
    for vm in vms.into_iter().filter(|vm| vm.state.has_monitor()) {
        if let Err(why) = adopt(d, &vm) {
            let reason = format!("vmed restarted while the VM was {}; {why}", vm.state);
            let mut store = d.store();
            store.set_state(&vm.name, State::Crashed, &reason)?;
            store.set_pid(&vm.name, 0)?;
            drop(store);
            // The cgroup of a monitor that is gone (one that still runs keeps it: ours to
            // remove only once empty).
            let cg = &d.config().cgroups;
            if cg.enabled {
                let _ = std::fs::remove_dir(crate::cgroup::vm_path(&cg.root, &vm.name));
            }
        }
    }
    Ok(())
}

fn adopt(d: &Arc<Daemon>, vm: &VmRecord) -> Result<(), String> {
    let dir = &d.config().state_dir;
    let (name, pid) = (vm.name.as_str(), vm.pid);
    if pid == 0 {
        return Err("its monitor had not been started yet: start the VM again".into());
    }
    let log = monitor_log(dir, name);
    let gone = || {
        format!(
            "its monitor (pid {pid}) is gone; its log ends: {}",
            crate::daemon::tail(&log)
        )
    };
    // The pid alone could have been reused by an unrelated process: the monitor's command
    // line names this VM's machine file.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(|_| gone())?;
    let machine = machine_file(dir, name);
    if !String::from_utf8_lossy(&cmdline).contains(&*machine.to_string_lossy()) {
        return Err(gone());
    }
    // Opened before the control socket is asked, so an exit after the answer is not missed.
    let pidfd = pidfd_open(pid).map_err(|_| gone())?;
    let control = control_path(dir, name);
    let reply = control::call(&control, &Request::Status, Duration::from_secs(5)).map_err(|e| {
        format!(
            "its monitor (pid {pid}) still runs but does not answer ({e}); end it with \
                 `kill {pid}`"
        )
    })?;
    let now = reply.status.map(|s| s.state).or(reply.state);
    let state = match (vm.state, now) {
        (State::Stopping, _) | (_, Some(RunState::Stopping)) => {
            // The stop was asked for: carry it on.
            let _ = control::call(&control, &Request::Stop, Duration::from_secs(5));
            State::Stopping
        }
        (_, Some(RunState::Paused)) => State::Paused,
        _ => State::Running,
    };
    d.store()
        .set_state(name, state, "")
        .map_err(|e| e.to_string())?;
    let cg = &d.config().cgroups;
    let group = crate::cgroup::vm_path(&cg.root, name);
    let group = (cg.enabled && crate::cgroup::contains(&group, pid)).then_some(group);
    let taps = vm.spec.nets.iter().map(|n| n.tap.clone()).collect();
    d.watch(name, pid, group, taps);
    let (d, name) = (Arc::clone(d), name.to_string());
    std::thread::spawn(move || {
        wait_exit(&pidfd);
        // Not our child: its exit status went to its new parent. A stop we asked for is a
        // stop; any other exit counts as a crash, its log's tail says more.
        d.exited(
            &name,
            false,
            "exited while this vmed was not its parent (its exit status is unknown)",
            &log,
        );
    });
    Ok(())
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1; it
    // touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Blocks until the process behind `pidfd` has exited (the descriptor becomes readable).
fn wait_exit(pidfd: &OwnedFd) {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one valid pollfd that lives across the call; nfds is 1.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r > 0 || (r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)) {
            return;
        }
    }
}
