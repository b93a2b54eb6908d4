//! Live migration between two monitors over TCP (riscv64 and x86_64).
//!
//! The destination (`vme-vmm --migrate-listen ADDR:PORT`) waits for one sender; the source
//! (`ctl ... migrate-send HOST:PORT`) connects and, after the handshake ([`wire`]):
//! 1. pre-copy while the guest runs: the dirty-page log is switched on, all of RAM goes
//!    (zero pages skipped: the destination's RAM starts zeroed), then rounds of the pages
//!    written meanwhile, until what is left can go within the downtime target at the rate
//!    measured (or the rounds run out, or stop shrinking);
//! 2. stop-and-copy: the guest is paused, the last dirty pages go, then the state file a
//!    snapshot would write (the same sections; each machine kind is a [`send::Source`]);
//! 3. the destination checks everything and builds the machine as a restore does, says
//!    `Ready`; the source sends `Commit`; the destination starts the guest and confirms.
//!    The source's monitor then exits (status 0).
//!
//! Until `Commit` is sent, any failure (the destination dies, refuses, the connection
//! breaks) resumes the guest on the source. After it, the source never runs the guest
//! again, so at most one side runs it; if the destination's confirmation does not arrive,
//! the source stays paused and says so (an operator decides).
//!
//! The destination trusts nothing it receives: frame sizes are bounded before reading, page
//! numbers and counts are checked against guest RAM, the state file is checked as a
//! snapshot's is.

pub mod recv;
pub mod send;
pub mod wire;
pub mod x86;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

/// How long either side waits for the other before giving up on a frame: long enough for
/// the destination to build a machine (or the source to finish a round) on a busy host.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// Shortest pre-shared key accepted.
const MIN_KEY: usize = 16;
/// Largest key file read: a key, not a file that happens to be there.
const MAX_KEY: u64 = 4096;

/// Reads a pre-shared key file.
pub fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let how = "make one with `head -c 32 /dev/urandom > FILE` and give the same file to both sides";
    let len = std::fs::metadata(path)
        .map_err(|e| format!("cannot read key file {}: {e}; {how}", path.display()))?
        .len();
    if len > MAX_KEY {
        return Err(format!(
            "key file {} is {len} bytes, more than a key ({MAX_KEY} at most): {how}",
            path.display()
        ));
    }
    let key = std::fs::read(path)
        .map_err(|e| format!("cannot read key file {}: {e}; {how}", path.display()))?;
    if key.len() < MIN_KEY {
        return Err(format!(
            "key file {} holds {} bytes, fewer than {MIN_KEY}: too guessable; {how}",
            path.display(),
            key.len()
        ));
    }
    Ok(key)
}

/// Resolves `addr` (HOST:PORT) and reads `key`; refuses a non-loopback address without a
/// key, since anyone on the network could then send or receive a VM.
pub fn endpoint(addr: &str, key: Option<&Path>) -> Result<(SocketAddr, Option<Vec<u8>>), String> {
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve migration address {addr:?}: {e}; give HOST:PORT"))?
        .next()
        .ok_or_else(|| format!("migration address {addr:?} resolves to nothing: give HOST:PORT"))?;
    let key = key.map(read_key).transpose()?;
    if key.is_none() && !sa.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address, so migration needs a pre-shared key: make one \
             with `head -c 32 /dev/urandom > migrate.key`, copy it to both hosts, and give it \
             to the destination (--migrate-key FILE) and the sender (migrate-send ... --key FILE)"
        ));
    }
    Ok((sa, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_addresses_are_checked() {
        let dir = std::env::temp_dir().join(format!("vme-migkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, b"abc").unwrap();
        assert!(read_key(&short).unwrap_err().contains("head -c 32"));
        let good = dir.join("good");
        std::fs::write(&good, [7u8; 32]).unwrap();
        assert_eq!(read_key(&good).unwrap().len(), 32);
        assert!(
            read_key(&dir.join("none"))
                .unwrap_err()
                .contains("cannot read")
        );

        assert!(endpoint("127.0.0.1:7000", None).unwrap().1.is_none());
        let err = endpoint("192.0.2.1:7000", None).unwrap_err();
        assert!(
            err.contains("pre-shared key") && err.contains("/dev/urandom"),
            "{err}"
        );
        assert!(endpoint("192.0.2.1:7000", Some(&good)).unwrap().1.is_some());
        assert!(endpoint("no port", None).unwrap_err().contains("HOST:PORT"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A machine kind without migration.
    struct NoMigration;

    impl crate::control::Snapshotter for NoMigration {
        fn snapshot(&self, _: &Path) -> Result<vme_api::control::SnapshotInfo, String> {
            Err("unused".into())
        }
    }

    #[test]
    fn a_machine_kind_without_migration_says_so_and_keeps_running() {
        use vme_api::control::RunState;
        let ctl = crate::control::VmControl::new();
        let p = send::Params {
            to: "127.0.0.1:7000".into(),
            downtime: Duration::from_millis(100),
            bandwidth: None,
            key: None,
            paused: false,
        };
        assert!(ctl.migrate(&p).unwrap_err().contains("still starting"));
        ctl.set_snapshotter(std::sync::Arc::new(NoMigration));
        let err = ctl.migrate(&p).unwrap_err();
        assert!(
            err.contains("no live migration") && err.contains("--restore"),
            "{err}"
        );
        assert_eq!(ctl.state(), RunState::Running);
        assert_eq!(ctl.pause(), Ok(RunState::Paused), "free for others again");
    }
}
