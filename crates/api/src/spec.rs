//! The machine specification: everything needed to start one VM. `vme-vmm` reads it from flags
//! or a TOML file; the daemon stores it.

use crate::limits;
use crate::size::{ByteSize, MIB};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The machine kind: x86_64 runs on KVM, riscv64 on the monitor's own interpreter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    #[default]
    X86_64,
    Riscv64,
}

impl FromStr for Arch {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "x86_64" | "x86-64" | "amd64" => Ok(Arch::X86_64),
            "riscv64" => Ok(Arch::Riscv64),
            _ => Err(SpecError(format!(
                "unknown architecture {s:?}: use x86_64 (KVM) or riscv64 (software machine)"
            ))),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::X86_64 => "x86_64",
            Arch::Riscv64 => "riscv64",
        })
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialSpec {
    #[default]
    Stdio,
    File(PathBuf),
    /// A Unix socket one client at a time attaches to (a newer client takes over from an
    /// older one), its output also kept in a bounded log (see [`crate::console_log`]).
    /// Without a client the output only goes to the log: the guest never waits.
    Socket {
        path: PathBuf,
        log: Option<PathBuf>,
        /// The log's cap in bytes.
        log_size: u64,
    },
    None,
}

fn parse_socket(s: &str, rest: &str) -> Result<SerialSpec, SpecError> {
    let usage = || {
        SpecError(format!(
            "invalid serial {s:?}: use socket:PATH[,log=FILE][,log_size=BYTES] (paths without commas)"
        ))
    };
    let mut items = rest.split(',');
    let path = items.next().filter(|p| !p.is_empty()).ok_or_else(usage)?;
    let (mut log, mut log_size) = (None, crate::console_log::DEFAULT_LOG_SIZE);
    for item in items {
        match item.split_once('=') {
            Some(("log", p)) if !p.is_empty() => log = Some(PathBuf::from(p)),
            Some(("log_size", n)) => {
                log_size = n
                    .parse::<ByteSize>()
                    .map_err(|e| SpecError(format!("invalid serial log_size {n:?}: {e}")))?
                    .bytes();
                let (min, max) = (
                    crate::console_log::MIN_LOG_SIZE,
                    crate::console_log::MAX_LOG_SIZE,
                );
                if !(min..=max).contains(&log_size) {
                    return Err(SpecError(format!(
                        "serial log_size {n} is outside {}..{}: choose a size in that range, like 1M",
                        ByteSize(min),
                        ByteSize(max)
                    )));
                }
            }
            _ => return Err(usage()),
        }
    }
    Ok(SerialSpec::Socket {
        path: PathBuf::from(path),
        log,
        log_size,
    })
}

impl FromStr for SerialSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "stdio" => Ok(SerialSpec::Stdio),
            "none" => Ok(SerialSpec::None),
            _ if s.starts_with("socket:") => parse_socket(s, &s["socket:".len()..]),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialSpec::File(PathBuf::from(p))),
                _ => Err(SpecError(format!(
                    "invalid serial {s:?}: use stdio, none, file:PATH or socket:PATH[,log=FILE][,log_size=BYTES]"
                ))),
            },
        }
    }
}

impl fmt::Display for SerialSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialSpec::Stdio => f.write_str("stdio"),
            SerialSpec::None => f.write_str("none"),
            SerialSpec::File(p) => write!(f, "file:{}", p.display()),
            SerialSpec::Socket {
                path,
                log,
                log_size,
            } => {
                write!(f, "socket:{}", path.display())?;
                if let Some(l) = log {
                    write!(f, ",log={}", l.display())?;
                }
                write!(f, ",log_size={log_size}")
            }
        }
    }
}

impl Serialize for SerialSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SerialSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What a guest reboot does to the monitor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebootAction {
    /// The monitor exits with status 0 (the supervisor decides what happens next).
    #[default]
    Exit,
    /// The monitor rebuilds the VM from its spec and boots it again.
    Restart,
}

impl FromStr for RebootAction {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "exit" => Ok(RebootAction::Exit),
            "restart" => Ok(RebootAction::Restart),
            _ => Err(SpecError(format!(
                "invalid on-reboot {s:?}: use exit or restart"
            ))),
        }
    }
}

