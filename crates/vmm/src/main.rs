//! `vme-vmm`: one process runs one VM. Usable on its own (flags or a TOML machine file, a
//! control socket) and as the daemon's per-VM monitor.
//!
//! Exit status: 0 when the guest powered off or rebooted or the VM was stopped; 1 when the
//! VM could not be started (bad input, no KVM); 2 when the VM crashed (triple fault, failed
//! entry, an instruction nobody can complete); 3 when the guest kernel panicked.

mod cli;
mod console;
mod console_socket;
mod control;
#[cfg(feature = "seccomp-drill")]
mod drill;
mod exec;
mod jail;
mod limits;
mod logger;
mod migrate;
mod notify;
mod riscv;
mod seccomp;
mod signals;
mod snapshot;
mod socket;
mod taps;
mod virtio;
mod x86;

use control::{ExitReason, RunContext, VmControl};
use std::process::ExitCode;
use std::sync::Arc;
use vme_api::{Arch, MachineSpec, RebootAction};

fn main() -> ExitCode {
    abort_on_panic();
    let args = cli::parse();
    logger::init(args.log_level());
    if args.run.print_seccomp {
        print!("{}", seccomp::describe());
        return ExitCode::SUCCESS;
    }
    match args.command {
        Some(cli::Command::Ctl(ctl)) => cli::run_ctl(ctl),
        Some(cli::Command::Exec(args)) => exec::run(args),
        Some(cli::Command::SnapshotMerge(args)) => cli::run_merge(args),
        None if args.run.migrate_listen.is_some() => {
            let addr = args.run.migrate_listen.clone().unwrap_or_default();
            match migrate::recv::receive(&addr, &args.run)
                .and_then(|(spec, r)| Ok((with_seccomp(spec, &args.run)?, r)))
            {
                Ok((spec, restore)) => run_vm(spec, Some(restore)),
                Err(e) => {
                    eprintln!("vme-vmm: {e}");
                    ExitCode::from(1)
                }
            }
        }
        None => match &args.run.restore {
            Some(dir) => match snapshot::restore::restore_spec(dir, &args.run)
                .and_then(|(spec, r)| Ok((with_seccomp(spec, &args.run)?, r)))
            {
                Ok((spec, restore)) => run_vm(spec, Some(restore)),
                Err(e) => {
                    eprintln!("vme-vmm: {e}");
                    ExitCode::from(1)
                }
            },
            None => match cli::machine_spec(&args.run) {
                Ok(spec) if args.run.print_config => {
                    print!("{}", spec.to_toml());
                    ExitCode::SUCCESS
                }
                Ok(spec) => run_vm(spec, None),
                Err(e) => {
                    eprintln!("vme-vmm: {e}");
                    ExitCode::from(1)
                }
            },
        },
    }
}

/// The spec of a restored or received VM with --seccomp, when given, over the sender's
/// mode, and the jail of our flags (never the sender's).
fn with_seccomp(mut spec: MachineSpec, args: &cli::RunArgs) -> Result<MachineSpec, String> {
    if let Some(mode) = args.seccomp {
        spec.seccomp = mode;
    }
    spec.jail = None;
    args.apply_jail(&mut spec)?;
    Ok(spec)
}

/// A panic in any thread ends the monitor (and so its VM) at once: a VM whose vCPU thread died
/// silently would hang instead of failing visibly to its supervisor. (The release profile
/// keeps unwinding so tests share its build; this hook gives abort semantics regardless.)
fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!("vme-vmm: internal error (a bug in the monitor): aborting the VM");
        std::process::abort();
    }));
}

