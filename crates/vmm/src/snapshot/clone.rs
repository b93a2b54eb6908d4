//! Clones (`vme-vmm --restore DIR --clone`): a restore that starts a new VM from the
//! snapshot rather than continuing the old one, so it gets its own identity — every NIC a
//! new MAC, the vsock device a new CID, the guest a fresh entropy seed and a new
//! generation ID. Without this, N restores of one snapshot are twins: same addresses on
//! the network, same CID, and the same random numbers from the same CRNG state.
//!
//! What reaches the guest by itself: the vsock CID (the restored device sends a transport
//! reset, on which Linux reads its CID again) and the MACs in the devices' config space.
//! What needs the guest agent: Linux reads a virtio-net MAC only at probe and a virtio-rng
//! device does not force a reseed, so [`announce`] sends the seed and the MAC changes to
//! the agent over the VM's vsock socket, in the background, until it answers.

use crate::cli::RunArgs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vme_api::MachineSpec;
use vme_api::agent::{AgentClient, MacChange, Seed};
use vme_api::control::{CloneGuestState, CloneStatus};
use vme_api::identity::SEED_LEN;
use vme_api::spec::Mac;
use vme_api::vsock::CID_UNSET;
use vme_devices::virtio::DeviceState;
use vme_devices::virtio::mmio::MmioState;
use vme_devices::virtio::pci::PciState;
use vme_devices::virtio::transport::CoreState;

/// How long the monitor keeps trying to reach the guest's agent. A snapshot taken while
/// the guest was still booting may restore long before its agent starts (minutes on the
/// software machine).
const ANNOUNCE_WAIT: Duration = Duration::from_secs(600);
/// Between attempts.
const RETRY: Duration = Duration::from_millis(250);

/// A clone's new identity, chosen when its restore is prepared.
#[derive(Clone, Debug)]
pub struct CloneIdentity {
    /// The snapshot it was cloned from, for the status.
    pub snapshot: PathBuf,
    pub seed: Seed,
    /// 128 random bits: tells this clone's life apart from its siblings'. On x86_64 the
    /// guest reads it as its ACPI VM Generation ID.
    pub generation: [u8; 16],
    /// The same in hex, for the status.
    pub generation_id: String,
    /// Every network device's old and new address, in `--net` order.
    pub macs: Vec<MacChange>,
    /// The new vsock CID, when the VM has a vsock device.
    pub cid: Option<u64>,
}

/// Fills `buf` from the host kernel's CSPRNG.
pub fn random(buf: &mut [u8], what: &str) -> Result<(), String> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!(
                "cannot get random bytes for {what} from the host (getrandom): {e}"
            ));
        }
        done += n as usize;
    }
    Ok(())
}

/// A random locally administered unicast MAC that is none of `taken`.
pub fn new_mac(taken: &[Mac]) -> Result<Mac, String> {
    loop {
        let mut b = [0u8; 6];
        random(&mut b, "a clone's MAC address")?;
        let mac = Mac::from_random(b);
        if !taken.contains(&mac) {
            return Ok(mac);
        }
    }
}

/// A random valid guest CID (3 to 2^32 - 2) other than `old`.
pub fn new_cid(old: u64) -> Result<u64, String> {
    loop {
        let mut b = [0u8; 4];
        random(&mut b, "a clone's vsock CID")?;
        let cid = u64::from(u32::from_le_bytes(b));
        if vme_devices::virtio::vsock::valid_cid(cid) && cid != old {
            return Ok(cid);
        }
    }
}

/// Gives `spec` (the snapshot's machine with the flags' backends already in it) a new
/// identity: a MAC for every network device the flags gave none, a CID unless the flags
/// gave one, a seed and a generation ID. `saved` is the snapshot's machine as it was.
pub fn new_identity(
    dir: &Path,
    spec: &mut MachineSpec,
    saved: &MachineSpec,
    args: &RunArgs,
) -> Result<CloneIdentity, String> {
    let mut macs = Vec::new();
    let old_macs: Vec<Mac> = saved.nets.iter().filter_map(|n| n.mac).collect();
    for (i, net) in spec.nets.iter_mut().enumerate() {
        let given = args.nets.get(i).and_then(|n| n.mac);
        let old = saved.nets[i].mac;
        let mut taken = old_macs.clone();
        taken.extend(macs.iter().map(|c: &MacChange| c.new));
        let new = match given {
            Some(m) => m,
            None => new_mac(&taken)?,
        };
        net.mac = Some(new);
        // A device without a saved MAC had the monitor's fixed fallback, which the agent
        // could not look for; such a spec never comes from vme-vmm's own snapshots.
        if let Some(old) = old.filter(|&o| o != new) {
            macs.push(MacChange { old, new });
        }
    }
    let mut cid = None;
    if let Some(v) = &mut spec.vsock {
        let old = saved.vsock.as_ref().map_or(CID_UNSET, |v| v.cid);
        let given = args.vsock.as_ref().map(|a| a.cid);
        v.cid = match given.filter(|&c| c != CID_UNSET) {
            Some(c) => c,
            None => new_cid(old)?,
        };
        cid = Some(v.cid);
    }
    let mut seed = [0u8; SEED_LEN];
    random(&mut seed, "a clone's entropy seed")?;
    let mut generation = [0u8; 16];
    random(&mut generation, "a clone's generation ID")?;
    Ok(CloneIdentity {
        snapshot: dir.to_path_buf(),
        seed: Seed(seed),
        generation_id: generation.iter().map(|b| format!("{b:02x}")).collect(),
        generation,
        macs,
        cid,
    })
}