/// The monitor's per-thread seccomp filters: `off` (none), `audit` (a syscall outside a
/// thread's allow-list is logged by the kernel and goes on) or `strict` (it ends the monitor).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompMode {
    #[default]
    Off,
    Audit,
    Strict,
}

impl SeccompMode {
    pub fn is_off(&self) -> bool {
        *self == SeccompMode::Off
    }
}

impl FromStr for SeccompMode {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "off" => Ok(SeccompMode::Off),
            "audit" => Ok(SeccompMode::Audit),
            "strict" => Ok(SeccompMode::Strict),
            _ => Err(SpecError(format!(
                "invalid seccomp mode {s:?}: use off, audit or strict"
            ))),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Off => "off",
            SeccompMode::Audit => "audit",
            SeccompMode::Strict => "strict",
        })
    }
}

/// Parses an on/off switch as written on the command line or in a key=value list.
pub fn parse_switch(what: &str, s: &str) -> Result<bool, SpecError> {
    match s {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(SpecError(format!("invalid {what} {s:?}: use on or off"))),
    }
}

/// Longest disk serial (what virtio-blk's GET_ID can return).
pub const MAX_SERIAL_LEN: usize = 20;

/// One virtio block device backed by a raw image file, or by a copy-on-write overlay on a
/// read-only base image when `base` is given ([`crate::overlay`]). On the command line:
/// `path=/x.img,readonly=on,serial=abc,bw=10M,iops=500,burst_ms=200` or
/// `path=/vm.ovl,base=/image.raw` (a path cannot contain a comma); in a machine file:
/// `[[disks]]` tables with the same keys. Limits: [`limits`].
///
/// The format is never guessed from a file's contents: without `base` the file is raw, so a
/// guest that writes an overlay header into its raw disk changes nothing about how it opens.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: PathBuf,
    /// The read-only base image `path` is an overlay of (opened read-only, shared lock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
    #[serde(default)]
    pub readonly: bool,
    /// What the guest reads as the disk's serial (`/sys/block/vdX/serial`), at most 20 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Bytes per second read and written together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bw: Option<ByteSize>,
    /// Requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    /// Milliseconds of traffic at the full rates that may go at once (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_ms: Option<u64>,
}

impl DiskSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.path.as_os_str().is_empty() {
            return Err(SpecError("disk path is empty: give path=FILE".into()));
        }
        if self.base.as_ref().is_some_and(|b| b.as_os_str().is_empty()) {
            return Err(SpecError(
                "disk base is empty: give base=FILE (the overlay's base image) or leave it out"
                    .into(),
            ));
        }
        if self.base.as_ref() == Some(&self.path) {
            return Err(SpecError(format!(
                "disk {} is given as its own base: the base is the image the overlay was made \
                 from",
                self.path.display()
            )));
        }
        if let Some(serial) = &self.serial {
            if serial.len() > MAX_SERIAL_LEN || !serial.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(SpecError(format!(
                    "disk serial {serial:?} must be at most {MAX_SERIAL_LEN} printable ASCII \
                     characters without spaces: shorten it"
                )));
            }
        }
        limits::check_bytes_rate("disk bw", self.bw)?;
        limits::check_ops_rate("disk iops", self.iops)?;
        let any = self.bw.is_some() || self.iops.is_some();
        limits::check_burst("disk burst_ms", self.burst_ms, any)?;
        Ok(())
    }
}

