//! The image manifest: what an image is (OS, version, architecture), how it boots (a kernel,
//! initrd and command line, or a disk), the resources it needs, and the digest and size of
//! every blob. JSON with a `schema_version`; parsing is strict: unknown fields, a missing
//! blob role, a duplicate role or an out-of-range value are refused with the field named.
//! Signatures cover the manifest's exact bytes, so the daemon stores those bytes, never a
//! re-encoding.

use crate::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use vme_api::{Arch, ByteSize};

/// The newest manifest format this code reads: 1, or 2, which adds a disk blob's `source`.
/// Writers use the oldest version that holds what they write (see [`Manifest::schema_for`]),
/// so an image without a converted disk stays readable by a vme that knows only 1.
pub const SCHEMA_VERSION: u32 = 2;
/// A manifest larger than this is not a manifest.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
const MAX_NAME: usize = 63;
const MAX_LABELS: usize = 64;
const MAX_TEXT: usize = 256;
/// Generous bounds on resources; the daemon's admission checks the host's real ones.
const MAX_VCPUS: u32 = 256;
const MIN_MEMORY: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    /// The image's own name (the daemon may store it under another).
    pub name: String,
    /// Like `linux`, `debian`.
    pub os: String,
    pub version: String,
    pub architecture: Arch,
    pub boot: Boot,
    pub resources: Resources,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub blobs: Vec<BlobRef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Boot {
    /// The monitor loads the kernel (and initrd) blob itself.
    Direct {
        #[serde(default)]
        cmdline: String,
    },
    /// The guest boots from its disk blob.
    Disk,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// What a VM gets when its create request does not say.
    pub default: Amount,
    /// Less than this and the image does not work: a create asking for less is refused.
    pub minimum: Amount,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Amount {
    pub vcpus: u32,
    pub memory: ByteSize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Kernel,
    Initrd,
    Disk,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Kernel => "kernel",
            Role::Initrd => "initrd",
            Role::Disk => "disk",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    pub role: Role,
    pub sha256: Digest,
    pub size: u64,
    /// A disk converted on import: the file it was made from (schema 2). `sha256` and
    /// `size` are the raw blob's, which is what is stored, verified and booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// The original of a converted disk blob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub format: DiskFormat,
    pub sha256: Digest,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    Qcow2,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid image manifest: {0}")]
pub struct ManifestError(pub String);

/// Checks an image name (an image's or an alias): 1 to 63 letters, digits, `-`, `_` and
/// `.`, starting with a letter or digit. Names appear in URLs and messages, never in paths.
pub fn check_name(n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > MAX_NAME {
        return Err(format!(
            "image name {n:?} must be 1 to {MAX_NAME} characters: give a name like debian-12"
        ));
    }
    if let Some(c) = n
        .chars()
        .find(|c| !c.is_ascii_alphanumeric() && !matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "image name {n:?} contains {c:?}: use only letters, digits, '-', '_' and '.'"
        ));
    }
    if !n.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "image name {n:?} must start with a letter or digit"
        ));
    }
    Ok(())
}