/// A transport's saved state, whose device part a clone rewrites.
pub trait SlotState {
    fn core_mut(&mut self) -> &mut CoreState;
}

impl SlotState for MmioState {
    fn core_mut(&mut self) -> &mut CoreState {
        &mut self.core
    }
}

impl SlotState for PciState {
    fn core_mut(&mut self) -> &mut CoreState {
        &mut self.core
    }
}

/// Makes the saved network devices' MACs those of `spec`: the restored devices then
/// accept the state (a plain restore refuses a MAC the guest does not know) and show the
/// new address in their config space.
pub fn adopt_macs<T: SlotState>(states: &mut [T], spec: &MachineSpec) {
    let mut macs = spec.nets.iter().map(|n| n.mac);
    for st in states {
        if let DeviceState::Net(net) = &mut st.core_mut().device {
            if let Some(Some(mac)) = macs.next() {
                net.mac = mac.0;
            }
        }
    }
}

/// The clone's status as `ctl status` shows it, before the guest has heard of it.
pub fn initial_status(id: &CloneIdentity, has_vsock: bool) -> CloneStatus {
    let (guest, detail) = match has_vsock {
        true => (CloneGuestState::Pending, None),
        false => (CloneGuestState::NoAgent, Some(NO_AGENT.to_string())),
    };
    CloneStatus {
        snapshot: id.snapshot.display().to_string(),
        generation_id: id.generation_id.clone(),
        guest,
        detail,
    }
}

const NO_AGENT: &str = "this clone has no vsock device, so its guest agent cannot be told: \
                        inside, the guest keeps its parent's MACs and random generator state \
                        until it reseeds by itself (give the VM --vsock and run vme-agent in \
                        it)";

/// Tells the guest's agent, through the vsock socket `uds`, about the clone's seed and
/// MACs, retrying in a background thread until it answers; `status` follows.
pub fn announce(uds: Option<PathBuf>, id: CloneIdentity, status: Arc<Mutex<CloneStatus>>) {
    let Some(uds) = uds else {
        log::warn!("{NO_AGENT}");
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("clone-identity".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::Kind::Api);
            let (state, detail) = deliver(&uds, &id);
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            s.guest = state;
            s.detail = Some(detail);
        });
    if let Err(e) = spawned {
        log::warn!(
            "cannot start the thread that tells the guest agent its clone identity: {e}; \
             the guest keeps its parent's MACs and random generator state inside"
        );
    }
}

fn deliver(uds: &Path, id: &CloneIdentity) -> (CloneGuestState, String) {
    let started = Instant::now();
    // Short at first: a guest that answers before it has handled the transport reset
    // answers from its old CID, which the device drops, so that attempt can only time
    // out. Longer later, for a slow guest.
    let mut patience = Duration::from_secs(1);
    loop {
        let last = match attempt(uds, id, patience) {
            Ok(detail) => {
                log::info!(
                    "clone identity applied after {:.1} s: {detail}",
                    started.elapsed().as_secs_f64()
                );
                return (CloneGuestState::Applied, detail);
            }
            // The agent answered and refused: trying again would not change that.
            Err(e) if e.to_string().contains("the guest agent says") => {
                let detail =
                    format!("{e}; the guest may keep its parent's MACs or random generator state");
                log::warn!("clone identity: {detail}");
                return (CloneGuestState::Failed, detail);
            }
            // Not up yet, a connection cut by the transport reset, or a guest still on its
            // old CID.
            Err(e) => e.to_string(),
        };
        log::debug!("clone identity: the agent did not take it yet: {last}");
        if started.elapsed() >= ANNOUNCE_WAIT {
            let detail = format!(
                "the guest agent did not answer within {} s ({last}): the guest keeps its \
                 parent's MACs and random generator state inside; check that vme-agent runs \
                 in the guest",
                ANNOUNCE_WAIT.as_secs()
            );
            log::warn!("clone identity: {detail}");
            return (CloneGuestState::Failed, detail);
        }
        patience = (patience * 2).min(Duration::from_secs(16));
        std::thread::sleep(RETRY);
    }
}

