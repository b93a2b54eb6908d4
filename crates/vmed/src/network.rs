//! Each project's network: the network row of DESIGN.md principle 3, two mechanisms that
//! keep one project's VMs from sending frames to another's.
//!
//! 1. *Per-project bridge* (`per_project_bridge`): each VM's taps are attached to a bridge
//!    of its project's alone (`vmeb<hash>`), never to another project's. One per label, in
//!    fact: a shared segment carries frames both ways, and Bell–LaPadula allows a flow both
//!    ways only between equal labels (`labels::flow_allowed`), so a project's `secret` VMs
//!    and its `unclassified` ones are on two segments that never meet.
//! 2. *Per-project network namespace* (`per_project_netns`): the project's bridge and taps
//!    live in a namespace of its own (`<netns_prefix><project>`, /run/netns), and the VM's
//!    jailed monitor joins it (`JailSpec::netns`): another project's taps, and the host's,
//!    are not in the monitor's namespace at all.
//!
//! Both are on by default; each can be switched off alone to show the other holding
//! (crates/vmed/tests/network.rs). Off, mechanism 1 puts every VM on one bridge
//! ([`SHARED_BRIDGE`]); off, mechanism 2 keeps bridges and taps in the daemon's namespace.
//!
//! The daemon creates, before each start, its VM's taps (persistent, owned by the VM's jail
//! uid and gid, attached to the bridge, up) and, when missing, the namespace and bridge.
//! Everything here is idempotent: a restarted daemon finds (adopts) what is there. A VM's
//! taps go with the VM; a project's namespace (or its bridge) goes with its last VM that has
//! NICs, and with the project (`DELETE /1.0/projects/NAME`). Done with `ip` (iproute2): the
//! daemon is root, and netlink by hand is more code than these few calls deserve.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// The default prefix of the projects' namespace names.
pub const DEFAULT_PREFIX: &str = "vme-";
/// The one bridge of every VM when `per_project_bridge` is off (a test switch).
pub const SHARED_BRIDGE: &str = "vmebr0";
/// Where `ip netns` keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// How projects' networks are built (settings `netns_prefix`, `per_project_netns`,
/// `per_project_bridge`).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    pub netns_prefix: String,
    /// Mechanism 2; off only to test mechanism 1 alone.
    pub per_project_netns: bool,
    /// Mechanism 1; off only to test mechanism 2 alone.
    pub per_project_bridge: bool,
}

impl Default for NetConfig {
    fn default() -> NetConfig {
        NetConfig {
            netns_prefix: DEFAULT_PREFIX.into(),
            per_project_netns: true,
            per_project_bridge: true,
        }
    }
}

/// Checks a `netns_prefix`: it becomes the start of a file name in /run/netns.
pub fn check_prefix(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && p.len() <= 64
        && !p.starts_with('.')
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "netns_prefix {p:?} must be 1 to 64 letters, digits, '-', '_' or '.', not \
             starting with '.', like {DEFAULT_PREFIX:?}"
        ))
    }
}

impl NetConfig {
    /// The project's namespace name, when projects have their own. Project names are
    /// checked at creation (letters, digits, '-'); one that is not becomes no path at all.
    pub fn netns(&self, project: &str) -> Option<String> {
        let plain = project
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
        self.per_project_netns.then(|| {
            if plain {
                format!("{}{project}", self.netns_prefix)
            } else {
                format!("{}{:08x}", self.netns_prefix, fnv(project))
            }
        })
    }

    /// What the project's jailed monitors join (`/run/netns/NAME`), or None: the daemon's.
    pub fn netns_path(&self, project: &str) -> Option<PathBuf> {
        self.netns(project)
            .map(|n| PathBuf::from(NETNS_DIR).join(n))
    }

    /// The bridge of the project's VMs labelled `label` (its canonical text): 15 bytes at
    /// most, an interface name.
    pub fn bridge(&self, project: &str, label: &str) -> String {
        if !self.per_project_bridge {
            return SHARED_BRIDGE.into();
        }
        // A project name may be longer than an interface name. '\n' is in neither name.
        format!("vmeb{:08x}", fnv(&format!("{project}\n{label}")))
    }

    /// Which VMs share `bridge(project, label)`: what must be unused before it is removed.
    fn bridge_scope<'a>(&self, project: &'a str, label: &'a str) -> Scope<'a> {
        match (self.per_project_bridge, self.per_project_netns) {
            (true, _) => Scope::Segment(project, label),
            (false, true) => Scope::Project(project),
            (false, false) => Scope::Daemon,
        }
    }
}

/// The VMs with NICs a network part serves (see [`release`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scope<'a> {
    /// Every VM of the daemon (the shared bridge in the daemon's namespace).
    Daemon,
    /// The project's (its namespace, or the shared bridge in it).
    Project(&'a str),
    /// The project's VMs of one label (their bridge).
    Segment(&'a str, &'a str),
}

