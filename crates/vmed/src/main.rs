//! `vmed`: serves the REST API on a Unix socket and supervises one `vme-vmm` per VM.

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;
use vmed::admission::{Host, Ratios};
use vmed::daemon::{Config, Daemon};
use vmed::settings::Layer;
use vmed::store::SqliteStore;

#[derive(Parser, Debug)]
#[command(
    name = "vmed",
    version,
    about = "The vme daemon: manages VMs behind a REST API on a Unix socket"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    /// A TOML file with any of the settings below (snake_case keys); flags override it.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// The API's Unix socket, mode 0660 (default /run/vme/vme.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The group that may use the API socket. Default: vme, skipped with a note when that
    /// group does not exist.
    #[arg(long)]
    group: Option<String>,
    /// Where the state database and each VM's files live (default /var/lib/vme).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// The monitor binary (default: vme-vmm next to vmed).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Seconds a guest has to power off after the ACPI power button before it is stopped
    /// (default 30).
    #[arg(long)]
    stop_timeout: Option<u64>,
    /// vCPUs the VMs may be given per host CPU, in all (default 4).
    #[arg(long)]
    cpu_overcommit: Option<f64>,
    /// Guest memory the VMs may be given per byte of host memory, in all (default 1).
    #[arg(long)]
    memory_overcommit: Option<f64>,
    /// Print the API's OpenAPI 3 document (as served at /1.0/openapi.json) and exit:
    /// `vmed --print-openapi > docs/openapi.json` regenerates the committed copy.
    #[arg(long)]
    print_openapi: bool,
    /// Run each VM's monitor in its own cgroups with its limits (default true): v2, or v1 for
    /// a controller the host keeps there; false runs them unconfined.
    #[arg(long, value_name = "BOOL")]
    cgroups: Option<bool>,
    /// The cgroup under which each VM gets vm-NAME (default: vme.slice under the host's
    /// cgroup2 mount, normally /sys/fs/cgroup/vme.slice).
    #[arg(long, value_name = "DIR")]
    cgroup_root: Option<PathBuf>,
    /// Memory a monitor may use beyond its guest's: memory.max = guest memory + this
    /// (default 64M).
    #[arg(long, value_name = "SIZE")]
    monitor_memory: Option<vme_api::ByteSize>,
    /// Refuse a start when memory.max or the default cpu.max cannot be set for want of a
    /// cgroup controller (default false: skipped, with a note in the monitor's log).
    #[arg(long, value_name = "BOOL")]
    require_controllers: Option<bool>,
    /// Seconds between usage samples (default 10).
    #[arg(long, value_name = "SECONDS")]
    sample_interval: Option<u64>,
    /// Seconds usage samples are kept (default 30 days).
    #[arg(long, value_name = "SECONDS")]
    usage_retention: Option<u64>,
    /// The cap of each VM's console log: 1M (default), 64K, or bytes.
    #[arg(long)]
    console_log_size: Option<vme_api::ByteSize>,
    /// Also serve the API over HTTPS on ADDR:PORT (like 0.0.0.0:8443; default off), to
    /// clients whose certificate is trusted (`vmed trust add`). The server certificate is
    /// made on the first start, in STATE/tls/.
    #[arg(long, value_name = "ADDR:PORT")]
    https: Option<std::net::SocketAddr>,
    /// The largest blob (kernel, initrd, disk) an imported image may have (default 64G).
    #[arg(long, value_name = "SIZE")]
    image_max_size: Option<vme_api::ByteSize>,
    /// Launch only images signed by a trusted key (default false).
    #[arg(long, value_name = "BOOL")]
    require_signed: Option<bool>,
    /// A trusted image publisher key, ed25519:<hex> as `vme image keygen` prints it
    /// (repeatable; replaces the config file's trusted_keys).
    #[arg(long = "trusted-key", value_name = "KEY")]
    trusted_keys: Vec<String>,
    /// Anchor the audit log's head (STATE/audit.anchors, the event stream) after this many
    /// records (default 100)...
    #[arg(long, value_name = "N")]
    audit_anchor_every: Option<u64>,
    /// ... and at least this many seconds after a record while records arrive (default 60).
    #[arg(long, value_name = "SECONDS")]
    audit_anchor_interval: Option<u64>,
    /// The security label levels, lowest first, comma-separated (default
    /// unclassified,confidential,secret,topsecret). Changing them later leaves labels of
    /// removed levels unreadable: such objects are hidden from everyone.
    #[arg(long, value_name = "LEVELS", value_delimiter = ',')]
    label_levels: Vec<String>,
    /// The uids (and gids) jailed monitors run as, one per VM: FIRST-LAST (default
    /// 1000000-1065535). Keep the range free of the host's own users.
    #[arg(long, value_name = "FIRST-LAST")]
    jail_uid_range: Option<String>,
    /// The start of each project's network namespace name, /run/netns/PREFIXPROJECT
    /// (default vme-).
    #[arg(long, value_name = "PREFIX")]
    netns_prefix: Option<String>,
    /// Each project's bridge and taps in a network namespace of its own (default true).
    /// Test and diagnostic switch: false leaves only the per-project bridges.
    #[arg(long, value_name = "BOOL")]
    per_project_netns: Option<bool>,
    /// Each project's taps on a bridge of its own (default true). Test and diagnostic
    /// switch: false puts every VM on one bridge (vmebr0).
    #[arg(long, value_name = "BOOL")]
    per_project_bridge: Option<bool>,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// The client certificates allowed to use the API over HTTPS (STATE/tls/trusted/).
    /// Changes take effect at the next connection; the daemon need not run.
    #[command(subcommand)]
    Trust(TrustCmd),
}

