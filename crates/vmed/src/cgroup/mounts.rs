//! Where the host mounts its cgroup hierarchies (from /proc/self/mountinfo): the one cgroup2
//! mount, and the cgroup v1 hierarchies with the controllers each carries. A hybrid host
//! (systemd's default before v247, many container hosts still) binds cpu, memory, blkio... to
//! v1 hierarchies, leaving the cgroup2 mount few or none of them.

use std::path::{Path, PathBuf};

/// One cgroup v1 hierarchy.
#[derive(Debug, Clone, PartialEq)]
pub struct V1 {
    pub path: PathBuf,
    /// Its controllers (`cpu`, `cpuacct`, ...; `name=systemd` ones are not controllers).
    pub controllers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mounts {
    pub v2: Option<PathBuf>,
    pub v1: Vec<V1>,
}

/// The controllers vmed knows in their v1 names (cgroup v2's `io` is v1's `blkio`).
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "blkio", "pids"];

impl Mounts {
    /// This host's mounts; none when /proc/self/mountinfo cannot be read.
    pub fn read() -> Mounts {
        Mounts::parse(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
    }

    /// Mountinfo lines: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER`.
    /// The first mount of each hierarchy counts (a bind mount elsewhere is the same one).
    pub fn parse(text: &str) -> Mounts {
        let mut m = Mounts::default();
        for l in text.lines() {
            let Some((pre, post)) = l.split_once(" - ") else {
                continue;
            };
            let Some(point) = pre.split(' ').nth(4) else {
                continue;
            };
            let point = PathBuf::from(unescape(point));
            let mut post = post.split(' ');
            match (post.next(), post.nth(1)) {
                (Some("cgroup2"), _) if m.v2.is_none() => m.v2 = Some(point),
                (Some("cgroup"), Some(opts)) => {
                    let controllers: Vec<String> = opts
                        .split(',')
                        .filter(|o| V1_CONTROLLERS.contains(o))
                        .map(String::from)
                        .collect();
                    let known = m.v1.iter().any(|h| h.controllers == controllers);
                    if !controllers.is_empty() && !known {
                        m.v1.push(V1 {
                            path: point,
                            controllers,
                        });
                    }
                }
                _ => {}
            }
        }
        m
    }

    /// The v1 hierarchy that carries `controller` (v1 name), if one is mounted.
    pub fn v1_for(&self, controller: &str) -> Option<&V1> {
        self.v1
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == controller))
    }

    /// `dir` (a cgroup path as configured: `cgroup_root`, or a VM's cgroup under it) relative
    /// to the hierarchy it names: `vme.slice/vm-a` for `/sys/fs/cgroup/unified/vme.slice/vm-a`.
    /// The same relative path is used in every v1 hierarchy, so one `cgroup_root` names the
    /// VMs' cgroups in all of them. A root outside every mount but beside the v1 ones
    /// (`/sys/fs/cgroup/vme.slice` on a host with no cgroup2 mount) is relative to their
    /// common parent.
    pub fn relative(&self, dir: &Path) -> Option<PathBuf> {
        let mut bases: Vec<&Path> = self.v2.iter().map(PathBuf::as_path).collect();
        bases.extend(self.v1.iter().map(|h| h.path.as_path()));
        if let Some(b) = bases.iter().find(|b| dir.starts_with(b)) {
            return dir.strip_prefix(b).ok().map(Path::to_path_buf);
        }
        let parent = self.v1.first()?.path.parent()?;
        let beside =
            dir.starts_with(parent) && self.v1.iter().all(|h| h.path.parent() == Some(parent));
        beside.then(|| dir.strip_prefix(parent).ok().map(Path::to_path_buf))?
    }
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(o)) => {
                out.push((o[0] - b'0') * 64 + (o[1] - b'0') * 8 + (o[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:32 / /mnt/my\\040memory rw,relatime - cgroup cgroup rw,memory
";

    #[test]
    fn hybrid_layout() {
        let m = Mounts::parse(HYBRID);
        assert_eq!(m.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(m.v1.len(), 3, "{m:?}");
        let cpu = m.v1_for("cpuacct").unwrap();
        assert_eq!(cpu.path, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(cpu, m.v1_for("cpu").unwrap());
        assert_eq!(
            m.v1_for("memory").unwrap().path,
            Path::new("/sys/fs/cgroup/memory"),
            "the first mount of a hierarchy counts"
        );
        assert!(m.v1_for("pids").is_none() && m.v1_for("io").is_none());
        let rel = |p: &str| m.relative(Path::new(p));
        assert_eq!(
            rel("/sys/fs/cgroup/unified/vme.slice/vm-a").unwrap(),
            Path::new("vme.slice/vm-a")
        );
        assert_eq!(rel("/sys/fs/cgroup/memory/x").unwrap(), Path::new("x"));
        assert_eq!(
            rel("/sys/fs/cgroup/vme.slice").unwrap(),
            Path::new("vme.slice")
        );
        assert_eq!(rel("/elsewhere/vme.slice"), None);
        assert_eq!(unescape("/mnt/my\\040memory\\\\"), "/mnt/my memory\\\\");
    }

    #[test]
    fn unified_and_v1_only_layouts() {
        let unified =
            Mounts::parse("25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n");
        assert_eq!(unified.v2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert!(unified.v1.is_empty());
        let v1 = Mounts::parse(
            "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
             35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        );
        assert_eq!(v1.v2, None);
        assert_eq!(
            v1.relative(Path::new("/sys/fs/cgroup/vme.slice/vm-a"))
                .unwrap(),
            Path::new("vme.slice/vm-a")
        );
    }
}