/// Runs the VM of `spec`, booted, or continued from `restore` (a guest reboot after that
/// boots the spec's kernel).
fn run_vm(mut spec: MachineSpec, mut restore: Option<snapshot::Restore>) -> ExitCode {
    // Before anything the guest influences runs, and before the seccomp filters (which do
    // not allow what confining takes). Only the jailed child returns from here.
    if let Some(jail) = spec.jail.clone() {
        if let Err(e) = jail::enter(
            &jail,
            &mut spec,
            restore
                .as_ref()
                .filter(|r| r.memory.is_none())
                .map(|r| r.dir.as_path()),
        ) {
            eprintln!("vme-vmm: cannot jail the monitor: {e}");
            return ExitCode::from(1);
        }
    }
    // Before any thread starts, so each can install its filter.
    if let Err(e) = seccomp::init(spec.seccomp) {
        eprintln!("vme-vmm: {e}");
        return ExitCode::from(1);
    }
    let control = Arc::new(VmControl::new());
    signals::stop_on_termination(control.clone());
    let identity = restore.as_ref().and_then(|r| r.clone.clone());
    let clone_status = identity.as_ref().map(|id| {
        Arc::new(std::sync::Mutex::new(snapshot::clone::initial_status(
            id,
            spec.vsock.is_some(),
        )))
    });
    let facts = socket::VmFacts {
        arch: spec.arch.to_string(),
        vcpus: spec.vcpus,
        memory_bytes: spec.memory.bytes(),
        cpu_template: (spec.arch == Arch::X86_64).then(|| spec.cpu_template.clone()),
        vsock_uds: spec.vsock.as_ref().map(|v| {
            std::path::absolute(&v.uds)
                .unwrap_or_else(|_| v.uds.clone())
                .display()
                .to_string()
        }),
        identity: vme_api::control::IdentityStatus {
            macs: spec
                .nets
                .iter()
                .filter_map(|n| n.mac.map(|m| m.to_string()))
                .collect(),
            vsock_cid: spec.vsock.as_ref().map(|v| v.cid),
            clone: None,
        },
        clone: clone_status.clone(),
    };
    let _server = match &spec.control_socket {
        Some(path) => match socket::ControlServer::bind(path, control.clone(), facts) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("vme-vmm: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    if let (Some(id), Some(status)) = (identity, clone_status) {
        log::info!(
            "cloning {}: generation {}, MACs {}, vsock CID {}",
            id.snapshot.display(),
            id.generation_id,
            id.macs
                .iter()
                .map(|c| format!("{} (was {})", c.new, c.old))
                .collect::<Vec<_>>()
                .join(", "),
            id.cid.map_or("none".into(), |c| c.to_string())
        );
        // Started before the VM runs; it retries until the restored guest's agent answers.
        snapshot::clone::announce(spec.vsock.as_ref().map(|v| v.uds.clone()), id, status);
    }
    let console = match &spec.serial {
        vme_api::SerialSpec::Socket {
            path,
            log,
            log_size,
        } => match console_socket::ConsoleHub::bind(path, log.as_deref(), *log_size) {
            Ok(hub) => Some(hub),
            Err(e) => {
                eprintln!("vme-vmm: {e}");
                return ExitCode::from(1);
            }
        },
        _ => None,
    };
    let mut raw_terminal = match spec.serial {
        vme_api::SerialSpec::Stdio => console::RawTerminal::enter(),
        _ => None,
    };
    loop {
        let ctx = RunContext {
            control: control.clone(),
            serial: spec.serial.clone(),
            console: console.clone(),
        };
        let outcome = match (spec.arch, restore.take()) {
            (Arch::X86_64, r) => x86::run(&spec, &ctx, r.as_ref()).map_err(|e| e.to_string()),
            (Arch::Riscv64, r) => riscv::run(&spec, &ctx, r.as_ref()),
        };
        match outcome {
            Err(e) => {
                raw_terminal.take();
                eprintln!("vme-vmm: {e}");
                return ExitCode::from(1);
            }
            Ok(ExitReason::Reboot) if spec.on_reboot == RebootAction::Restart => {
                log::info!("guest rebooted; restarting the VM (--on-reboot restart)");
                control.reset_for_restart();
            }
            Ok(reason) => {
                raw_terminal.take();
                match &reason {
                    ExitReason::Crash(why) => eprintln!("vme-vmm: VM crashed: {why}"),
                    ExitReason::Panic(line) => eprintln!("vme-vmm: guest kernel panicked: {line}"),
                    other => log::info!("VM ended: {other:?}"),
                }
                return ExitCode::from(reason.exit_code() as u8);
            }
        }
    }
}