#[derive(clap::Subcommand, Debug)]
enum TrustCmd {
    /// Trust the client certificate in a PEM file (the one `vme remote cert` names).
    Add { file: PathBuf },
    /// List the trusted certificates: fingerprint and file.
    List,
    /// Stop trusting a certificate, by its SHA-256 fingerprint.
    Remove { fingerprint: String },
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.print_openapi {
        print!("{}", vmed::api::openapi_text());
        return Ok(());
    }
    // Before any thread exists, so that all of the daemon's inherit it.
    prefer_the_daemon();
    let flags = Layer {
        socket: args.socket,
        group: args.group,
        state_dir: args.state_dir,
        vmm: args.vmm,
        stop_timeout: args.stop_timeout,
        cpu_overcommit: args.cpu_overcommit,
        memory_overcommit: args.memory_overcommit,
        cgroups: args.cgroups,
        cgroup_root: args.cgroup_root,
        monitor_memory: args.monitor_memory,
        require_controllers: args.require_controllers,
        sample_interval: args.sample_interval,
        usage_retention: args.usage_retention,
        console_log_size: args.console_log_size,
        https: args.https,
        image_max_size: args.image_max_size,
        require_signed: args.require_signed,
        trusted_keys: (!args.trusted_keys.is_empty()).then_some(args.trusted_keys),
        audit_anchor_every: args.audit_anchor_every,
        audit_anchor_interval: args.audit_anchor_interval,
        label_levels: (!args.label_levels.is_empty()).then_some(args.label_levels),
        jail_uid_range: args.jail_uid_range,
        netns_prefix: args.netns_prefix,
        per_project_netns: args.per_project_netns,
        per_project_bridge: args.per_project_bridge,
    };
    let file = match &args.config {
        Some(p) => Layer::from_file(p).map_err(anyhow::Error::msg)?,
        None => Layer::default(),
    };
    let mut settings = flags.over(file).settle().map_err(anyhow::Error::msg)?;
    if let Some(Sub::Trust(cmd)) = args.command {
        return trust(&settings.state_dir, cmd);
    }
    let vmm = match settings.vmm {
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
    std::fs::create_dir_all(settings.state_dir.join("vms")).with_context(|| {
        format!(
            "cannot create the state dir {}: create it or choose another with --state-dir",
            settings.state_dir.display()
        )
    })?;
    // Absolute: the paths under it (image blobs, VM volumes, sockets) go into VM specs that
    // other processes, with other working directories, read.
    settings.state_dir = std::fs::canonicalize(&settings.state_dir).with_context(|| {
        format!(
            "cannot resolve the state dir {}",
            settings.state_dir.display()
        )
    })?;
    // VM specs name host files and sockets: only the daemon's user may look inside.
    std::fs::set_permissions(&settings.state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set the mode of {}", settings.state_dir.display()))?;
    let db = settings.state_dir.join("vmed.db");
    let store = SqliteStore::open(&db)
        .with_context(|| format!("cannot open the state database {}", db.display()))?;
    let tls = settings
        .https
        .map(|_| tls_config(&settings.state_dir))
        .transpose()?;
    let tls_state_dir = settings.state_dir.clone();
    let audit_state_dir = settings.state_dir.clone();
    let cfg = Config {
        state_dir: settings.state_dir,
        vmm,
        stop_timeout: Duration::from_secs(settings.stop_timeout),
        host: Host::probe(),
        ratios: Ratios {
            cpu: settings.cpu_overcommit,
            memory: settings.memory_overcommit,
        },
        cgroups: vmed::cgroup::CgroupConfig {
            enabled: settings.cgroups,
            root: settings.cgroup_root,
            monitor_memory: settings.monitor_memory,
            require_controllers: settings.require_controllers,
        },
        sample_interval: Duration::from_secs(settings.sample_interval),
        usage_retention: Duration::from_secs(settings.usage_retention),
        console_log_size: settings.console_log_size,
        images: settings.images,
        labels: settings.labels,
        jail_ids: settings.jail_ids,
        network: settings.network,
    };
    if let Some(note) = vmed::cgroup::startup_note(&cfg.cgroups) {
        eprintln!("vmed: {note}");
    }
    vmed::crashpoint::check().map_err(anyhow::Error::msg)?;
    let daemon = Daemon::new(cfg, Box::new(store)).context("cannot read the state database")?;
    let events = daemon.events.clone();
    let audit = vmed::audit::AuditLog::open(&audit_state_dir, settings.audit, events.clone())
        .context(
            "cannot open the audit log: check the state dir, or move a damaged audit.db away",
        )?;
    let _ = daemon.audit.set(audit.clone());

    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let served = rt.block_on(async move {
        let listener = bind(&settings.socket, settings.group.as_deref())?;
        eprintln!("vmed: serving on {}", settings.socket.display());
        let app = vmed::api::router(daemon);
        let https = match (settings.https, tls) {
            (Some(addr), Some(cfg)) => {
                let tcp = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}: choose another --https"))?;
                eprintln!("vmed: serving HTTPS on {}", tcp.local_addr()?);
                futures_util::future::Either::Left(vmed::https::serve(
                    tcp,
                    cfg,
                    tls_state_dir,
                    app.clone(),
                ))
            }
            _ => futures_util::future::Either::Right(std::future::pending()),
        };
        // Each connection's peer uid (SO_PEERCRED) identifies its user (see vmed::authz).
        let unix = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<vmed::authz::Peer>(),
        )
        .with_graceful_shutdown(async move {
            shutdown().await;
            // Event streams and waits would otherwise keep the server from stopping.
            events.close();
        });
        // The HTTPS side serves until the Unix side has shut down gracefully.
        tokio::select! {
            r = unix => r.context("the API server failed"),
            () = https => Ok(()),
        }
    });
    // Anchors the head: a clean stop leaves no record unanchored.
    audit.close();
    served
}

