//! Command-line parsing: run a VM from flags and/or a TOML machine file, or send one command
//! to a running monitor (`ctl`). Flags override the file's fields.

use clap::{Args, Parser, Subcommand};
use log::LevelFilter;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use vme_api::control::{Request, call};
use vme_api::spec::{DiskSpec, Mac, NetSpec};
use vme_api::{Arch, ByteSize, MachineSpec, RebootAction, SerialSpec};

#[derive(Parser, Debug)]
#[command(
    name = "vme-vmm",
    version,
    about = "Run one virtual machine (x86_64 on KVM, riscv64 in software)"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
    /// error, warn, info, debug or trace (default: warn, or $VME_LOG).
    #[arg(long, global = true)]
    pub log_level: Option<String>,
}

impl Cli {
    pub fn log_level(&self) -> LevelFilter {
        self.log_level
            .clone()
            .or_else(|| std::env::var("VME_LOG").ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(LevelFilter::Warn)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Send one command to a running monitor and print its JSON reply.
    Ctl(CtlArgs),
    /// Run a command in the guest through its agent (the VM needs --vsock and the agent);
    /// exits with the command's status.
    Exec(ExecArgs),
    /// Flatten a diff snapshot and its parents into one full snapshot (which no longer
    /// needs them); prints what was written as JSON.
    SnapshotMerge(MergeArgs),
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The diff snapshot (its parents are found through it).
    pub from: PathBuf,
    /// Where to write the full snapshot: a new directory, or FROM itself to flatten it in
    /// place.
    pub to: PathBuf,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// The running monitor's control socket (its --control-socket).
    #[arg(long)]
    pub control_socket: PathBuf,
    /// Kill the command after this many seconds (0: no limit); the exit status is then 124.
    #[arg(long, default_value_t = 0)]
    pub timeout: u64,
    /// How long to wait for the agent to answer (it starts late in the guest's boot).
    #[arg(long, default_value_t = 30)]
    pub wait: u64,
    /// Send our standard input to the command (read to its end first).
    #[arg(long)]
    pub stdin: bool,
    /// The command and its arguments (no shell: use `-- sh -c '...'` for one).
    #[arg(required = true, num_args = 1.., last = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The running monitor's control socket (its --control-socket).
    #[arg(long)]
    pub control_socket: PathBuf,
    /// status, pause, resume, shutdown, stop, balloon <MiB>, balloon-stats, snapshot <DIR>
    /// [--diff], set-limit <device> <KEY=VALUE,...> (e.g. set-limit disk0 bw=20M,iops=off)
    /// or migrate-send <HOST:PORT> [--downtime-ms N] [--bandwidth MiB/s] [--key FILE]
    #[arg(required = true, num_args = 1..)]
    pub command: Vec<String>,
    /// With snapshot: write only the pages changed since the VM's previous snapshot.
    #[arg(long)]
    pub diff: bool,
    /// With migrate-send: the longest pause to aim for, in milliseconds (default 100).
    #[arg(long, value_name = "N")]
    pub downtime_ms: Option<String>,
    /// With migrate-send: the most to send per second, in MiB (default: no cap).
    #[arg(long, value_name = "MiB/s")]
    pub bandwidth: Option<String>,
    /// With migrate-send: the pre-shared key file (required unless the destination is a
    /// loopback address); the destination's --migrate-key must hold the same bytes.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// A TOML machine file with the same fields as the flags.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Restore the VM saved in this snapshot directory (`ctl ... snapshot DIR`) and
    /// continue it. The machine comes from the snapshot; --disk, --net and --vsock replace
    /// the backends of its devices by position (the first --disk the first disk, ...).
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,
    /// Wait at ADDR:PORT for one VM sent by `vme-vmm ctl ... migrate-send`, receive it and
    /// run it. Like --restore, the machine comes from the sender; --disk, --net
    /// and --vsock replace its devices' backends by position.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "restore")]
    pub migrate_listen: Option<String>,
    /// With --migrate-listen: the pre-shared key file the sender must prove it holds
    /// (required unless ADDR is a loopback address; make one with
    /// `head -c 32 /dev/urandom > FILE`).
    #[arg(long, value_name = "FILE", requires = "migrate_listen")]
    pub migrate_key: Option<PathBuf>,
    /// With --restore: start a clone, a new VM with its own identity, rather than continue
    /// the snapshot's VM. Every network device gets a new random MAC (unless its --net
    /// gives mac=), the vsock device a new random CID (unless --vsock gives cid=), and the
    /// guest a fresh entropy seed and generation ID. The new CID reaches the guest by
    /// itself; the MACs and the seed go through the guest agent (needs --vsock), which
    /// `ctl status` shows under identity.clone.
    #[arg(long, requires = "restore")]
    pub clone: bool,
    /// Print the effective machine file and exit.
    #[arg(long)]
    pub print_config: bool,
    /// x86_64 (KVM) or riscv64 (software machine).
    #[arg(long)]
    pub arch: Option<Arch>,
    /// Kernel: bzImage or ELF vmlinux with a PVH note (x86_64), Image (riscv64).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// An initramfs (cpio, optionally compressed) loaded for the kernel.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line (default: "console=ttyS0 quiet panic=-1").
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs (default 1).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Guest memory: 256M, 2G or bytes.
    #[arg(long)]
    pub memory: Option<ByteSize>,
    /// stdio, none, file:PATH, or socket:PATH[,log=FILE][,log_size=BYTES]: a Unix socket
    /// one client at a time attaches to (a new one takes over), output also kept in a log
    /// of at most log_size bytes (default 1M) in FILE and FILE.1.
    #[arg(long)]
    pub serial: Option<SerialSpec>,
    /// A Unix socket for status, pause, resume, shutdown and stop (see `vme-vmm ctl`).
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// auto, host, baseline or pvm (x86_64).
    #[arg(long)]
    pub cpu_template: Option<String>,
    /// What a guest reboot does: exit (status 0) or restart.
    #[arg(long)]
    pub on_reboot: Option<RebootAction>,
    /// A virtio disk: path=FILE[,base=FILE][,readonly=on][,serial=ID][,bw=BYTES][,iops=N]
    /// [,burst_ms=MS]: a raw image, or with base= a vme overlay (docs/overlay.md) on that
    /// read-only base image. bw limits bytes per second (K/M/G suffixes, 4K..1T), iops requests per
    /// second; burst_ms is how many milliseconds at those rates may go at once (default 100).
    /// Repeat for more disks; given on the command line, these replace the machine file's
    /// disks.
    #[arg(long = "disk", value_name = "path=FILE,...")]
    pub disks: Vec<DiskSpec>,
    /// A virtio network device on a host tap: tap=NAME[,mac=52:54:00:12:34:56]. The tap is
    /// created if missing (needs CAP_NET_ADMIN); without a MAC a random local one is used.
    /// Limits per direction (rx: to the guest, tx: from it): rx_bw=BYTES, tx_bw=BYTES (per
    /// second, K/M/G suffixes), rx_pps=N, tx_pps=N (frames per second), burst_ms=MS (default
    /// 100). Repeat for more; given on the command line, these replace the machine file's
    /// nets.
    #[arg(long = "net", value_name = "tap=NAME,...")]
    pub nets: Vec<NetSpec>,
    /// A virtio-vsock device: cid=N (3 and up),uds=PATH. Host programs connect to PATH and
    /// write `CONNECT <port>\n` to reach a guest port; guest connections to host port P go
    /// to the Unix socket PATH_P. With --restore, uds=PATH alone keeps the snapshot's CID
    /// (a new random one with --clone).
    #[arg(long, value_name = "cid=N,uds=PATH")]
    pub vsock: Option<vme_api::vsock::VsockSpec>,
    /// The virtio-rng device: on (default) or off.
    #[arg(long, value_parser = parse_rng)]
    pub rng: Option<bool>,
    /// The virtio-balloon device: on or off (default). With it, `ctl balloon <MiB>` asks the
    /// guest for memory back and `ctl balloon-stats` shows the guest's memory statistics.
    #[arg(long, value_parser = parse_balloon)]
    pub balloon: Option<bool>,
    /// Free page reporting by the balloon (the guest returns free memory by itself): on
    /// (default with --balloon on) or off.
    #[arg(long, value_parser = parse_free_page_reporting)]
    pub free_page_reporting: Option<bool>,
    /// Per-thread seccomp filters: off (default), audit (a syscall outside a thread's list
    /// is logged by the kernel and allowed) or strict (it ends the monitor with status 159).
    /// Applies to --restore and --migrate-listen too.
    #[arg(long, value_name = "off|audit|strict")]
    pub seccomp: Option<vme_api::spec::SeccompMode>,
    /// Print each thread kind's seccomp allow-list (Markdown) and exit.
    #[arg(long)]
    pub print_seccomp: bool,
    /// Confine the monitor before the guest runs (needs root): new mount, PID, IPC and UTS
    /// namespaces, `pivot_root` into DIR holding only this VM's files (at their host paths)
    /// and device nodes, no capabilities, no_new_privs, rlimits, then --jail-uid/--jail-gid.
    /// The directories of its sockets and console log are shared with the host, writable by
    /// that uid. See docs/threat-model.md.
    #[arg(long, value_name = "DIR")]
    pub jail: Option<PathBuf>,
    /// The uid a jailed monitor runs as (default 65534, nobody).
    #[arg(long, value_name = "UID")]
    pub jail_uid: Option<u32>,
    /// The gid a jailed monitor runs as (default 65534).
    #[arg(long, value_name = "GID")]
    pub jail_gid: Option<u32>,
    /// A network namespace a jailed monitor joins first (e.g. /run/netns/NAME); its taps are
    /// looked up (or created) there.
    #[arg(long, value_name = "PATH")]
    pub jail_netns: Option<PathBuf>,
}

impl RunArgs {
    /// The jail flags over `spec`'s `[jail]`; --jail-uid and friends need a jail.
    pub fn apply_jail(&self, spec: &mut MachineSpec) -> Result<(), String> {
        if let Some(dir) = &self.jail {
            let dir = std::path::absolute(dir)
                .map_err(|e| format!("jail directory {}: {e}", dir.display()))?;
            match &mut spec.jail {
                Some(j) => j.dir = dir,
                None => spec.jail = Some(vme_api::jail::JailSpec::new(dir)),
            }
        }
        let given = self.jail_uid.is_some() || self.jail_gid.is_some() || self.jail_netns.is_some();
        let Some(j) = &mut spec.jail else {
            return match given {
                true => Err("--jail-uid, --jail-gid and --jail-netns go with --jail DIR".into()),
                false => Ok(()),
            };
        };
        if let Some(v) = self.jail_uid {
            j.uid = v;
        }
        if let Some(v) = self.jail_gid {
            j.gid = v;
        }
        if let Some(v) = &self.jail_netns {
            j.netns = Some(v.clone());
        }
        j.validate().map_err(|e| e.to_string())
    }
}

fn parse_rng(s: &str) -> Result<bool, String> {
    vme_api::spec::parse_switch("--rng", s).map_err(|e| e.to_string())
}

fn parse_balloon(s: &str) -> Result<bool, String> {
    vme_api::spec::parse_switch("--balloon", s).map_err(|e| e.to_string())
}

fn parse_free_page_reporting(s: &str) -> Result<bool, String> {
    vme_api::spec::parse_switch("--free-page-reporting", s).map_err(|e| e.to_string())
}

/// Like clap's `parse`, but a usage error exits 1 (bad input) rather than clap's 2, which
/// means a crashed VM here.
pub fn parse() -> Cli {
    Cli::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 1 } else { 0 });
    })
}

