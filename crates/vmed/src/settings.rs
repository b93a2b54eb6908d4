//! The daemon's settings: flags, over an optional TOML file (`vmed --config FILE`, same keys
//! as the flags in snake_case), over the defaults.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use vme_api::ByteSize;

pub const DEFAULT_SOCKET: &str = "/run/vme/vme.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vme";
/// What a monitor may use beyond its guest's memory: its code, device buffers and threads.
pub const DEFAULT_MONITOR_MEMORY: u64 = 64 * MIB;
use vme_api::size::{GIB, MIB};

/// Every setting, each optional: one layer (the flags, or the file).
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub socket: Option<PathBuf>,
    pub group: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub vmm: Option<PathBuf>,
    pub stop_timeout: Option<u64>,
    pub cpu_overcommit: Option<f64>,
    pub memory_overcommit: Option<f64>,
    /// Each VM in its own cgroups: v2, or v1 for a controller the host keeps there (default
    /// true).
    pub cgroups: Option<bool>,
    pub cgroup_root: Option<PathBuf>,
    pub monitor_memory: Option<ByteSize>,
    pub require_controllers: Option<bool>,
    /// Seconds between usage samples.
    pub sample_interval: Option<u64>,
    /// Seconds usage samples are kept.
    pub usage_retention: Option<u64>,
    /// `"1M"` or bytes.
    pub console_log_size: Option<vme_api::ByteSize>,
    /// `"ADDR:PORT"`: also serve the API over HTTPS there (default: off).
    pub https: Option<std::net::SocketAddr>,
    /// The largest blob an image may have (`"64G"` by default).
    pub image_max_size: Option<ByteSize>,
    /// Refuse to launch an image unless a trusted key signed it (default false).
    pub require_signed: Option<bool>,
    /// Publisher keys whose signatures are trusted: `["ed25519:<hex>", ...]`.
    pub trusted_keys: Option<Vec<String>>,
    /// Anchor the audit log's head after this many records (default 100).
    pub audit_anchor_every: Option<u64>,
    /// ... and at least this many seconds after a record while records arrive (default 60).
    pub audit_anchor_interval: Option<u64>,
    /// The security label levels, lowest first (default unclassified, confidential, secret,
    /// topsecret).
    pub label_levels: Option<Vec<String>>,
    /// `"FIRST-LAST"`: the uids (and gids, the same numbers) jailed monitors run as, one
    /// per VM (default `"1000000-1065535"`).
    pub jail_uid_range: Option<String>,
    /// The start of each project's network namespace name (default `"vme-"`).
    pub netns_prefix: Option<String>,
    /// Each project's bridge and taps in a namespace of its own (default true). A test and
    /// diagnostic switch: off leaves one of the two network mechanisms.
    pub per_project_netns: Option<bool>,
    /// Each project's taps on a bridge of its own (default true). A test and diagnostic
    /// switch: off puts every VM on one bridge.
    pub per_project_bridge: Option<bool>,
}

/// The settings in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub socket: PathBuf,
    /// None: the group `vme` if it exists.
    pub group: Option<String>,
    pub state_dir: PathBuf,
    /// None: `vme-vmm` next to `vmed`.
    pub vmm: Option<PathBuf>,
    pub stop_timeout: u64,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub cgroups: bool,
    /// Default: `vme.slice` under the host's cgroup2 mount.
    pub cgroup_root: PathBuf,
    pub monitor_memory: u64,
    pub require_controllers: bool,
    pub sample_interval: u64,
    pub usage_retention: u64,
    /// Each VM's console log holds at most this many bytes (the newest output).
    pub console_log_size: u64,
    /// Where the API is also served over HTTPS, to trusted client certificates only.
    pub https: Option<std::net::SocketAddr>,
    pub images: crate::images::ImageConfig,
    pub audit: crate::audit::AuditConfig,
    pub labels: crate::labels::Levels,
    /// The uids (= gids) jailed monitors get, one per VM.
    pub jail_ids: std::ops::RangeInclusive<u32>,
    /// How projects' networks are built.
    pub network: crate::network::NetConfig,
}

