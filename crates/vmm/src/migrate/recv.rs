//! The destination side: `vme-vmm --migrate-listen ADDR:PORT` receives one VM into memory,
//! checks it as a restore checks a snapshot, and hands it to the restore path with a gate
//! that says `Ready` and runs the guest only on the sender's `Commit`.

use super::wire::{Conn, Kind, MAX_PAGES, PAGE, Side};
use super::{PEER_TIMEOUT, endpoint};
use crate::cli::RunArgs;
use crate::snapshot::Restore;
use crate::snapshot::format::StateFile;
use crate::snapshot::restore::{refuse_machine_flags, spec_of};
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vme_api::MachineSpec;

/// Largest state file accepted: as for snapshot state files, far above what a VM needs.
const MAX_STATE: usize = 64 << 20;

/// Waits at `addr` for one migration, receives it, and returns the VM to run: its spec (the
/// flags' backend overrides applied) and a restore whose gate finishes the handshake.
pub fn receive(addr: &str, args: &RunArgs) -> Result<(MachineSpec, Restore), String> {
    refuse_machine_flags(args)?;
    let (sa, key) = endpoint(addr, args.migrate_key.as_deref())?;
    let listener = TcpListener::bind(sa).map_err(|e| {
        format!("cannot listen for a migration on {addr}: {e}; choose another address or port")
    })?;
    // Said on stderr whatever the log level: whoever starts the sender waits for this line.
    eprintln!(
        "vme-vmm: waiting for an incoming migration on {}{}",
        listener.local_addr().map_or(sa, |a| a),
        if key.is_some() {
            " (pre-shared key)"
        } else {
            ""
        }
    );
    let (stream, peer) = listener
        .accept()
        .map_err(|e| format!("cannot accept a migration on {addr}: {e}"))?;
    // One migration per listener: nobody else may connect while this one runs.
    drop(listener);
    let started = Instant::now();
    let setup = |e: std::io::Error| format!("cannot set up the connection from {peer}: {e}");
    stream.set_nodelay(true).map_err(setup)?;
    stream.set_read_timeout(Some(PEER_TIMEOUT)).map_err(setup)?;
    stream
        .set_write_timeout(Some(PEER_TIMEOUT))
        .map_err(setup)?;
    let mut conn = Conn::handshake(stream, Side::Destination, key.as_deref())
        .map_err(|e| format!("refused the migration from {peer}: {e}"))?;
    log::info!("receiving a migration from {peer}");
    let received = receive_vm(&mut conn, args);
    let (spec, restore) = match received {
        Ok(v) => v,
        Err(e) => {
            let _ = conn.send(Kind::Error, e.as_bytes());
            return Err(format!("migration from {peer} failed: {e}"));
        }
    };
    log::info!(
        "received the VM from {peer} in {:.0} ms; building it",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let gate = move || -> Result<bool, String> {
        let fail = |e: String| {
            format!(
                "migration from {peer} failed after the machine was built: {e}; the guest \
                 did not run here (the sender keeps it)"
            )
        };
        conn.send(Kind::Ready, &[]).map_err(fail)?;
        let commit = conn.expect(Kind::Commit).map_err(fail)?;
        let paused = commit.first() == Some(&1);
        // Committed: the sender will never run the guest again, so it runs here even if
        // this confirmation is lost.
        if let Err(e) = conn.send(Kind::Started, &[]) {
            log::warn!("could not confirm the start to {peer}: {e}; the guest runs here");
        }
        eprintln!(
            "vme-vmm: migration from {peer} committed; the guest runs here{}",
            if paused {
                " (paused, as it was at the sender)"
            } else {
                ""
            }
        );
        Ok(paused)
    };
    *restore.gate.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(gate));
    Ok((spec, restore))
}

/// An in-memory file of `bytes` zero bytes, to receive guest RAM into.
fn memory_file(bytes: u64) -> Result<File, String> {
    let name = c"vme-migrated-ram";
    // SAFETY: `name` is a NUL-terminated string that outlives the call; memfd_create reads
    // it and returns a new descriptor or -1, nothing else.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "cannot create memory for the incoming VM: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(bytes)
        .map_err(|e| format!("cannot size {bytes} bytes of memory for the incoming VM: {e}"))?;
    Ok(file)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
}

/// Checks that `count` pages from `first` lie inside `pages` pages of RAM; their offset.
fn page_range(first: u64, count: u64, pages: u64) -> Result<u64, String> {
    match first.checked_add(count) {
        Some(end) if count > 0 && end <= pages => Ok(first * PAGE as u64),
        _ => Err(format!(
            "the sender named pages {first}..+{count}, outside the VM's {pages} pages: refused"
        )),
    }
}

