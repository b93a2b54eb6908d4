//! A clone's new identity as the monitor tells the guest agent about it
//! (`vme-vmm --restore DIR --clone`): an entropy seed the guest mixes into its random pool
//! before reseeding, and the MAC each network interface changes to. Both arrive over the
//! agent protocol ([`crate::agent::Request::Identity`]); the guest cannot pick them up by
//! itself (Linux reads a virtio-net MAC once, at probe, and a virtio-rng device does not
//! force a reseed).

use crate::spec::Mac;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Bytes of entropy a clone gets (the size of the Linux CRNG's key).
pub const SEED_LEN: usize = 32;

/// Most MAC changes one request may carry: far more than a VM's network devices.
pub const MAX_MAC_CHANGES: usize = 64;

/// Random bytes for the guest's pool, written as 64 hex digits on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Seed(pub [u8; SEED_LEN]);

impl fmt::Debug for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never in logs: a seed that leaks makes the clone's randomness guessable.
        f.write_str("Seed(..)")
    }
}

impl fmt::Display for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for Seed {
    type Err = String;
    fn from_str(s: &str) -> Result<Seed, String> {
        if s.len() != 2 * SEED_LEN || !s.is_ascii() {
            return Err(format!(
                "an entropy seed is {} hex digits ({SEED_LEN} bytes), not {} characters",
                2 * SEED_LEN,
                s.chars().count()
            ));
        }
        let mut seed = [0u8; SEED_LEN];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("the entropy seed {s:?} is not hex"))?;
        }
        Ok(Seed(seed))
    }
}

impl Serialize for Seed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The interface whose address is `old` takes `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MacChange {
    pub old: Mac,
    pub new: Mac,
}

/// Refuses a list of changes the agent could not apply unambiguously.
pub fn check_mac_changes(changes: &[MacChange]) -> Result<(), String> {
    if changes.len() > MAX_MAC_CHANGES {
        return Err(format!(
            "{} MAC changes in one request; at most {MAX_MAC_CHANGES} are accepted",
            changes.len()
        ));
    }
    for (i, c) in changes.iter().enumerate() {
        if changes[..i].iter().any(|p| p.old == c.old) {
            return Err(format!(
                "MAC {} is to change twice: give each old address once",
                c.old
            ));
        }
        if changes[..i].iter().any(|p| p.new == c.new) {
            return Err(format!(
                "MAC {} is given to two interfaces: each needs its own",
                c.new
            ));
        }
    }
    Ok(())
}

/// What the agent did with an identity request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityApplied {
    /// The seed went into the pool and the kernel's CRNG was reseeded from it.
    pub reseeded: bool,
    /// The interfaces whose address changed, by name (`eth0`).
    pub interfaces: Vec<String>,
    /// The guest's vsock CID as its kernel now has it (the local end of the request's
    /// connection); `None` when the agent could not tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Request;

    #[test]
    fn seeds_are_exactly_64_hex_digits() {
        let hex = "00ff".repeat(16);
        let seed: Seed = hex.parse().unwrap();
        assert_eq!(seed.0[..4], [0, 0xff, 0, 0xff]);
        assert_eq!(seed.to_string(), hex);
        assert!(format!("{seed:?}").contains(".."), "Debug hides the bytes");
        for bad in [
            "",
            "00",
            &"0".repeat(63),
            &"0".repeat(65),
            &"0".repeat(128),
            &format!("{}zz", "0".repeat(62)),
            // Multi-byte characters must not split a digit pair (or panic on a char
            // boundary).
            &format!("{}é", "0".repeat(62)),
        ] {
            assert!(bad.parse::<Seed>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hostile_identity_requests_are_refused() {
        let seed = "ab".repeat(32);
        let ok = format!(
            r#"{{"op":"identity","seed":"{seed}","macs":[{{"old":"52:54:00:00:00:01","new":"02:aa:bb:cc:dd:ee"}}]}}"#
        );
        match serde_json::from_str::<Request>(&ok).unwrap() {
            Request::Identity { seed: s, macs } => {
                assert_eq!(s.0, [0xab; 32]);
                assert_eq!(macs[0].new.to_string(), "02:aa:bb:cc:dd:ee");
            }
            other => panic!("parsed as {other:?}"),
        }
        let short = "ab".repeat(31);
        for bad in [
            format!(r#"{{"op":"identity","seed":"{short}","macs":[]}}"#),
            r#"{"op":"identity","seed":12,"macs":[]}"#.to_string(),
            r#"{"op":"identity","macs":[]}"#.to_string(),
            format!(
                r#"{{"op":"identity","seed":"{seed}","macs":[{{"old":"52:54:00:00:00","new":"02:00:00:00:00:01"}}]}}"#
            ),
            format!(
                r#"{{"op":"identity","seed":"{seed}","macs":[{{"old":"52:54:00:00:00:01","new":"01:00:5e:00:00:01"}}]}}"#
            ),
            format!(
                r#"{{"op":"identity","seed":"{seed}","macs":[{{"old":"52:54:00:00:00:01","new":"02:00:00:00:00:0g"}}]}}"#
            ),
            format!(
                r#"{{"op":"identity","seed":"{seed}","macs":[{{"old":"52:54:00:00:00:01","new":"02:00:00:00:00:01","x":1}}]}}"#
            ),
        ] {
            assert!(serde_json::from_str::<Request>(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ambiguous_mac_changes_are_refused() {
        let m = |s: &str| s.parse::<Mac>().unwrap();
        let c = |o: &str, n: &str| MacChange {
            old: m(o),
            new: m(n),
        };
        let a = c("52:54:00:00:00:01", "02:00:00:00:00:01");
        let b = c("52:54:00:00:00:02", "02:00:00:00:00:02");
        assert!(check_mac_changes(&[a, b]).is_ok());
        assert!(check_mac_changes(&[]).is_ok());
        let same_old = c("52:54:00:00:00:01", "02:00:00:00:00:03");
        assert!(check_mac_changes(&[a, same_old]).is_err());
        let same_new = c("52:54:00:00:00:03", "02:00:00:00:00:01");
        assert!(check_mac_changes(&[a, same_new]).is_err());
        assert!(check_mac_changes(&vec![a; MAX_MAC_CHANGES + 1]).is_err());
    }
}