impl FromStr for DiskSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut disk = DiskSpec::default();
        for item in s.split(',') {
            let Some((key, value)) = item.split_once('=') else {
                return Err(SpecError(format!(
                    "invalid disk option {item:?} in {s:?}: use path=FILE[,base=FILE][,readonly=on]\
                     [,serial=ID][,bw=BYTES/s][,iops=N][,burst_ms=MS]"
                )));
            };
            match key {
                "path" => disk.path = PathBuf::from(value),
                "base" => disk.base = Some(PathBuf::from(value)),
                "readonly" => disk.readonly = parse_switch("disk readonly", value)?,
                "serial" => disk.serial = Some(value.to_string()),
                "bw" => disk.bw = Some(limits::parse_bytes_rate(key, value)?),
                "iops" => disk.iops = Some(limits::parse_count(key, value)?),
                "burst_ms" => disk.burst_ms = Some(limits::parse_count(key, value)?),
                _ => {
                    return Err(SpecError(format!(
                        "unknown disk option {key:?} in {s:?}: the options are path, base, \
                         readonly, serial, bw, iops and burst_ms"
                    )));
                }
            }
        }
        disk.validate()?;
        Ok(disk)
    }
}

/// An Ethernet MAC address, written `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A random locally administered unicast address from 6 random bytes.
    pub fn from_random(mut bytes: [u8; 6]) -> Mac {
        bytes[0] = (bytes[0] & !1) | 2;
        Mac(bytes)
    }
}

impl FromStr for Mac {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let bad = || {
            SpecError(format!(
                "invalid MAC address {s:?}: write six hex octets like 52:54:00:12:34:56"
            ))
        };
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 != 0 {
            return Err(SpecError(format!(
                "MAC address {s} is a multicast address (lowest bit of the first octet set): \
                 a NIC needs a unicast one, e.g. 52:54:00:12:34:56"
            )));
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Longest network interface name Linux accepts (IFNAMSIZ minus the NUL).
pub const MAX_TAP_NAME_LEN: usize = 15;

/// One virtio-net device on a host tap device. On the command line:
/// `tap=NAME[,mac=52:54:00:12:34:56]`; in a machine file: `[[nets]]` tables with the same
/// keys. The monitor creates the tap when it does not exist (which needs CAP_NET_ADMIN).
/// Without a MAC the monitor picks a random locally administered one at start. Limits per
/// direction (rx: host to guest, tx: guest to host): `rx_bw`/`tx_bw` bytes per second,
/// `rx_pps`/`tx_pps` frames per second, `burst_ms` for all of them ([`limits`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    pub tap: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_bw: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_bw: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_pps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_pps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_ms: Option<u64>,
}

impl NetSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let t = &self.tap;
        if t.is_empty() {
            return Err(SpecError("tap name is empty: give tap=NAME".into()));
        }
        if t.len() > MAX_TAP_NAME_LEN {
            return Err(SpecError(format!(
                "tap name {t:?} is {} bytes; Linux allows at most {MAX_TAP_NAME_LEN}: shorten it",
                t.len()
            )));
        }
        if t == "."
            || t == ".."
            || !t
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
        {
            return Err(SpecError(format!(
                "tap name {t:?} is not a valid interface name: use printable ASCII without \
                 spaces, '/' or ':'"
            )));
        }
        if let Some(mac) = self.mac {
            if mac.0[0] & 1 != 0 {
                return Err(SpecError(format!(
                    "MAC address {mac} is a multicast address: use a unicast one"
                )));
            }
        }
        limits::check_bytes_rate("net rx_bw", self.rx_bw)?;
        limits::check_bytes_rate("net tx_bw", self.tx_bw)?;
        limits::check_ops_rate("net rx_pps", self.rx_pps)?;
        limits::check_ops_rate("net tx_pps", self.tx_pps)?;
        let any = self.rx_bw.or(self.tx_bw).is_some() || self.rx_pps.or(self.tx_pps).is_some();
        limits::check_burst("net burst_ms", self.burst_ms, any)?;
        Ok(())
    }
}