impl Manifest {
    /// Parses and checks a manifest's bytes. `max_blob` bounds every blob's declared size.
    pub fn parse(bytes: &[u8], max_blob: u64) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError(format!(
                "it is {} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have",
                bytes.len()
            )));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError(e.to_string()))?;
        m.check(max_blob)?;
        Ok(m)
    }

    /// The manifest as the bytes to store and sign (pretty JSON, final newline).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn check(&self, max_blob: u64) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError(m));
        if !(1..=SCHEMA_VERSION).contains(&self.schema_version) {
            return bad(format!(
                "schema_version {} is not supported: this vme reads versions 1 to \
                 {SCHEMA_VERSION}",
                self.schema_version
            ));
        }
        check_name(&self.name).map_err(|e| ManifestError(format!("name: {e}")))?;
        for (field, v) in [("os", &self.os), ("version", &self.version)] {
            if v.is_empty() || v.len() > MAX_TEXT || v.chars().any(char::is_control) {
                return bad(format!(
                    "{field} must be 1 to {MAX_TEXT} printable characters, like \"linux\""
                ));
            }
        }
        if let Boot::Direct { cmdline } = &self.boot
            && (cmdline.len() > 4096 || cmdline.chars().any(char::is_control))
        {
            return bad("boot.cmdline must be at most 4096 printable characters".into());
        }
        for (which, a) in [
            ("default", self.resources.default),
            ("minimum", self.resources.minimum),
        ] {
            if !(1..=MAX_VCPUS).contains(&a.vcpus) {
                return bad(format!(
                    "resources.{which}.vcpus {} must be 1 to {MAX_VCPUS}",
                    a.vcpus
                ));
            }
            if a.memory.bytes() < MIN_MEMORY {
                return bad(format!(
                    "resources.{which}.memory {} is below 16M",
                    a.memory
                ));
            }
        }
        let (d, m) = (self.resources.default, self.resources.minimum);
        if d.vcpus < m.vcpus || d.memory < m.memory {
            return bad(format!(
                "resources.default ({} vCPUs, {}) is below resources.minimum ({} vCPUs, {})",
                d.vcpus, d.memory, m.vcpus, m.memory
            ));
        }
        if self.labels.len() > MAX_LABELS {
            return bad(format!("more than {MAX_LABELS} labels"));
        }
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > MAX_TEXT || v.len() > MAX_TEXT {
                return bad(format!(
                    "label {k:?}: keys must be 1 to {MAX_TEXT} bytes, values at most {MAX_TEXT}"
                ));
            }
        }
        let mut roles = Vec::new();
        for b in &self.blobs {
            if roles.contains(&b.role) {
                return bad(format!(
                    "two blobs have role {}: give each role once",
                    b.role.as_str()
                ));
            }
            roles.push(b.role);
            if let Some(src) = &b.source {
                if self.schema_version < 2 {
                    return bad(format!(
                        "the {} blob has a source, which needs schema_version 2",
                        b.role.as_str()
                    ));
                }
                if b.role != Role::Disk {
                    return bad(format!(
                        "the {} blob has a source: only a disk is converted on import",
                        b.role.as_str()
                    ));
                }
                if src.size > max_blob {
                    return bad(format!(
                        "the disk blob's source declares {} bytes, more than the {max_blob} \
                         allowed",
                        src.size
                    ));
                }
            }
            if b.size > max_blob {
                return bad(format!(
                    "the {} blob declares {} bytes, more than the {max_blob} allowed",
                    b.role.as_str(),
                    b.size
                ));
            }
        }
        let has = |r| roles.contains(&r);
        match self.boot {
            Boot::Direct { .. } if !has(Role::Kernel) => {
                bad("boot method direct needs a blob with role kernel".into())
            }
            Boot::Disk if !has(Role::Disk) => {
                bad("boot method disk needs a blob with role disk".into())
            }
            Boot::Direct { .. } if !has(Role::Initrd) && !has(Role::Disk) => bad(
                "boot method direct needs an initrd or a disk blob to hold the root file system"
                    .into(),
            ),
            _ => Ok(()),
        }
    }

    /// The oldest schema version that holds `blobs`.
    pub fn schema_for(blobs: &[BlobRef]) -> u32 {
        if blobs.iter().any(|b| b.source.is_some()) {
            2
        } else {
            1
        }
    }

    pub fn blob(&self, role: Role) -> Option<&BlobRef> {
        self.blobs.iter().find(|b| b.role == role)
    }

    /// Every distinct blob digest with its size (two roles may share one blob).
    pub fn distinct_blobs(&self) -> BTreeMap<Digest, u64> {
        self.blobs
            .iter()
            .map(|b| (b.sha256.clone(), b.size))
            .collect()
    }

    /// The sum of the distinct blobs' sizes.
    pub fn size(&self) -> u64 {
        self.distinct_blobs().values().sum()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Manifest {
        Manifest {
            schema_version: 1,
            name: "tiny".into(),
            os: "linux".into(),
            version: "1".into(),
            architecture: Arch::Riscv64,
            boot: Boot::Direct {
                cmdline: "console=ttyS0".into(),
            },
            resources: Resources {
                default: Amount {
                    vcpus: 1,
                    memory: ByteSize(256 << 20),
                },
                minimum: Amount {
                    vcpus: 1,
                    memory: ByteSize(64 << 20),
                },
            },
            labels: BTreeMap::new(),
            blobs: vec![
                BlobRef {
                    role: Role::Kernel,
                    sha256: Digest::of(b"k"),
                    size: 1,
                    source: None,
                },
                BlobRef {
                    role: Role::Initrd,
                    sha256: Digest::of(b"i"),
                    size: 1,
                    source: None,
                },
            ],
        }
    }

    fn err(json: &str) -> String {
        Manifest::parse(json.as_bytes(), 1 << 30)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(Manifest::parse(&m.to_bytes(), 100).unwrap(), m);
        assert_eq!(m.size(), 2);
        // Without a source the manifest is schema 1 and has no `source` key.
        assert_eq!(Manifest::schema_for(&m.blobs), 1);
        assert!(
            !String::from_utf8(m.to_bytes())
                .unwrap()
                .contains("\"source\"")
        );
        let mut m2 = m.clone();
        m2.blobs[1].role = Role::Disk;
        m2.blobs[1].source = Some(Source {
            format: DiskFormat::Qcow2,
            sha256: Digest::of(b"q"),
            size: 7,
        });
        m2.schema_version = Manifest::schema_for(&m2.blobs);
        assert_eq!(m2.schema_version, 2);
        let text = String::from_utf8(m2.to_bytes()).unwrap();
        assert!(text.contains("\"format\": \"qcow2\""), "{text}");
        assert_eq!(Manifest::parse(&m2.to_bytes(), 100).unwrap(), m2);
        // The source's size is bounded like a blob's.
        assert!(Manifest::parse(&m2.to_bytes(), 6).is_err());
    }

    #[test]
    fn malformed_manifests_are_refused_naming_the_field() {
        let good = serde_json::to_value(sample()).unwrap();
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            f(&mut v);
            err(&v.to_string())
        };
        assert!(err("{").contains("invalid image manifest"));
        assert!(with(&|v| v["extra"] = 1.into()).contains("unknown field `extra`"));
        assert!(with(&|v| v["schema_version"] = 3.into()).contains("schema_version 3"));
        // A source: schema 2, a disk only, a bounded size.
        let src = serde_json::json!({"format": "qcow2", "sha256": Digest::of(b"q"), "size": 5});
        assert!(
            with(&|v| v["blobs"][1]["source"] = src.clone()).contains("needs schema_version 2")
        );
        assert!(
            with(&|v| {
                v["schema_version"] = 2.into();
                v["blobs"][1]["source"] = src.clone()
            })
            .contains("only a disk")
        );
        let mut bad_src = src.clone();
        bad_src["format"] = "vmdk".into();
        assert!(with(&|v| v["blobs"][1]["source"] = bad_src.clone()).contains("vmdk"));
        assert!(with(&|v| v["architecture"] = "arm".into()).contains("arm"));
        assert!(
            with(&|v| v["name"] = "../x".into()).contains("contains '/'")
                || with(&|v| v["name"] = "../x".into()).contains("start with")
        );
        assert!(with(&|v| v["blobs"][0]["sha256"] = "zz".into()).contains("SHA-256"));
        assert!(with(&|v| v["blobs"][1]["role"] = "kernel".into()).contains("two blobs"));
        assert!(with(&|v| v["blobs"][0]["size"] = (1u64 << 40).into()).contains("more than"));
        assert!(with(&|v| v["blobs"] = serde_json::json!([])).contains("role kernel"));
        assert!(with(&|v| v["resources"]["default"]["memory"] = "32M".into()).contains("below"));
        assert!(with(&|v| v["resources"]["minimum"]["vcpus"] = 0.into()).contains("vcpus 0"));
        assert!(with(&|v| v["boot"]["method"] = "pxe".into()).contains("pxe"));
        assert!(with(&|v| v["boot"]["extra"] = 1.into()).contains("extra"));
        let huge = format!("{{\"x\":\"{}\"}}", "a".repeat(70_000));
        assert!(err(&huge).contains("more than"));
    }
}