/// FNV-1a: tiny and stable across releases (std's hasher is not).
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Network changes are serialised: a start must not build in a namespace that a delete is
/// removing, and two starts of one project must not both create its bridge.
static BUILDING: Mutex<()> = Mutex::new(());

fn building() -> std::sync::MutexGuard<'static, ()> {
    BUILDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `ip [-n NS] ARGS`; its stderr in the error.
fn ip(ns: Option<&str>, args: &[&str]) -> Result<(), String> {
    ip_out(ns, args).map(drop)
}

/// [`ip`], returning its stdout.
fn ip_out(ns: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let out = cmd.args(args).output().map_err(|e| {
        format!("cannot run ip: {e}: install iproute2 (the daemon builds networks with it)")
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let n = ns.map(|n| format!("-n {n} ")).unwrap_or_default();
    Err(format!(
        "ip {n}{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

fn link_exists(ns: Option<&str>, dev: &str) -> bool {
    ip(ns, &["link", "show", "dev", dev]).is_ok()
}

/// Makes the project's namespace (if it has one) and bridge exist, and its VM's `taps`:
/// persistent, owned by `id` (uid and gid, TUNSETOWNER/TUNSETGROUP), on the bridge, up.
/// Returns the taps it created, for [`remove_taps`] if the start fails before the monitor
/// runs. A tap that exists (the VM's, from an earlier start) is reused.
pub fn prepare(
    cfg: &NetConfig,
    project: &str,
    label: &str,
    id: u32,
    taps: &[String],
) -> Result<Vec<String>, String> {
    if taps.is_empty() {
        return Ok(Vec::new());
    }
    let _one = building();
    let ns = cfg.netns(project);
    let ns = ns.as_deref();
    if let Some(ns) = ns {
        ensure_netns(ns)?;
    }
    let bridge = cfg.bridge(project, label);
    if !link_exists(ns, &bridge) {
        ip(ns, &["link", "add", "name", &bridge, "type", "bridge"])?;
    }
    ip(ns, &["link", "set", "dev", &bridge, "up"])?;
    let id = id.to_string();
    let mut created = Vec::new();
    for tap in taps {
        if let Ok(link) = ip_out(ns, &["-d", "-o", "link", "show", "dev", tap]) {
            // Never enslave a host interface (an admin may name any) to a VM bridge.
            if !link.contains(" tun type tap ") {
                remove(ns, &created);
                return Err(format!(
                    "interface {tap} exists and is not a tap: give the NIC another tap name"
                ));
            }
        } else {
            let made = ip(
                ns,
                &[
                    "tuntap", "add", "dev", tap, "mode", "tap", "user", &id, "group", &id,
                ],
            );
            if let Err(e) = made {
                remove(ns, &created);
                return Err(e);
            }
            created.push(tap.clone());
        }
        if let Err(e) = ip(ns, &["link", "set", "dev", tap, "master", &bridge, "up"]) {
            remove(ns, &created);
            return Err(e);
        }
    }
    Ok(created)
}

/// A namespace that works is adopted; a name left without one (a stale file after a
/// reboot) is replaced.
fn ensure_netns(ns: &str) -> Result<(), String> {
    if ip(Some(ns), &["link", "show", "dev", "lo"]).is_ok() {
        return Ok(());
    }
    let _ = ip(None, &["netns", "delete", ns]);
    ip(None, &["netns", "add", ns])?;
    ip(Some(ns), &["link", "set", "dev", "lo", "up"])
}

fn remove(ns: Option<&str>, taps: &[String]) -> Vec<String> {
    let mut errors = Vec::new();
    for tap in taps {
        let Ok(link) = ip_out(ns, &["-d", "-o", "link", "show", "dev", tap]) else {
            continue;
        };
        // Only taps: an interface of another kind with the name is not the VM's.
        if link.contains(" tun type tap ") {
            if let Err(e) = ip(ns, &["link", "delete", "dev", tap]) {
                errors.push(e);
            }
        }
    }
    errors
}

/// Removes VM taps of `project` (a deleted VM's, or those a failed start created). Missing
/// ones are fine (the namespace may be gone already).
pub fn remove_taps(cfg: &NetConfig, project: &str, taps: &[String]) -> Result<(), String> {
    if taps.is_empty() {
        return Ok(());
    }
    let _one = building();
    let ns = cfg.netns(project);
    if let Some(n) = &ns {
        if !std::path::Path::new(NETNS_DIR).join(n).exists() {
            return Ok(());
        }
    }
    let errors = remove(ns.as_deref(), taps);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// After a VM of `project` labelled `label` (None: the project itself) is gone: removes
/// its bridge, and the project's namespace (with everything in it), that no VM needs any
/// more. `in_use` is asked under the network lock, so that a start in progress is seen.
pub fn release(
    cfg: &NetConfig,
    project: &str,
    label: Option<&str>,
    in_use: impl Fn(Scope) -> bool,
) -> Result<(), String> {
    let _one = building();
    let ns = cfg.netns(project);
    if let Some(n) = &ns {
        if !std::path::Path::new(NETNS_DIR).join(n).exists() {
            return Ok(());
        }
        if !in_use(Scope::Project(project)) {
            return ip(None, &["netns", "delete", n]);
        }
    }
    let Some(label) = label else {
        return Ok(());
    };
    let bridge = cfg.bridge(project, label);
    let ns = ns.as_deref();
    if in_use(cfg.bridge_scope(project, label)) || !link_exists(ns, &bridge) {
        return Ok(());
    }
    ip(ns, &["link", "delete", "dev", &bridge])
}

/// Builds VM `vm`'s network for a start of `spec` (jailed already, see
/// [`crate::jail::confine`]): its taps owned by its jail id, and its monitor jailed into the
/// project's namespace. The taps this start created are removed when the result is dropped
/// before [`Fresh::keep`] (a start that failed before its monitor ran).
pub fn attach(
    cfg: &NetConfig,
    project: &str,
    label: &str,
    spec: &mut vme_api::MachineSpec,
) -> Result<Fresh, String> {
    let taps: Vec<String> = spec.nets.iter().map(|n| n.tap.clone()).collect();
    let Some(jail) = spec.jail.as_mut() else {
        return Err("the monitor is not jailed: its taps would have no owner".into());
    };
    let made = prepare(cfg, project, label, jail.uid, &taps)?;
    if !taps.is_empty() {
        jail.netns = cfg.netns_path(project);
    }
    Ok(Fresh {
        cfg: cfg.clone(),
        project: project.into(),
        taps: made,
    })
}

/// Taps a start created, removed on drop unless kept.
pub struct Fresh {
    cfg: NetConfig,
    project: String,
    taps: Vec<String>,
}

impl Fresh {
    /// The monitor runs: its taps are the VM's now (removed with it).
    pub fn keep(mut self) {
        self.taps.clear();
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        if let Err(e) = remove_taps(&self.cfg, &self.project, &self.taps) {
            eprintln!("vmed: after a failed start: {e}");
        }
    }
}

/// After a VM's deletion (`label`: its label) or its project's (None): [`release`], with the
/// store saying which VMs with NICs remain. A failure is reported on stderr only: the VM is
/// gone, and the next deletion in the project tries again.
pub fn release_for(d: &crate::daemon::Daemon, project: &str, label: Option<&str>) {
    let in_use = |scope: Scope| {
        d.store().list().map_or(true, |vms| {
            vms.iter()
                .filter(|v| !v.spec.nets.is_empty())
                .any(|v| match scope {
                    Scope::Daemon => true,
                    Scope::Project(p) => v.project == p,
                    Scope::Segment(p, l) => v.project == p && segment_label(d, &v.label) == l,
                })
        })
    };
    if let Err(e) = release(&d.config().network, project, label, in_use) {
        eprintln!("vmed: cannot remove project {project:?}'s network: {e}");
    }
}

/// A VM's label as its segment is named: canonical, so that equal labels written
/// differently share a bridge.
pub fn segment_label(d: &crate::daemon::Daemon, label: &str) -> String {
    let levels = &d.auth.levels;
    levels.show(&levels.stored(label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_per_project_and_shared() {
        let cfg = NetConfig::default();
        assert_eq!(cfg.netns("acme").as_deref(), Some("vme-acme"));
        assert_eq!(
            cfg.netns_path("acme"),
            Some(PathBuf::from("/run/netns/vme-acme"))
        );
        let (a, b) = (cfg.bridge("acme", "public"), cfg.bridge("globex", "public"));
        assert_ne!(a, b);
        assert!(a.len() <= vme_api::spec::MAX_TAP_NAME_LEN, "{a}");
        assert_eq!(a, cfg.bridge("acme", "public"));
        assert_ne!(a, cfg.bridge("acme", "secret"), "one segment per label");
        assert_eq!(
            cfg.bridge_scope("acme", "secret"),
            Scope::Segment("acme", "secret")
        );
        let off = NetConfig {
            per_project_netns: false,
            per_project_bridge: false,
            ..cfg
        };
        assert_eq!(off.netns("acme"), None);
        assert_eq!(off.bridge("acme", "a"), off.bridge("globex", "b"));
        assert_eq!(off.bridge_scope("acme", "a"), Scope::Daemon);
        let odd = NetConfig::default().netns("../etc").unwrap();
        assert!(odd.starts_with("vme-") && !odd.contains('/'), "{odd}");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("vme-").is_ok());
        assert!(check_prefix("t-123_x.").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }
}
