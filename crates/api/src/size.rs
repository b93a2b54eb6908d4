//! Byte sizes as people write them: `256M`, `2G`, `1048576`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A size in bytes. Parses `123`, `64K`, `256M`, `2G`, `1T` (binary multiples, optional `iB`/`B`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid size {input:?}: {reason}; write a whole number of bytes or one with a suffix, like 256M or 2G"
)]
pub struct SizeError {
    pub input: String,
    pub reason: &'static str,
}

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
    pub fn mib(self) -> u64 {
        self.0 / MIB
    }
}

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, SizeError> {
        let err = |reason| SizeError {
            input: s.to_string(),
            reason,
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(err("it is empty"));
        }
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        if digits_end == 0 {
            return Err(err("it does not start with a number"));
        }
        let number: u64 = t[..digits_end]
            .parse()
            .map_err(|_| err("the number is too large"))?;
        let unit = match t[digits_end..].trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KB" | "KIB" => KIB,
            "M" | "MB" | "MIB" => MIB,
            "G" | "GB" | "GIB" => GIB,
            "T" | "TB" | "TIB" => TIB,
            _ => return Err(err("the suffix is not one of K, M, G, T")),
        };
        number
            .checked_mul(unit)
            .map(ByteSize)
            .ok_or_else(|| err("it does not fit in 64 bits"))
    }
}

impl fmt::Display for ByteSize {
    /// The largest exact binary unit, so the printed form parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        for (unit, suffix) in [(TIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")] {
            if v != 0 && v % unit == 0 {
                return write!(f, "{}{}", v / unit, suffix);
            }
        }
        write!(f, "{v}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!("256M".parse(), Ok(ByteSize(256 * MIB)));
        assert_eq!("2G".parse(), Ok(ByteSize(2 * GIB)));
        assert_eq!("2GiB".parse(), Ok(ByteSize(2 * GIB)));
        assert_eq!("64k".parse(), Ok(ByteSize(64 * KIB)));
        assert_eq!("1048576".parse(), Ok(ByteSize(MIB)));
        assert_eq!(" 1T ".parse(), Ok(ByteSize(TIB)));
    }

    #[test]
    fn rejects_nonsense_with_reason() {
        for bad in [
            "",
            "M",
            "12X",
            "-5M",
            "1.5G",
            "99999999999999999999",
            "20000000T",
        ] {
            let e = bad.parse::<ByteSize>().unwrap_err();
            assert!(e.to_string().contains("like 256M"), "{e}");
        }
    }

    #[test]
    fn display_round_trips() {
        for v in [0, 1, 1000, KIB, 3 * MIB, 4 * GIB, 5 * TIB, GIB + 1] {
            let s = ByteSize(v).to_string();
            assert_eq!(s.parse(), Ok(ByteSize(v)), "{s}");
        }
        assert_eq!(ByteSize(256 * MIB).to_string(), "256M");
    }
}