/// The most vCPUs a VM may have, whatever the host: the x86 machine checks KVM's own limit
/// as well, and the software machine runs one host thread per hart.
pub const MAX_VCPUS: u32 = 254;

/// Builds and checks the spec: the file first, then the flags over it, then every check that
/// can be made before touching KVM.
pub fn machine_spec(args: &RunArgs) -> Result<MachineSpec, String> {
    let mut spec = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read machine file {}: {e}", path.display()))?;
            MachineSpec::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => match &args.kernel {
            Some(k) => MachineSpec::new(k),
            None => return Err("no kernel given: use --kernel PATH or --config FILE".into()),
        },
    };
    if let Some(v) = args.arch {
        spec.arch = v;
    }
    if let Some(v) = &args.kernel {
        spec.kernel = v.clone();
    }
    if let Some(v) = &args.initrd {
        spec.initrd = Some(v.clone());
    }
    if let Some(v) = &args.cmdline {
        spec.cmdline = v.clone();
    }
    if let Some(v) = args.vcpus {
        spec.vcpus = v;
    }
    if let Some(v) = args.memory {
        spec.memory = v;
    }
    if let Some(v) = &args.serial {
        spec.serial = v.clone();
    }
    if let Some(v) = &args.control_socket {
        spec.control_socket = Some(v.clone());
    }
    if let Some(v) = &args.cpu_template {
        spec.cpu_template = v.clone();
    }
    if let Some(v) = args.on_reboot {
        spec.on_reboot = v;
    }
    if !args.disks.is_empty() {
        spec.disks = args.disks.clone();
    }
    if !args.nets.is_empty() {
        spec.nets = args.nets.clone();
    }
    if let Some(v) = args.rng {
        spec.rng = v;
    }
    if let Some(v) = &args.vsock {
        spec.vsock = Some(v.clone());
    }
    if let Some(v) = args.balloon {
        spec.balloon = v;
    }
    if let Some(v) = args.free_page_reporting {
        spec.free_page_reporting = Some(v);
    }
    if let Some(v) = args.seccomp {
        spec.seccomp = v;
    }
    args.apply_jail(&mut spec)?;
    spec.validate(MAX_VCPUS).map_err(|e| e.to_string())?;
    if args.print_config {
        return Ok(spec);
    }
    check_readable("kernel", &spec.kernel)?;
    if let Some(initrd) = &spec.initrd {
        check_readable("initrd", initrd)?;
    }
    for disk in &spec.disks {
        check_disk(disk)?;
    }
    check_host_memory(spec.memory)?;
    // Chosen once per monitor, so a guest reboot keeps its addresses.
    for net in &mut spec.nets {
        if net.mac.is_none() {
            net.mac = Some(random_mac()?);
        }
    }
    Ok(spec)
}

