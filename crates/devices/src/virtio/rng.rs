//! virtio-rng (virtio 1.2 §5.4): fills each device-writable buffer with bytes from the
//! host's `getrandom(2)`. Device-readable buffers carry nothing for this device and are
//! ignored.

use super::queue::{Cursor, Queue, QueueError};
use super::{DeviceState, GuestMemory, ID_RNG, StateError, VirtioDevice};

const QUEUE_SIZE: u16 = 64;
/// Most bytes served per chain: a guest asking for more gets a short (but valid) answer.
const MAX_PER_CHAIN: usize = 64 << 10;

#[derive(Default)]
pub struct Rng {
    buf: Vec<u8>,
}

impl Rng {
    pub fn new() -> Self {
        Rng::default()
    }
}

/// Fills `buf` from the host's entropy pool; fails only if the kernel refuses.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_id(&self) -> u32 {
        ID_RNG
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Rng
    }

    fn restore_state(&mut self, state: &DeviceState, _: &[u16]) -> Result<(), StateError> {
        match state {
            DeviceState::Rng => Ok(()),
            _ => Err(StateError("the saved state is not an rng's".into())),
        }
    }

    fn process(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &dyn GuestMemory,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = queue.pop(mem)? {
            let want = chain.writable_len().min(MAX_PER_CHAIN as u64) as usize;
            self.buf.resize(want, 0);
            let written = match getrandom(&mut self.buf) {
                Ok(()) => Cursor::new(&chain.writable).write_from(mem, &self.buf)?,
                Err(e) => {
                    // Returning no bytes is valid; the guest asks again later.
                    log::warn!("virtio-rng: host getrandom failed: {e}");
                    0
                }
            };
            queue.add_used(mem, chain.head, written as u32)?;
            used = true;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testmem::{BASE, Driver, TestMemory};

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mem = TestMemory::new();
        let mut drv = Driver::new(8);
        let mut q = drv.queue(QUEUE_SIZE);
        let data = BASE + 0x10000;
        drv.post(&mem, &[(data, 32, true), (data + 100, 32, true)]);
        drv.post(&mem, &[(data + 0x1000, 16, false)]);
        drv.post(&mem, &[(data + 0x2000, 128 << 10, true)]);
        let mut rng = Rng::new();
        assert!(rng.process(0, &mut q, &mem).unwrap());
        assert_eq!(drv.used_idx(&mem), 3);
        assert_eq!(drv.used_elem(&mem, 0).1, 64);
        assert_eq!(
            drv.used_elem(&mem, 1).1,
            0,
            "a read-only chain gets no bytes"
        );
        assert_eq!(drv.used_elem(&mem, 2).1, MAX_PER_CHAIN as u32, "capped");
        // 64 random bytes are all zero with probability 2^-512.
        assert!(
            mem.get(data, 32)
                .iter()
                .chain(&mem.get(data + 100, 32))
                .any(|&b| b != 0)
        );
        assert!(
            mem.get(data + 32, 68).iter().all(|&b| b == 0),
            "the gap is untouched"
        );
        assert!(mem.get(data + 0x1000, 16).iter().all(|&b| b == 0));
    }
}