impl FromStr for NetSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut net = NetSpec::default();
        for item in s.split(',') {
            let Some((key, value)) = item.split_once('=') else {
                return Err(SpecError(format!(
                    "invalid net option {item:?} in {s:?}: use tap=NAME[,mac=52:54:00:12:34:56]\
                     [,rx_bw=BYTES/s][,tx_bw=BYTES/s][,rx_pps=N][,tx_pps=N][,burst_ms=MS]"
                )));
            };
            match key {
                "tap" => net.tap = value.to_string(),
                "mac" => net.mac = Some(value.parse()?),
                "rx_bw" => net.rx_bw = Some(limits::parse_bytes_rate(key, value)?),
                "tx_bw" => net.tx_bw = Some(limits::parse_bytes_rate(key, value)?),
                "rx_pps" => net.rx_pps = Some(limits::parse_count(key, value)?),
                "tx_pps" => net.tx_pps = Some(limits::parse_count(key, value)?),
                "burst_ms" => net.burst_ms = Some(limits::parse_count(key, value)?),
                _ => {
                    return Err(SpecError(format!(
                        "unknown net option {key:?} in {s:?}: the options are tap, mac, rx_bw, \
                         tx_bw, rx_pps, tx_pps and burst_ms"
                    )));
                }
            }
        }
        net.validate()?;
        Ok(net)
    }
}

/// A spec that cannot describe a VM; the message says which field and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// The smallest guest memory we accept: below this no Linux kernel we ship can boot.
pub const MIN_MEMORY: u64 = 16 * MIB;
/// The kernel command line the monitor uses when none is given. `panic=-1` turns a guest
/// kernel panic into an immediate reboot, which the monitor reports as a panic (it saw the
/// panic line on the console) instead of hanging forever.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> ByteSize {
    ByteSize(256 * MIB)
}
fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_cpu_template() -> String {
    "auto".to_string()
}
fn default_rng() -> bool {
    true
}

/// One VM. Unknown fields in a TOML file are errors, so a typo never goes unnoticed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineSpec {
    #[serde(default)]
    pub arch: Arch,
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    #[serde(default)]
    pub serial: SerialSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// `auto`, `host`, `baseline` or `pvm` (x86_64 only).
    #[serde(default = "default_cpu_template")]
    pub cpu_template: String,
    #[serde(default)]
    pub on_reboot: RebootAction,
    /// A virtio-rng device fed by the host's getrandom. On by default (unlike Firecracker):
    /// a guest without it can starve for entropy at boot, and it costs nothing until used.
    #[serde(default = "default_rng")]
    pub rng: bool,
    /// A virtio-balloon device, through which the host asks the guest for memory back
    /// (`balloon <MiB>` on the control socket) and reads its memory statistics. Off by
    /// default, as in Firecracker: a balloon is a promise to manage the guest's memory.
    #[serde(default)]
    pub balloon: bool,
    /// Whether the balloon offers free page reporting (the guest hands back large free
    /// blocks by itself). Default: on with the balloon; only valid with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_reporting: Option<bool>,
    /// The monitor's seccomp filters (see [`SeccompMode`]); written only when not `off`, so
    /// machine files and snapshots without it read as before.
    #[serde(default, skip_serializing_if = "SeccompMode::is_off")]
    pub seccomp: SeccompMode,
    /// Where and as whom the monitor confines itself before the guest runs (`[jail]`);
    /// none: it runs as started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<crate::jail::JailSpec>,
    /// virtio block devices, in the order the guest sees them (vda, vdb, ...). Kept last:
    /// TOML writes arrays of tables after plain keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    /// virtio-net devices on host taps, in the order the guest sees them (eth0, eth1, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetSpec>,
    /// A virtio-vsock device (`[vsock]` table), off unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<crate::vsock::VsockSpec>,
}

