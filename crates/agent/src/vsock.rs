//! A listening AF_VSOCK stream socket (std has none).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The host's CID, as guests address it.
pub const HOST_CID: u32 = 2;

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: an all-zero sockaddr_vm is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = cid;
    addr
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// A stream to `port` on `cid`.
pub fn connect(cid: u32, port: u32) -> io::Result<std::fs::File> {
    let fd = socket()?;
    let addr = address(cid, port);
    // SAFETY: `addr` is an initialised sockaddr_vm of ADDR_LEN bytes that outlives the call.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::fs::File::from(fd))
}

pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Listens on `port` for connections from any CID (in practice, the host).
    pub fn bind(port: u32) -> io::Result<Listener> {
        let fd = socket()?;
        let addr = address(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is an initialised sockaddr_vm of ADDR_LEN bytes that outlives the call.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain syscall on our descriptor.
        if unsafe { libc::listen(fd.as_raw_fd(), 16) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Listener { fd })
    }

    /// The next connection, as a file (reads and writes are the socket's).
    pub fn accept(&self) -> io::Result<std::fs::File> {
        loop {
            // SAFETY: no address is asked for; the result is checked.
            let raw = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if raw >= 0 {
                // SAFETY: `raw` is a fresh descriptor nothing else owns.
                return Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) }));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
