//! The i8042 keyboard controller, only as far as a guest uses it to reset the machine
//! (vm-superio's model: command 0xFE on port 0x64). Linux's `reboot=k` path lands here.

use crate::VmEvents;
use crate::bus::BusDevice;
use std::sync::{Arc, Mutex};
use vm_superio::{I8042Device, Trigger};

struct ResetTrigger(Arc<dyn VmEvents>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.reboot();
        Ok(())
    }
}

/// Port 0x60 is the data port (offset 0 in vm-superio's model), 0x64 the command/status port
/// (offset 4). Port 0x61, between them, belongs to the PIT's speaker gate, so the controller
/// is reached through two single-port devices instead of one range.
pub struct I8042Port {
    dev: Arc<Mutex<I8042Device<ResetTrigger>>>,
    model_offset: u8,
}

pub const DATA_PORT: u16 = 0x60;
pub const COMMAND_PORT: u16 = 0x64;

/// Returns the devices for the data port and the command port.
pub fn i8042(events: Arc<dyn VmEvents>) -> (I8042Port, I8042Port) {
    let dev = Arc::new(Mutex::new(I8042Device::new(ResetTrigger(events))));
    (
        I8042Port {
            dev: dev.clone(),
            model_offset: 0,
        },
        I8042Port {
            dev,
            model_offset: 4,
        },
    )
}

impl BusDevice for I8042Port {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0
            && let Some(b) = data.first_mut()
        {
            *b = self
                .dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read(self.model_offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0
            && let Some(&v) = data.first()
        {
            let mut dev = self.dev.lock().unwrap_or_else(|p| p.into_inner());
            let _ = dev.write(self.model_offset, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Events(AtomicUsize);
    impl VmEvents for Events {
        fn power_off(&self) {}
        fn reboot(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn reset_command_reboots_only_on_command_port() {
        let ev = Arc::new(Events::default());
        let (mut data, mut cmd) = i8042(ev.clone());
        data.write(0, &[0xfe]);
        assert_eq!(ev.0.load(Ordering::SeqCst), 0);
        cmd.write(0, &[0xaa]);
        assert_eq!(ev.0.load(Ordering::SeqCst), 0);
        cmd.write(0, &[0xfe]);
        assert_eq!(ev.0.load(Ordering::SeqCst), 1);
        let mut b = [0xffu8; 2];
        cmd.read(0, &mut b);
        assert_eq!(b, [0, 0]);
    }
}