impl MachineSpec {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        MachineSpec {
            arch: Arch::default(),
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: default_vcpus(),
            memory: default_memory(),
            serial: SerialSpec::default(),
            control_socket: None,
            cpu_template: default_cpu_template(),
            on_reboot: RebootAction::default(),
            rng: default_rng(),
            balloon: false,
            free_page_reporting: None,
            seccomp: SeccompMode::Off,
            jail: None,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
        }
    }

    /// Checks what can be checked without the host: the monitor checks host limits (vCPUs KVM
    /// allows, memory the host can give) itself.
    pub fn validate(&self, max_vcpus: u32) -> Result<(), SpecError> {
        if self.vcpus == 0 {
            return Err(SpecError("vcpus is 0: a VM needs at least 1 vCPU".into()));
        }
        if self.vcpus > max_vcpus {
            return Err(SpecError(format!(
                "{} vCPUs requested, but this machine kind allows at most {max_vcpus}: lower --vcpus",
                self.vcpus
            )));
        }
        if self.memory.bytes() < MIN_MEMORY {
            return Err(SpecError(format!(
                "memory {} is too small: a guest needs at least {}",
                self.memory,
                ByteSize(MIN_MEMORY)
            )));
        }
        if self.memory.bytes() % 4096 != 0 {
            return Err(SpecError(format!(
                "memory {} bytes is not a whole number of 4 KiB pages: round it, e.g. to {}",
                self.memory.bytes(),
                ByteSize(self.memory.bytes().div_ceil(MIB) * MIB)
            )));
        }
        if self.cmdline.len() > 2048 {
            return Err(SpecError(format!(
                "kernel command line is {} bytes; the limit is 2048: shorten --cmdline",
                self.cmdline.len()
            )));
        }
        if self.cmdline.bytes().any(|b| b == 0) {
            return Err(SpecError(
                "kernel command line contains a NUL byte: remove it".into(),
            ));
        }
        if !matches!(
            self.cpu_template.as_str(),
            "auto" | "host" | "baseline" | "pvm"
        ) {
            return Err(SpecError(format!(
                "unknown CPU template {:?}: use auto, host, baseline or pvm",
                self.cpu_template
            )));
        }
        if self.free_page_reporting.is_some() && !self.balloon {
            return Err(SpecError(
                "free_page_reporting is a feature of the balloon device: add --balloon on \
                 (balloon = true) or drop it"
                    .into(),
            ));
        }
        for disk in &self.disks {
            disk.validate()?;
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        if let Some(j) = &self.jail {
            j.validate()?;
        }
        for (i, net) in self.nets.iter().enumerate() {
            net.validate()?;
            if self.nets[..i].iter().any(|n| n.tap == net.tap) {
                return Err(SpecError(format!(
                    "tap {:?} is given twice: each network device needs its own tap",
                    net.tap
                )));
            }
            if let Some(mac) = net.mac {
                if self.nets[..i].iter().any(|n| n.mac == Some(mac)) {
                    return Err(SpecError(format!(
                        "MAC address {mac} is given twice: each network device needs its own"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether the balloon (if any) offers free page reporting.
    pub fn free_page_reporting(&self) -> bool {
        self.balloon && self.free_page_reporting.unwrap_or(true)
    }

    /// Parses a TOML machine file; unknown fields and bad values are named in the error.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        toml::from_str(text).map_err(|e| SpecError(format!("invalid machine file: {e}")))
    }

    pub fn to_toml(&self) -> String {
        // Serialising plain strings, numbers and paths cannot fail.
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn toml_round_trip_and_defaults() {
        let spec = MachineSpec::from_toml("kernel = \"/k\"\nmemory = \"2G\"\nvcpus = 4\n").unwrap();
        assert_eq!(spec.memory, ByteSize(2 << 30));
        assert_eq!(spec.vcpus, 4);
        assert_eq!(spec.cmdline, DEFAULT_CMDLINE);
        assert_eq!(spec.serial, SerialSpec::Stdio);
        let again = MachineSpec::from_toml(&spec.to_toml()).unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn toml_rejects_unknown_fields_and_bad_values() {
        let e = MachineSpec::from_toml("kernel = \"/k\"\nmemroy = \"2G\"\n").unwrap_err();
        assert!(e.0.contains("memroy"), "{e}");
        let e = MachineSpec::from_toml("kernel = \"/k\"\nmemory = \"lots\"\n").unwrap_err();
        assert!(e.0.contains("like 256M"), "{e}");
        let e = MachineSpec::from_toml("kernel = \"/k\"\nserial = \"tcp:1\"\n").unwrap_err();
        assert!(e.0.contains("file:PATH"), "{e}");
    }

    #[test]
    fn validate_names_the_problem() {
        let mut s = MachineSpec::new("/k");
        assert!(s.validate(8).is_ok());
        s.vcpus = 0;
        assert!(s.validate(8).unwrap_err().0.contains("at least 1"));
        s.vcpus = 9;
        assert!(s.validate(8).unwrap_err().0.contains("at most 8"));
        s.vcpus = 1;
        s.memory = ByteSize(1 << 20);
        assert!(s.validate(8).unwrap_err().0.contains("too small"));
        s.memory = ByteSize((64 << 20) + 1);
        assert!(s.validate(8).unwrap_err().0.contains("4 KiB pages"));
        s.memory = ByteSize(64 << 20);
        s.cpu_template = "fast".into();
        assert!(s.validate(8).unwrap_err().0.contains("auto, host"));
    }

    #[test]
    fn serial_and_arch_parse() {
        assert_eq!("file:/tmp/x".parse(), Ok(SerialSpec::File("/tmp/x".into())));
        assert!("file:".parse::<SerialSpec>().is_err());
        let s: SerialSpec = "socket:/v/c.sock,log=/v/c.log,log_size=64K"
            .parse()
            .unwrap();
        assert_eq!(
            s,
            SerialSpec::Socket {
                path: "/v/c.sock".into(),
                log: Some("/v/c.log".into()),
                log_size: 64 << 10
            }
        );
        assert_eq!(s.to_string().parse(), Ok(s));
        let s: SerialSpec = "socket:/c.sock".parse().unwrap();
        assert_eq!(s.to_string(), "socket:/c.sock,log_size=1048576");
        for bad in [
            "socket:",
            "socket:/c,log=",
            "socket:/c,log_size=1",
            "socket:/c,log_size=2G",
            "socket:/c,size=1M",
            "socket:/c,log_size=lots",
        ] {
            assert!(bad.parse::<SerialSpec>().is_err(), "{bad}");
        }
        assert_eq!("riscv64".parse(), Ok(Arch::Riscv64));
        assert!("arm".parse::<Arch>().is_err());
    }
    #[test]
    fn disks_parse_from_flags_and_toml() {
        let d: DiskSpec = "path=/x.img,readonly=on,serial=abc".parse().unwrap();
        assert_eq!(
            d,
            DiskSpec {
                path: "/x.img".into(),
                readonly: true,
                serial: Some("abc".into()),
                ..DiskSpec::default()
            }
        );
        let d: DiskSpec = "path=/y.img".parse().unwrap();
        assert!(!d.readonly && d.serial.is_none() && d.base.is_none());
        let d: DiskSpec = "path=/vm.ovl,base=/img.raw".parse().unwrap();
        assert_eq!(d.base.as_deref(), Some(Path::new("/img.raw")));
        let e = "path=/vm.ovl,base=".parse::<DiskSpec>().unwrap_err();
        assert!(e.0.contains("base is empty"), "{e}");
        let e = "path=/a,base=/a".parse::<DiskSpec>().unwrap_err();
        assert!(e.0.contains("its own base"), "{e}");
        let e = "/y.img".parse::<DiskSpec>().unwrap_err();
        assert!(e.0.contains("path=FILE"), "{e}");
        let e = "path=/y,ro=on".parse::<DiskSpec>().unwrap_err();
        assert!(e.0.contains("unknown disk option \"ro\""), "{e}");
        let e = "path=/y,readonly=maybe".parse::<DiskSpec>().unwrap_err();
        assert!(e.0.contains("use on or off"), "{e}");
        let e = "path=/y,serial=123456789012345678901"
            .parse::<DiskSpec>()
            .unwrap_err();
        assert!(e.0.contains("at most 20"), "{e}");
        assert!(
            "readonly=on"
                .parse::<DiskSpec>()
                .unwrap_err()
                .0
                .contains("empty")
        );

        let text = "kernel = \"/k\"\nrng = false\n[[disks]]\npath = \"/a.img\"\n\
                    [[disks]]\npath = \"/b.img\"\nreadonly = true\nserial = \"s1\"\n\
                    [[disks]]\npath = \"/c.ovl\"\nbase = \"/c.raw\"\n";
        let spec = MachineSpec::from_toml(text).unwrap();
        assert!(!spec.rng);
        assert_eq!(spec.disks.len(), 3);
        assert_eq!(spec.disks[1].serial.as_deref(), Some("s1"));
        assert_eq!(spec.disks[2].base.as_deref(), Some(Path::new("/c.raw")));
        assert_eq!(MachineSpec::from_toml(&spec.to_toml()).unwrap(), spec);
        let e = MachineSpec::from_toml("kernel = \"/k\"\n[[disks]]\npath = \"/a\"\nsize = 1\n")
            .unwrap_err();
        assert!(e.0.contains("size"), "{e}");
        let mut bad = spec.clone();
        bad.disks[0].serial = Some("has space".into());
        assert!(bad.validate(8).is_err());
    }

    #[test]
    fn nets_parse_from_flags_and_toml() {
        let n: NetSpec = "tap=vmtap0,mac=52:54:00:12:34:56".parse().unwrap();
        assert_eq!(n.tap, "vmtap0");
        assert_eq!(n.mac, Some(Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:12:34:56");
        assert!("tap=t".parse::<NetSpec>().unwrap().mac.is_none());
        for (bad, why) in [
            ("tap=", "empty"),
            ("tap=abcdefghijklmnop", "at most 15"),
            ("tap=a/b", "valid interface name"),
            ("tap=a b", "valid interface name"),
            ("tap=t,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=t,mac=52:54:00:12:34", "six hex octets"),
            ("tap=t,mac=52:54:00:12:34:5g", "six hex octets"),
            ("tap=t,mac=52:54:00:12:34:56:78", "six hex octets"),
            ("tap=t,model=e1000", "unknown net option \"model\""),
            ("t0", "tap=NAME"),
        ] {
            let e = bad.parse::<NetSpec>().unwrap_err();
            assert!(e.0.contains(why), "{bad}: {e}");
        }
        let m = Mac::from_random([0xff; 6]);
        assert_eq!(m.0[0] & 3, 2, "locally administered unicast");

        let text = "kernel = \"/k\"\n[[nets]]\ntap = \"a\"\nmac = \"52:54:00:00:00:01\"\n\
                    [[nets]]\ntap = \"b\"\n";
        let spec = MachineSpec::from_toml(text).unwrap();
        assert_eq!(spec.nets.len(), 2);
        assert_eq!(MachineSpec::from_toml(&spec.to_toml()).unwrap(), spec);
        let e = MachineSpec::from_toml("kernel = \"/k\"\n[[nets]]\ntap = \"a\"\nmac = \"zz\"\n")
            .unwrap_err();
        assert!(e.0.contains("six hex octets"), "{e}");
        let mut twice = spec.clone();
        twice.nets[1].tap = "a".into();
        assert!(twice.validate(8).unwrap_err().0.contains("given twice"));
        let mut twice = spec;
        twice.nets[1].mac = twice.nets[0].mac;
        assert!(twice.validate(8).unwrap_err().0.contains("given twice"));
    }

    #[test]
    fn rng_is_on_by_default_and_disks_are_not_written_when_empty() {
        let spec = MachineSpec::from_toml("kernel = \"/k\"\n").unwrap();
        assert!(spec.rng);
        assert!(spec.disks.is_empty());
        assert!(!spec.to_toml().contains("disks"));
    }

    #[test]
    fn balloon_is_off_by_default_and_reporting_needs_it() {
        let spec = MachineSpec::from_toml("kernel = \"/k\"\n").unwrap();
        assert!(!spec.balloon && !spec.free_page_reporting());
        let spec = MachineSpec::from_toml("kernel = \"/k\"\nballoon = true\n").unwrap();
        assert!(spec.balloon && spec.free_page_reporting());
        assert_eq!(MachineSpec::from_toml(&spec.to_toml()).unwrap(), spec);
        let text = "kernel = \"/k\"\nballoon = true\nfree_page_reporting = false\n";
        let spec = MachineSpec::from_toml(text).unwrap();
        assert!(spec.validate(8).is_ok());
        assert!(spec.balloon && !spec.free_page_reporting());
        assert!(spec.to_toml().contains("free_page_reporting = false"));
        let mut bad = spec;
        bad.balloon = false;
        let e = bad.validate(8).unwrap_err();
        assert!(e.0.contains("--balloon on"), "{e}");
    }
}
