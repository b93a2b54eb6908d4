//! What a starting daemon does with the VMs its store says have a monitor: the previous
//! daemon may have been killed (-9) at any moment. Every VM ends in a state that says what
//! happened, and every half-done operation is settled one way:
//! - a monitor that still runs (its pid is alive, its command line names the VM's machine
//!   file, and its control socket answers) is re-adopted and its VM keeps running untouched;
//!   a start whose monitor answers is thereby complete (rolled forward);
//! - a start that died before its monitor's pid was recorded is looked for among the host's
//!   processes by its machine file: found, it is adopted; not found, nothing ran and the VM
//!   is back to `stopped` (rolled back);
//! - a stop is carried on; if its monitor is already gone the VM is `stopped`;
//! - any other VM whose monitor is gone is `crashed`, with the reason.

use crate::daemon::{Daemon, control_path, machine_file, monitor_log};
use crate::lifecycle::State;
use crate::store::{StoreError, VmRecord};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vme_api::control::{self, Request, RunState};

pub fn run(d: &Arc<Daemon>) -> Result<(), StoreError> {
    let _doing = crate::events::doing("reconcile");
    let vms = d.store().list()?;
    for mut vm in vms.into_iter().filter(|vm| vm.state.has_monitor()) {
        if vm.pid == 0 {
            match find_monitor(&machine_file(&d.config().state_dir, &vm.key)) {
                Some(pid) => vm.pid = pid,
                None => {
                    settle_without_monitor(d, &vm, None)?;
                    continue;
                }
            }
        }
        if let Err(why) = adopt(d, &vm) {
            settle_without_monitor(d, &vm, Some(why))?;
        }
    }
    Ok(())
}

/// Records where a VM stands when no monitor of it runs (any more). `why` is what went
/// wrong with the monitor that was recorded, if one was.
fn settle_without_monitor(
    d: &Arc<Daemon>,
    vm: &VmRecord,
    why: Option<String>,
) -> Result<(), StoreError> {
    let (state, reason) = match (vm.state, why) {
        (State::Stopping, _) => (
            State::Stopped,
            "vmed restarted while the VM was stopping; its monitor had exited".to_string(),
        ),
        (State::Starting, None) => (
            State::Stopped,
            "vmed restarted before the VM's monitor was started; nothing ran: start it again"
                .to_string(),
        ),
        (s, None) => (
            State::Crashed,
            format!("vmed restarted while the VM was {s}; no monitor of it runs: start it again"),
        ),
        (s, Some(why)) => (
            State::Crashed,
            format!("vmed restarted while the VM was {s}; {why}"),
        ),
    };
    d.store().set_state_and_pid(&vm.key, state, &reason, 0)?;
    // The cgroup of a monitor that is gone (one that still runs keeps it: ours to remove
    // only once empty).
    let cg = &d.config().cgroups;
    if cg.enabled {
        crate::cgroup::remove_empty(&crate::cgroup::vm_path(&cg.root, &vm.key));
    }
    Ok(())
}

/// A running monitor started with `--config MACHINE`: the one a start spawned just before
/// the daemon died, before it could record the pid.
fn find_monitor(machine: &Path) -> Option<u32> {
    let pid = std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse().ok()?;
        find_monitor_at(pid, machine)
    })?;
    // A jailed monitor runs its VM in a child with the same command line: the parent is
    // the one that was spawned and is supervised.
    let parent = crate::jail::parent(pid);
    Some(find_monitor_at(parent, machine).unwrap_or(pid))
}

fn adopt(d: &Arc<Daemon>, vm: &VmRecord) -> Result<(), String> {
    let dir = &d.config().state_dir;
    let (name, pid) = (vm.key.as_str(), vm.pid);
    let log = monitor_log(dir, name);
    let gone = || {
        format!(
            "its monitor (pid {pid}) is gone; its log ends: {}",
            crate::daemon::tail(&log)
        )
    };
    // The pid alone could have been reused by an unrelated process: the monitor's command
    // line names this VM's machine file.
    if find_monitor_at(pid, &machine_file(dir, name)).is_none() {
        return Err(gone());
    }
    // Opened before the control socket is asked, so an exit after the answer is not missed.
    let pidfd = pidfd_open(pid).map_err(|_| gone())?;
    let control = control_path(dir, name);
    let reply = status(&control).map_err(|e| {
        format!(
            "its monitor (pid {pid}) still runs but does not answer ({e}); end it with \
                 `kill {pid}`"
        )
    })?;
    let now = reply.status.map(|s| s.state).or(reply.state);
    let state = match (vm.state, now) {
        // The stop was asked for: carried on below, once the exit is watched.
        (State::Stopping, _) | (_, Some(RunState::Stopping)) => State::Stopping,
        (_, Some(RunState::Paused)) => State::Paused,
        _ => State::Running,
    };
    d.store()
        .set_state_and_pid(name, state, "", pid)
        .map_err(|e| e.to_string())?;
    let cg = &d.config().cgroups;
    let group = crate::cgroup::vm_path(&cg.root, name);
    let group = (cg.enabled && crate::cgroup::contains(&group, pid)).then_some(group);
    let taps = vm.spec.nets.iter().map(|n| n.tap.clone()).collect();
    d.watch(name, pid, group, taps);
    let (d, name) = (Arc::clone(d), name.to_string());
    std::thread::spawn(move || {
        if state == State::Stopping {
            // As a stop does: the monitor's stop, then SIGKILL if it is still there.
            let _ = control::call(&control, &Request::Stop, Duration::from_secs(5));
            if !wait_exit(&pidfd, Some(Duration::from_secs(5))) {
                kill(&pidfd);
            }
        }
        wait_exit(&pidfd, None);
        // Not our child: its exit status went to its new parent. A stop we asked for is a
        // stop; any other exit counts as a crash, its log's tail says more.
        // Its status is lost, but a seccomp kill leaves its line in the log.
        let how = match crate::jail::security_event_in_log(&log) {
            Some(why) => {
                d.security_event(&name, &why, &log);
                why
            }
            None => "exited while this vmed was not its parent (its exit status is unknown)".into(),
        };
        d.exited(&name, false, &how, &log);
    });
    Ok(())
}

/// The monitor's status. A monitor spawned just before the previous daemon died may not
/// have opened its control socket yet: it gets a few seconds.
fn status(control: &Path) -> Result<control::Reply, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match control::call(control, &Request::Status, Duration::from_secs(5)) {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() > deadline => return Err(e.to_string()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `pid` if that process is a monitor started with `--config MACHINE`.
fn find_monitor_at(pid: u32, machine: &Path) -> Option<u32> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let machine = machine.as_os_str().as_encoded_bytes();
    let mut args = cmdline.split(|b| *b == 0);
    args.any(|a| a == b"--config")
        .then(|| args.next())
        .flatten()
        .filter(|a| *a == machine)
        .map(|_| pid)
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

/// Waits until the process behind `pidfd` has exited (the descriptor becomes readable), at
/// most `timeout` if given; true when it has.
fn wait_exit(pidfd: &OwnedFd, timeout: Option<Duration>) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    loop {
        // SAFETY: `p` is one valid pollfd that lives across the call; nfds is 1.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return r != 0;
        }
    }
}

/// SIGKILL through the pidfd: it cannot hit another process that reused the pid.
fn kill(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal(2) with a descriptor we own, a signal number and no siginfo;
    // it touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}
