//! A Linux tap device opened with `IFF_VNET_HDR`: every frame read or written carries the
//! 12-byte `virtio_net_hdr_v1` in front, so checksum and segmentation offloads pass between
//! the guest and the host stack untouched (the host kernel validates the header on writes).
//!
//! Opening a tap by name attaches to an existing one, or creates it (the kernel needs
//! CAP_NET_ADMIN in the caller's network namespace for that; a tap created this way is
//! deleted when the monitor exits). The descriptor is non-blocking: the caller polls it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Length of `virtio_net_hdr_v1` (with `num_buffers`), the header the tap prepends.
pub const VNET_HDR_LEN: usize = 12;
/// Longest interface name the kernel accepts (IFNAMSIZ minus the NUL).
pub const MAX_NAME_LEN: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is invalid: use 1 to {MAX_NAME_LEN} bytes without '/', NUL or spaces")]
    Name(String),
    #[error(
        "cannot open /dev/net/tun: {0}; load the tun module (modprobe tun) or give the monitor access to the device"
    )]
    OpenTun(io::Error),
    #[error(
        "no permission to create or attach tap {name:?} ({source}): run the monitor with CAP_NET_ADMIN (e.g. as root), \
         or create the tap beforehand for this user: ip tuntap add dev {name} mode tap user $(id -u) vnet_hdr"
    )]
    Permission { name: String, source: io::Error },
    #[error(
        "tap {name:?} is in use by another process (another VM?): stop it or use another tap name"
    )]
    Busy { name: String },
    #[error(
        "{name:?} exists but cannot be used as a single-queue tap ({source}): it is probably a tun or \
         multi-queue device, or another kind of interface; pick another name"
    )]
    WrongKind { name: String, source: io::Error },
    #[error("cannot set up tap {name:?}: {what} failed: {source}")]
    Setup {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags union member.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap queue.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to tap `name`, creating it when it does not exist.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name
                .bytes()
                .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        {
            return Err(TapError::Name(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may write back the name into) a `struct ifreq`, whose
        // layout IfReq reproduces at its full 40 bytes; `req` outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission { name, source },
                Some(libc::EBUSY) => TapError::Busy { name },
                Some(libc::EINVAL) => TapError::WrongKind { name, source },
                _ => TapError::Setup {
                    name,
                    what: "TUNSETIFF",
                    source,
                },
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.ioctl_int(
            "TUNSETVNETHDRSZ",
            libc::TUNSETVNETHDRSZ,
            VNET_HDR_LEN as i32,
        )?;
        // No offloads until the driver negotiates them: the host must not send GSO frames
        // or partial checksums to a guest that cannot take them.
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn ioctl_int(&self, what: &'static str, req: libc::Ioctl, val: i32) -> Result<(), TapError> {
        let mut v: libc::c_int = val;
        // SAFETY: these TUN ioctls read one int through the pointer; `v` outlives the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), req, &mut v) };
        if rc < 0 {
            return Err(TapError::Setup {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Which offloaded frames the host may send us (`TUN_F_*` bits).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value, not through a pointer.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(TapError::Setup {
                name: self.name.clone(),
                what: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Another handle on the same tap queue (the same open file). Holding one keeps a tap
    /// the monitor created alive, with its host-side configuration, across a VM restart.
    pub fn try_clone(&self) -> Result<Tap, TapError> {
        let file = self.file.try_clone().map_err(|source| TapError::Setup {
            name: self.name.clone(),
            what: "dup",
            source,
        })?;
        Ok(Tap {
            file,
            name: self.name.clone(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included); `WouldBlock` when none is queued.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (header included) in a single write, as the tap requires.
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        for name in ["", "sixteen-bytes-xx", "a/b", "a b", "a\0b"] {
            let e = Tap::open(name).err().expect(name);
            assert!(matches!(e, TapError::Name(_)), "{name:?}: {e}");
            assert!(e.to_string().contains("1 to 15 bytes"), "{e}");
        }
    }
}
