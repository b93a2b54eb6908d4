//! `vmed`: serves the REST API on a Unix socket and supervises one `vme-vmm` per VM.

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;
use vmed::admission::{Host, Ratios};
use vmed::daemon::{Config, Daemon};
use vmed::store::SqliteStore;

#[derive(Parser, Debug)]
#[command(
    name = "vmed",
    version,
    about = "The vme daemon: manages VMs behind a REST API on a Unix socket"
)]
struct Args {
    /// The API's Unix socket (mode 0660).
    #[arg(long, default_value = "/run/vme/vme.sock")]
    socket: PathBuf,
    /// The group that may use the API socket (its mode is 0660). Skipped with a note when
    /// the default group `vme` does not exist.
    #[arg(long)]
    group: Option<String>,
    /// Where the state database and each VM's files live.
    #[arg(long, default_value = "/var/lib/vme")]
    state_dir: PathBuf,
    /// The monitor binary (default: vme-vmm next to vmed).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Seconds a guest has to power off after the ACPI power button before it is stopped.
    #[arg(long, default_value_t = 30)]
    stop_timeout: u64,
    /// vCPUs the VMs may be given per host CPU, in all.
    #[arg(long, default_value_t = 4.0)]
    cpu_overcommit: f64,
    /// Guest memory the VMs may be given per byte of host memory, in all.
    #[arg(long, default_value_t = 1.0)]
    memory_overcommit: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    for (flag, r) in [
        ("--cpu-overcommit", args.cpu_overcommit),
        ("--memory-overcommit", args.memory_overcommit),
    ] {
        if !(r.is_finite() && r > 0.0 && r <= 100.0) {
            bail!("{flag} {r} is out of range: give a ratio above 0 and at most 100, like 1.5");
        }
    }
    let vmm = match args.vmm {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find the vmed binary's directory: pass --vmm PATH")?
            .with_file_name("vme-vmm"),
    };
    if !vmm.is_file() {
        bail!(
            "monitor binary {} not found: build vme-vmm (cargo build -p vme-vmm) or pass --vmm PATH",
            vmm.display()
        );
    }
    std::fs::create_dir_all(args.state_dir.join("vms")).with_context(|| {
        format!(
            "cannot create the state dir {}: create it or choose another with --state-dir",
            args.state_dir.display()
        )
    })?;
    // VM specs name host files and sockets: only the daemon's user may look inside.
    std::fs::set_permissions(&args.state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set the mode of {}", args.state_dir.display()))?;
    let db = args.state_dir.join("vmed.db");
    let store = SqliteStore::open(&db)
        .with_context(|| format!("cannot open the state database {}", db.display()))?;
    let cfg = Config {
        state_dir: args.state_dir,
        vmm,
        stop_timeout: Duration::from_secs(args.stop_timeout),
        host: Host::probe(),
        ratios: Ratios {
            cpu: args.cpu_overcommit,
            memory: args.memory_overcommit,
        },
    };
    let daemon = Daemon::new(cfg, Box::new(store)).context("cannot read the state database")?;

    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = bind(&args.socket, args.group.as_deref())?;
        eprintln!("vmed: serving on {}", args.socket.display());
        axum::serve(listener, vmed::api::router(daemon))
            .with_graceful_shutdown(shutdown())
            .await
            .context("the API server failed")
    })
}

/// Binds the API socket, replacing a stale one but never a live daemon's.
fn bind(path: &std::path::Path, group: Option<&str>) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create {}: create it or choose another --socket",
                dir.display()
            )
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another vmed already serves {}: stop it first or choose another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path).with_context(|| {
        format!(
            "cannot listen on {}: choose another --socket",
            path.display()
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    let name = group.unwrap_or("vme");
    match group_id(name) {
        Some(gid) => std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
            format!(
                "cannot give {} to group {name}: run vmed as root or choose another --group",
                path.display()
            )
        })?,
        None if group.is_some() => {
            bail!(
                "group {name:?} does not exist: create it (groupadd {name}) or choose another --group"
            )
        }
        None => eprintln!(
            "vmed: no group vme; only {}'s owner may use it",
            path.display()
        ),
    }
    Ok(listener)
}

/// The id of the group `name`, from /etc/group (no NSS lookup: the daemon's groups are
/// local system groups).
fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
    })
}

/// Ends serving on SIGINT or SIGTERM. The VMs keep running: their monitors are in their own
/// process groups.
async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