/// The HTTPS server's TLS settings, its certificate made on the first start.
fn tls_config(state_dir: &std::path::Path) -> Result<rustls::ServerConfig> {
    let id = vmed::tls::server_identity(state_dir).map_err(anyhow::Error::msg)?;
    vmed::tls::tighten(state_dir);
    eprintln!(
        "vmed: {} server certificate {}, SHA-256 fingerprint {}",
        if id.created { "made the" } else { "using the" },
        id.cert_path.display(),
        vmed::tls::fingerprint(&id.cert)
    );
    vmed::https::server_config(&id).map_err(anyhow::Error::msg)
}

/// `vmed trust ...`: works on the state dir alone, with or without a running daemon.
fn trust(state_dir: &std::path::Path, cmd: TrustCmd) -> Result<()> {
    match cmd {
        TrustCmd::Add { file } => {
            let fp = vmed::tls::add(state_dir, &file).map_err(anyhow::Error::msg)?;
            vmed::tls::tighten(state_dir);
            println!("trusted {fp}");
        }
        TrustCmd::List => {
            for t in vmed::tls::trusted(state_dir) {
                println!("{}  {}", t.fingerprint, t.file.display());
            }
        }
        TrustCmd::Remove { fingerprint } => {
            for f in vmed::tls::remove(state_dir, &fingerprint).map_err(anyhow::Error::msg)? {
                println!("removed {}", f.display());
            }
        }
    }
    Ok(())
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

/// The daemon's own niceness: its work is short bursts (API requests, state changes,
/// supervision) and should not queue behind guests that keep the host's CPUs busy, now that
/// VMs weigh their vCPUs (see cgroup/weight.rs). It costs the guests little; monitors are
/// spawned back at 0.
const DAEMON_NICE: libc::c_int = -10;

fn prefer_the_daemon() {
    // SAFETY: setpriority(2) on this process with plain integers. Without CAP_SYS_NICE it
    // fails and the daemon simply keeps its niceness.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, DAEMON_NICE) };
    if r != 0 {
        eprintln!(
            "vmed: cannot raise the daemon's priority (nice {DAEMON_NICE}): {}; the API may \
             answer slowly while guests keep the host busy",
            std::io::Error::last_os_error()
        );
    }
}