/// One try: connect, send the identity, and describe what the agent did.
fn attempt(uds: &Path, id: &CloneIdentity, patience: Duration) -> std::io::Result<String> {
    let mut client = AgentClient::connect(uds, vme_api::agent::AGENT_PORT, patience)?;
    let applied = client.identity(id.seed, &id.macs)?;
    Ok(format!(
        "the agent reseeded the guest's random generator and changed {} interface(s) [{}]; \
         the guest's vsock CID is {}",
        applied.interfaces.len(),
        applied.interfaces.join(", "),
        applied.cid.map_or("unknown".into(), |c| c.to_string())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_macs_are_local_unicast_and_avoid_taken_ones() {
        let taken: Vec<Mac> = (0..4).map(|_| new_mac(&[]).unwrap()).collect();
        for _ in 0..200 {
            let m = new_mac(&taken).unwrap();
            assert_eq!(m.0[0] & 1, 0, "{m} is multicast");
            assert_eq!(m.0[0] & 2, 2, "{m} is not locally administered");
            assert!(!taken.contains(&m));
            // The spec's own parser accepts it, so a clone's machine file reads back.
            assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
        }
        let all: std::collections::HashSet<_> = (0..200).map(|_| new_mac(&[]).unwrap()).collect();
        assert!(all.len() > 190, "random MACs repeat: {}", all.len());
    }

    #[test]
    fn a_clone_without_vsock_says_its_guest_cannot_be_told() {
        let saved = spec_with(&["52:54:00:00:00:01"], None);
        let mut spec = saved.clone();
        let id = new_identity(Path::new("/s"), &mut spec, &saved, &RunArgs::default()).unwrap();
        assert_eq!(id.cid, None);
        let st = initial_status(&id, false);
        assert_eq!(st.guest, CloneGuestState::NoAgent);
        assert!(st.detail.unwrap().contains("no vsock device"));
        assert_eq!(initial_status(&id, true).guest, CloneGuestState::Pending);
    }

    #[test]
    fn clone_goes_only_with_restore() {
        use clap::Parser;
        let e = crate::cli::Cli::try_parse_from(["vme-vmm", "--clone", "--kernel", "/k"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--restore"), "{e}");
        let ok = crate::cli::Cli::try_parse_from(["vme-vmm", "--restore", "/s", "--clone"]);
        assert!(ok.is_ok_and(|c| c.run.clone));
    }

    #[test]
    fn new_cids_are_valid_and_new() {
        for _ in 0..200 {
            let c = new_cid(3).unwrap();
            assert!((4..u64::from(u32::MAX)).contains(&c), "{c}");
        }
    }

    fn spec_with(macs: &[&str], cid: Option<u64>) -> MachineSpec {
        let mut s = MachineSpec::new("/k");
        for (i, m) in macs.iter().enumerate() {
            s.nets.push(format!("tap=t{i},mac={m}").parse().unwrap());
        }
        s.vsock = cid.map(|cid| vme_api::vsock::VsockSpec {
            cid,
            uds: "/tmp/v".into(),
        });
        s
    }

    #[test]
    fn a_clone_changes_what_the_flags_leave_and_keeps_what_they_give() {
        let saved = spec_with(&["52:54:00:00:00:01", "52:54:00:00:00:02"], Some(7));
        let mut args = RunArgs::default();
        args.nets
            .push("tap=x,mac=02:00:00:00:00:09".parse().unwrap());
        let mut spec = saved.clone();
        spec.nets[0].mac = args.nets[0].mac;
        let id = new_identity(Path::new("/s"), &mut spec, &saved, &args).unwrap();
        assert_eq!(id.macs.len(), 2);
        assert_eq!(id.macs[0].new.to_string(), "02:00:00:00:00:09");
        assert_eq!(id.macs[1].old.to_string(), "52:54:00:00:00:02");
        assert_ne!(id.macs[1].new, id.macs[1].old);
        assert_eq!(spec.nets[1].mac, Some(id.macs[1].new));
        let cid = id.cid.unwrap();
        assert_ne!(cid, 7, "a clone gets a new CID");
        assert_eq!(spec.vsock.as_ref().unwrap().cid, cid);
        assert_eq!(id.generation_id.len(), 32);

        // A CID given with --vsock is kept, even the old one; a bare uds= draws one.
        args.vsock = Some("cid=7,uds=/tmp/w".parse().unwrap());
        let mut spec = saved.clone();
        spec.vsock = args.vsock.clone();
        let again = new_identity(Path::new("/s"), &mut spec, &saved, &args).unwrap();
        assert_eq!(again.cid, Some(7));
        assert_ne!(again.seed, id.seed, "every clone gets its own seed");
        assert_ne!(again.generation_id, id.generation_id);
        args.vsock = Some("uds=/tmp/w".parse().unwrap());
        let mut spec = saved.clone();
        spec.vsock = args.vsock.clone();
        let bare = new_identity(Path::new("/s"), &mut spec, &saved, &args).unwrap();
        assert!(bare.cid.is_some_and(|c| c != 7 && c != CID_UNSET));
    }
}