/// A random locally administered unicast MAC address.
fn random_mac() -> Result<Mac, String> {
    use std::io::Read;
    let mut b = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| {
            format!("cannot read /dev/urandom for a random MAC address: {e}; give mac=... in --net")
        })?;
    Ok(Mac::from_random(b))
}

/// A disk must be a file (or block device) the monitor can open the way the guest will use it.
pub(crate) fn check_disk(disk: &DiskSpec) -> Result<(), String> {
    let path = &disk.path;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("disk image {}: {e}: check the path", path.display()))?;
    if meta.is_dir() {
        return Err(format!(
            "disk image {} is a directory, not a raw image",
            path.display()
        ));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(!disk.readonly)
        .open(path)
        .map(|_| ())
        .map_err(|e| {
            let hint = if disk.readonly {
                ""
            } else {
                " (or add readonly=on)"
            };
            format!(
                "cannot open disk image {}: {e}: check its permissions{hint}",
                path.display()
            )
        })?;
    if let Some(base) = &disk.base {
        std::fs::File::open(base).map(|_| ()).map_err(|e| {
            format!(
                "cannot open base image {} of overlay {}: {e}: check the path and its \
                 permissions",
                base.display(),
                path.display()
            )
        })?;
    }
    Ok(())
}

fn check_readable(what: &str, path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("{what} file {}: {e}: check the path", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{what} {} is not a regular file", path.display()));
    }
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| format!("cannot open {what} file {}: {e}", path.display()))
}