/// Receives RAM and the state file, and checks them.
fn receive_vm<S: std::io::Read + std::io::Write>(
    conn: &mut Conn<S>,
    args: &RunArgs,
) -> Result<(MachineSpec, Restore), String> {
    let started = Instant::now();
    let begin = conn.expect(Kind::Begin)?;
    let (Some(bytes), Some(arch)) = (u64_at(&begin, 0), begin.get(8..)) else {
        return Err("the sender's Begin frame is too short".into());
    };
    let arch = String::from_utf8_lossy(arch);
    if arch != crate::snapshot::riscv::ARCH && arch != crate::snapshot::x86::ARCH {
        return Err(format!(
            "the sender's VM is {arch:?}; only riscv64 and x86_64 VMs can be migrated"
        ));
    }
    if bytes == 0 || bytes % PAGE as u64 != 0 {
        return Err(format!(
            "the sender's VM has {bytes} bytes of RAM, not a positive multiple of pages"
        ));
    }
    crate::cli::check_host_memory(vme_api::ByteSize(bytes))?;
    let pages = bytes / PAGE as u64;
    let ram = memory_file(bytes)?;
    let zeros = vec![0u8; MAX_PAGES * PAGE];
    let mut state = Vec::new();
    loop {
        let (kind, payload) = conn.recv()?;
        match kind {
            Kind::Pages => {
                let data = payload.get(8..).unwrap_or_default();
                let first = u64_at(&payload, 0).ok_or("a Pages frame without its page number")?;
                if data.is_empty() || data.len() % PAGE != 0 {
                    return Err(format!(
                        "a Pages frame of {} bytes, not whole pages: refused",
                        data.len()
                    ));
                }
                let off = page_range(first, (data.len() / PAGE) as u64, pages)?;
                ram.write_all_at(data, off)
                    .map_err(|e| format!("cannot store received memory: {e}"))?;
            }
            Kind::Zeros => {
                let (Some(first), Some(count)) = (u64_at(&payload, 0), u64_at(&payload, 8)) else {
                    return Err("a Zeros frame that is too short".into());
                };
                let off = page_range(first, count, pages)?;
                let mut left = count * PAGE as u64;
                let mut at = off;
                while left > 0 {
                    let n = left.min(zeros.len() as u64);
                    ram.write_all_at(&zeros[..n as usize], at)
                        .map_err(|e| format!("cannot store received memory: {e}"))?;
                    at += n;
                    left -= n;
                }
            }
            Kind::State => {
                if state.len() + payload.len() > MAX_STATE {
                    return Err(format!(
                        "the sender's state is larger than {MAX_STATE} bytes: refused"
                    ));
                }
                state.extend_from_slice(&payload);
            }
            Kind::StateEnd => break,
            other => return Err(format!("protocol error: unexpected {other:?} frame")),
        }
    }
    let from = PathBuf::from(format!("migration stream ({arch} VM)"));
    let file = StateFile::decode(&from, &state).map_err(|e| e.to_string())?;
    if file.header.memory_bytes != bytes {
        return Err(format!(
            "the sender's state says {} bytes of RAM but it sent {bytes}",
            file.header.memory_bytes
        ));
    }
    if file.version != crate::snapshot::format::FORMAT_VERSION {
        return Err("the sender's state is a diff snapshot's, not a whole VM's".into());
    }
    let (spec, clone) = spec_of(&file, Path::new(&from), args)?;
    let restore = Restore {
        dir: from,
        file,
        started,
        memory: Some(ram),
        gate: Default::default(),
        clone,
    };
    Ok((spec, restore))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Feeds `frames` from a source end and returns what the destination made of them.
    fn feed(frames: &[(Kind, Vec<u8>)]) -> String {
        let (a, b) = UnixStream::pair().unwrap();
        let frames = frames.to_vec();
        let src = std::thread::spawn(move || {
            let mut c = Conn::handshake(&a, Side::Source, None).unwrap();
            for (k, p) in frames {
                if c.send(k, &p).is_err() {
                    break;
                }
            }
        });
        let mut dst = Conn::handshake(&b, Side::Destination, None).unwrap();
        let err = receive_vm(&mut dst, &RunArgs::default()).err().unwrap();
        drop(dst);
        let _ = b.shutdown(std::net::Shutdown::Both);
        src.join().unwrap();
        err
    }

    fn begin(bytes: u64) -> (Kind, Vec<u8>) {
        (Kind::Begin, [&bytes.to_le_bytes()[..], b"riscv64"].concat())
    }

    #[test]
    fn hostile_frames_are_refused_with_reasons() {
        let page = |first: u64, n: usize| {
            (
                Kind::Pages,
                [first.to_le_bytes().to_vec(), vec![1u8; n]].concat(),
            )
        };
        let zeros =
            |first: u64, n: u64| (Kind::Zeros, [first.to_le_bytes(), n.to_le_bytes()].concat());
        let mib = 1u64 << 20;
        let arm = (Kind::Begin, [&mib.to_le_bytes()[..], b"aarch64"].concat());
        assert!(feed(&[arm]).contains("only riscv64 and x86_64"));
        assert!(feed(&[begin(mib + 1)]).contains("multiple of pages"));
        assert!(feed(&[begin(mib), page(256, PAGE)]).contains("outside"));
        assert!(feed(&[begin(mib), page(255, 2 * PAGE)]).contains("outside"));
        assert!(feed(&[begin(mib), page(u64::MAX, PAGE)]).contains("outside"));
        assert!(feed(&[begin(mib), page(0, 100)]).contains("whole pages"));
        assert!(feed(&[begin(mib), zeros(1, u64::MAX)]).contains("outside"));
        assert!(feed(&[begin(mib), (Kind::Zeros, vec![1])]).contains("too short"));
        assert!(feed(&[begin(mib), (Kind::Commit, vec![])]).contains("unexpected Commit"));
        let junk = (Kind::State, b"not a state file".to_vec());
        let e = feed(&[begin(mib), page(3, PAGE), junk, (Kind::StateEnd, vec![])]);
        assert!(e.contains("not a vme snapshot"), "{e}");
        let e = feed(&[begin(mib), page(3, PAGE)]);
        assert!(e.contains("closed the connection"), "{e}");
    }
}