pub const KEYS: &str = "socket, group, state_dir, vmm, stop_timeout, cpu_overcommit, \
    memory_overcommit, cgroups, cgroup_root, monitor_memory, require_controllers, \
    sample_interval, usage_retention, console_log_size, https, image_max_size, require_signed, \
    trusted_keys, audit_anchor_every, audit_anchor_interval, label_levels, jail_uid_range, \
    netns_prefix, per_project_netns, per_project_bridge";

impl Layer {
    /// Reads a settings file; unknown keys are errors (a misspelt key must not be ignored).
    pub fn from_file(path: &Path) -> Result<Layer, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            format!(
                "invalid config file {}: {e}; its keys are {KEYS}",
                path.display()
            )
        })
    }

    /// `self` where set, else `below`.
    pub fn over(self, below: Layer) -> Layer {
        Layer {
            socket: self.socket.or(below.socket),
            group: self.group.or(below.group),
            state_dir: self.state_dir.or(below.state_dir),
            vmm: self.vmm.or(below.vmm),
            stop_timeout: self.stop_timeout.or(below.stop_timeout),
            cpu_overcommit: self.cpu_overcommit.or(below.cpu_overcommit),
            memory_overcommit: self.memory_overcommit.or(below.memory_overcommit),
            cgroups: self.cgroups.or(below.cgroups),
            cgroup_root: self.cgroup_root.or(below.cgroup_root),
            monitor_memory: self.monitor_memory.or(below.monitor_memory),
            require_controllers: self.require_controllers.or(below.require_controllers),
            sample_interval: self.sample_interval.or(below.sample_interval),
            usage_retention: self.usage_retention.or(below.usage_retention),
            console_log_size: self.console_log_size.or(below.console_log_size),
            https: self.https.or(below.https),
            image_max_size: self.image_max_size.or(below.image_max_size),
            require_signed: self.require_signed.or(below.require_signed),
            trusted_keys: self.trusted_keys.or(below.trusted_keys),
            audit_anchor_every: self.audit_anchor_every.or(below.audit_anchor_every),
            audit_anchor_interval: self.audit_anchor_interval.or(below.audit_anchor_interval),
            label_levels: self.label_levels.or(below.label_levels),
            jail_uid_range: self.jail_uid_range.or(below.jail_uid_range),
            netns_prefix: self.netns_prefix.or(below.netns_prefix),
            per_project_netns: self.per_project_netns.or(below.per_project_netns),
            per_project_bridge: self.per_project_bridge.or(below.per_project_bridge),
        }
    }

    /// Fills in the defaults and checks the values.
    pub fn settle(self) -> Result<Settings, String> {
        let s = Settings {
            socket: self.socket.unwrap_or_else(|| DEFAULT_SOCKET.into()),
            group: self.group,
            state_dir: self.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            vmm: self.vmm,
            stop_timeout: self.stop_timeout.unwrap_or(30),
            cpu_overcommit: self.cpu_overcommit.unwrap_or(4.0),
            memory_overcommit: self.memory_overcommit.unwrap_or(1.0),
            cgroups: self.cgroups.unwrap_or(true),
            cgroup_root: self.cgroup_root.unwrap_or_else(crate::cgroup::default_root),
            monitor_memory: self
                .monitor_memory
                .map_or(DEFAULT_MONITOR_MEMORY, ByteSize::bytes),
            require_controllers: self.require_controllers.unwrap_or(false),
            sample_interval: self.sample_interval.unwrap_or(10),
            usage_retention: self.usage_retention.unwrap_or(30 * 86400),
            console_log_size: self
                .console_log_size
                .map_or(vme_api::console_log::DEFAULT_LOG_SIZE, |b| b.bytes()),
            https: self.https,
            images: crate::images::ImageConfig::new(
                self.image_max_size.map(ByteSize::bytes),
                self.require_signed.unwrap_or(false),
                self.trusted_keys.as_deref().unwrap_or_default(),
            )?,
            audit: crate::audit::AuditConfig {
                anchor_every: self.audit_anchor_every.unwrap_or(100),
                anchor_interval: std::time::Duration::from_secs(
                    self.audit_anchor_interval.unwrap_or(60),
                ),
            },
            labels: match &self.label_levels {
                Some(l) => crate::labels::Levels::new(l)?,
                None => crate::labels::Levels::default(),
            },
            jail_ids: crate::jail::parse_range(
                self.jail_uid_range
                    .as_deref()
                    .unwrap_or(crate::jail::DEFAULT_RANGE),
            )?,
            network: crate::network::NetConfig {
                netns_prefix: self
                    .netns_prefix
                    .unwrap_or_else(|| crate::network::DEFAULT_PREFIX.into()),
                per_project_netns: self.per_project_netns.unwrap_or(true),
                per_project_bridge: self.per_project_bridge.unwrap_or(true),
            },
        };
        crate::network::check_prefix(&s.network.netns_prefix)?;
        if s.audit.anchor_every == 0 || !(1..=86_400).contains(&s.audit.anchor_interval.as_secs()) {
            return Err(format!(
                "audit_anchor_every {} or audit_anchor_interval {} s is out of range: give at \
                 least 1 record and 1 to 86400 seconds",
                s.audit.anchor_every,
                s.audit.anchor_interval.as_secs()
            ));
        }
        if !s.cgroup_root.is_absolute() || s.cgroup_root.components().any(|c| c.as_os_str() == "..")
        {
            return Err(format!(
                "cgroup_root {} must be an absolute path without '..', like \
                 /sys/fs/cgroup/vme.slice",
                s.cgroup_root.display()
            ));
        }
        if !(4 * MIB..=64 * GIB).contains(&s.monitor_memory) {
            return Err(format!(
                "monitor_memory {} is out of range: give 4M to 64G, like 64M",
                ByteSize(s.monitor_memory)
            ));
        }
        if !(1..=3600).contains(&s.sample_interval) {
            return Err(format!(
                "sample_interval {} s is out of range: give 1 to 3600 seconds",
                s.sample_interval
            ));
        }
        if s.usage_retention < s.sample_interval {
            return Err(format!(
                "usage_retention {} s is shorter than sample_interval {} s: keep samples longer",
                s.usage_retention, s.sample_interval
            ));
        }
        let (min, max) = (
            vme_api::console_log::MIN_LOG_SIZE,
            vme_api::console_log::MAX_LOG_SIZE,
        );
        if !(min..=max).contains(&s.console_log_size) {
            return Err(format!(
                "console_log_size {} is outside {}..{}: give a size in that range, like 1M",
                vme_api::ByteSize(s.console_log_size),
                vme_api::ByteSize(min),
                vme_api::ByteSize(max)
            ));
        }
        for (key, r) in [
            ("cpu_overcommit", s.cpu_overcommit),
            ("memory_overcommit", s.memory_overcommit),
        ] {
            if !(r.is_finite() && r > 0.0 && r <= 100.0) {
                return Err(format!(
                    "{key} {r} is out of range: give a ratio above 0 and at most 100, like 1.5"
                ));
            }
        }
        // Monitors get their console as `socket:PATH,log=FILE`, where a comma ends a path.
        if s.state_dir.to_string_lossy().contains(',') {
            return Err(format!(
                "state_dir {} contains a comma, which the monitors' console option cannot \
                 carry: choose a path without one",
                s.state_dir.display()
            ));
        }
        if s.stop_timeout > 3600 {
            return Err(format!(
                "stop_timeout {} s is over an hour: give at most 3600",
                s.stop_timeout
            ));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let s = Layer::default().settle().unwrap();
        assert_eq!(s.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(s.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert!(s.cgroups && !s.require_controllers);
        assert!(
            s.cgroup_root.ends_with("vme.slice"),
            "{}",
            s.cgroup_root.display()
        );
        assert_eq!((s.monitor_memory, s.sample_interval), (64 << 20, 10));
        assert_eq!(
            (s.stop_timeout, s.cpu_overcommit, s.memory_overcommit),
            (30, 4.0, 1.0)
        );
    }

    #[test]
    fn flags_over_file_over_defaults() {
        let file: Layer =
            toml::from_str("state_dir = \"/srv/vme\"\nstop_timeout = 10\ncpu_overcommit = 2.5")
                .unwrap();
        let flags = Layer {
            stop_timeout: Some(5),
            ..Layer::default()
        };
        let s = flags.over(file).settle().unwrap();
        assert_eq!(s.console_log_size, 1 << 20);
        let file: Layer = toml::from_str("console_log_size = \"64K\"").unwrap();
        assert_eq!(file.settle().unwrap().console_log_size, 64 << 10);
        assert_eq!(s.state_dir, PathBuf::from("/srv/vme"));
        assert_eq!((s.stop_timeout, s.cpu_overcommit), (5, 2.5));
        assert_eq!(s.socket, PathBuf::from(DEFAULT_SOCKET));
        let file: Layer = toml::from_str("https = \"0.0.0.0:8443\"").unwrap();
        assert_eq!(
            file.settle().unwrap().https,
            Some(([0, 0, 0, 0], 8443).into())
        );
        assert!(toml::from_str::<Layer>("https = \"somewhere\"").is_err());
    }

    #[test]
    fn bad_files_and_values() {
        assert!(toml::from_str::<Layer>("stat_dir = \"/x\"").is_err());
        assert!(toml::from_str::<Layer>("stop_timeout = \"soon\"").is_err());
        for l in [
            Layer {
                cpu_overcommit: Some(0.0),
                ..Layer::default()
            },
            Layer {
                memory_overcommit: Some(f64::NAN),
                ..Layer::default()
            },
            Layer {
                stop_timeout: Some(100_000),
                ..Layer::default()
            },
            Layer {
                cgroup_root: Some("vme.slice".into()),
                ..Layer::default()
            },
            Layer {
                monitor_memory: Some(ByteSize(1024)),
                ..Layer::default()
            },
            Layer {
                sample_interval: Some(0),
                ..Layer::default()
            },
            Layer {
                sample_interval: Some(60),
                usage_retention: Some(30),
                ..Layer::default()
            },
            Layer {
                console_log_size: Some(vme_api::ByteSize(100)),
                ..Layer::default()
            },
            Layer {
                state_dir: Some("/srv/a,b".into()),
                ..Layer::default()
            },
            Layer {
                require_signed: Some(true),
                ..Layer::default()
            },
            Layer {
                trusted_keys: Some(vec!["ed25519:00".into()]),
                ..Layer::default()
            },
            Layer {
                audit_anchor_every: Some(0),
                ..Layer::default()
            },
            Layer {
                audit_anchor_interval: Some(0),
                ..Layer::default()
            },
            Layer {
                netns_prefix: Some("../x".into()),
                ..Layer::default()
            },
        ] {
            assert!(l.settle().is_err());
        }
        // The image policy from a file.
        let key = format!("ed25519:{}", "ab".repeat(32));
        let l: Layer = toml::from_str(&format!(
            "require_signed = true\ntrusted_keys = [\"{key}\"]\nimage_max_size = \"1G\""
        ))
        .unwrap();
        let s = l.settle().unwrap();
        assert_eq!(s.images.max_blob, 1 << 30);
        assert!(s.images.policy(None).require_signed);
        let e = Layer::from_file(Path::new("/nonexistent/vmed.toml")).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
        // The example shipped beside the unit parses and says the defaults.
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/vmed.toml");
        let s = Layer::from_file(&example).unwrap().settle().unwrap();
        assert_eq!(s, Layer::default().settle().unwrap());
    }
}