/// Guest memory is allocated lazily, but a VM larger than the host's RAM can never be backed.
pub(crate) fn check_host_memory(memory: ByteSize) -> Result<(), String> {
    let Some(total) = host_memory_bytes() else {
        return Ok(());
    };
    if memory.bytes() > total {
        return Err(format!(
            "memory {memory} is more than this host has ({}): lower --memory",
            ByteSize(total / (1 << 20) * (1 << 20))
        ));
    }
    Ok(())
}

fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

pub fn run_ctl(args: CtlArgs) -> ExitCode {
    let mut words = args.command.clone();
    if args.diff {
        if words.first().map(String::as_str) != Some("snapshot") {
            eprintln!("vme-vmm ctl: --diff goes with snapshot only (snapshot DIR --diff)");
            return ExitCode::from(1);
        }
        words.push("--diff".into());
    }
    let migrate = words.first().map(String::as_str) == Some("migrate-send");
    for (flag, value) in [
        ("--downtime-ms", args.downtime_ms.clone()),
        ("--bandwidth", args.bandwidth.clone()),
        ("--key", args.key.as_ref().map(|k| k.display().to_string())),
    ] {
        let Some(value) = value else { continue };
        if !migrate {
            eprintln!("vme-vmm ctl: {flag} goes with migrate-send only");
            return ExitCode::from(1);
        }
        words.extend([flag.to_string(), value]);
    }
    let mut req = match Request::from_words(&words) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vme-vmm ctl: {e}");
            return ExitCode::from(1);
        }
    };
    // Pausing waits for every vCPU to park, which on slow hosts takes a while; a snapshot
    // also writes all of guest memory.
    let mut timeout = Duration::from_secs(30);
    if let Request::Snapshot { dir } | Request::SnapshotDiff { dir } = &mut req {
        // The monitor resolves paths from its own working directory, not ours.
        match std::path::absolute(&*dir) {
            Ok(p) => *dir = p.display().to_string(),
            Err(e) => {
                eprintln!("vme-vmm ctl: snapshot directory {dir:?}: {e}");
                return ExitCode::from(1);
            }
        }
        timeout = Duration::from_secs(600);
    }
    if let Request::MigrateSend { key: Some(key), .. } = &mut req {
        // The monitor reads the key file from its own working directory, not ours.
        match std::path::absolute(&*key) {
            Ok(p) => *key = p.display().to_string(),
            Err(e) => {
                eprintln!("vme-vmm ctl: key file {key:?}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    if let Request::MigrateSend { .. } = req {
        // A migration copies all of RAM, in rounds, before it answers.
        timeout = Duration::from_secs(3600);
    }
    match call(&args.control_socket, &req, timeout) {
        Ok(reply) => {
            println!("{}", serde_json::to_string(&reply).unwrap_or_default());
            if reply.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("vme-vmm ctl: {e}");
            ExitCode::from(1)
        }
    }
}

pub fn run_merge(args: MergeArgs) -> ExitCode {
    match crate::snapshot::diff::merge(&args.from, &args.to) {
        Ok(info) => {
            println!("{}", serde_json::to_string(&info).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vme-vmm snapshot-merge: {e}");
            ExitCode::from(1)
        }
    }
}
