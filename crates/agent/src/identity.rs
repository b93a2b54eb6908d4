//! A clone's new identity, applied inside the guest (`Request::Identity`): the seed goes
//! into the kernel's input pool and the CRNG is reseeded at once, so this clone's random
//! numbers part from its siblings' now rather than at the next scheduled reseed (up to a
//! minute later in Linux); each interface with an old MAC takes its new one, since Linux
//! reads a virtio-net MAC only when it probes the device.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use vme_api::agent::{IdentityApplied, MacChange, Reply, Seed};
use vme_api::identity::check_mac_changes;
use vme_api::spec::Mac;

/// `RNDADDENTROPY`, `_IOW('R', 0x03, int[2])` (linux/random.h; not in the libc crate).
const RNDADDENTROPY: u64 = 0x4008_5203;
/// `RNDRESEEDCRNG`, `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: u64 = 0x5207;

/// Applies `seed` and `macs`; `conn` is the request's vsock connection, whose local end
/// tells the CID the guest kernel now uses.
pub fn apply(
    seed: &Seed,
    macs: &[MacChange],
    conn: &std::fs::File,
) -> Result<(Reply, Vec<u8>), String> {
    check_mac_changes(macs)?;
    // Entropy first: it matters most (two clones must not share random numbers) and the
    // MAC changes below can fail one by one.
    reseed(seed).map_err(|e| format!("cannot reseed the kernel's random generator: {e}"))?;
    let mut interfaces = Vec::new();
    for change in macs {
        // Already done: the monitor retries a request whose reply it did not get.
        if let Ok(name) = interface_with(change.new) {
            interfaces.push(name);
            continue;
        }
        let name = interface_with(change.old)?;
        set_mac(&name, change.new).map_err(|e| {
            format!(
                "the random generator was reseeded, but {name} cannot take the MAC {}: {e} \
                 (its MAC stays {})",
                change.new, change.old
            )
        })?;
        interfaces.push(name);
    }
    Ok((
        Reply::Identity(IdentityApplied {
            reseeded: true,
            interfaces,
            cid: local_cid(conn),
        }),
        Vec::new(),
    ))
}

/// Mixes `seed` into the input pool (crediting it: it comes from the host's getrandom)
/// and makes the kernel rekey its CRNG from the pool.
fn reseed(seed: &Seed) -> io::Result<()> {
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    #[repr(C)]
    struct PoolInfo {
        entropy_bits: libc::c_int,
        size: libc::c_int,
        buf: [u8; 32],
    }
    let info = PoolInfo {
        entropy_bits: (seed.0.len() * 8) as libc::c_int,
        size: seed.0.len() as libc::c_int,
        buf: seed.0,
    };
    // SAFETY: `info` is a rand_pool_info whose buf_size matches the bytes that follow
    // it; the kernel only reads it during the call.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, &raw const info) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an ioctl without argument on our descriptor.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The name of the interface whose address is `mac`.
fn interface_with(mac: Mac) -> Result<String, String> {
    let dir = std::fs::read_dir("/sys/class/net")
        .map_err(|e| format!("cannot list network interfaces in /sys/class/net: {e}"))?;
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("address")) else {
            continue;
        };
        if text.trim().parse::<Mac>().ok() == Some(mac) {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Err(format!(
        "no network interface has the MAC {mac} (was it changed already, or is this not the \
         VM the snapshot was taken of?)"
    ))
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: an all-zero ifreq is valid (empty name, zero union).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} is too long"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

/// Sets `name`'s hardware address. virtio-net takes a new address while up; a driver that
/// refuses (EBUSY) gets it while down, then comes up again.
fn set_mac(name: &str, mac: Mac) -> io::Result<()> {
    // SAFETY: plain syscall; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = ifreq(name)?;
    // SAFETY: writing the hwaddr member of the union we send with SIOCSIFHWADDR.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac.0) {
            *d = s as libc::c_char;
        }
    }
    let set = |req: &libc::ifreq| {
        // SAFETY: `req` is an initialised ifreq that outlives the call.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR as _, req) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    match set(&req) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
        other => return other,
    }
    let flags = |op: libc::c_ulong, req: &mut libc::ifreq| {
        // SAFETY: `req` is an initialised ifreq that outlives the call; the kernel reads
        // or writes its flags member.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), op as _, &raw mut *req) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let mut fl = ifreq(name)?;
    flags(libc::SIOCGIFFLAGS, &mut fl)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let up = unsafe { fl.ifr_ifru.ifru_flags };
    fl.ifr_ifru.ifru_flags = up & !(libc::IFF_UP as libc::c_short);
    flags(libc::SIOCSIFFLAGS, &mut fl)?;
    let result = set(&req);
    fl.ifr_ifru.ifru_flags = up;
    // Up again whatever happened, so a failed change does not also cut the network.
    flags(libc::SIOCSIFFLAGS, &mut fl)?;
    result
}

/// The CID of the local end of `conn`, a vsock stream.
fn local_cid(conn: &std::fs::File) -> Option<u32> {
    // SAFETY: an all-zero sockaddr_vm is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` has room for `len` bytes; the kernel writes at most that.
    let rc = unsafe { libc::getsockname(conn.as_raw_fd(), (&raw mut addr).cast(), &mut len) };
    (rc == 0 && i32::from(addr.svm_family) == libc::AF_VSOCK).then_some(addr.svm_cid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(old: &str, new: &str) -> MacChange {
        MacChange {
            old: old.parse().unwrap(),
            new: new.parse().unwrap(),
        }
    }

    #[test]
    fn ambiguous_requests_are_refused_before_anything_changes() {
        // Refused by the checks alone: no reseed of this (host) kernel, no interface
        // touched.
        let conn = std::fs::File::open("/dev/null").unwrap();
        let a = change("52:54:00:00:00:01", "02:00:00:00:00:01");
        let b = change("52:54:00:00:00:01", "02:00:00:00:00:02");
        let e = apply(&Seed([1; 32]), &[a, b], &conn).unwrap_err();
        assert!(e.contains("change twice"), "{e}");
    }

    #[test]
    fn an_address_no_interface_has_is_named_in_the_error() {
        let mac: Mac = "02:5e:ed:00:00:7f".parse().unwrap();
        let e = interface_with(mac).unwrap_err();
        assert!(e.contains("02:5e:ed:00:00:7f"), "{e}");
    }

    #[test]
    fn interface_names_must_fit_ifreq() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("a-name-far-too-long").is_err());
    }

    #[test]
    fn the_cid_of_something_not_vsock_is_unknown() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(local_cid(&f), None);
    }
}
