//! The x86 ACPI hardware the FADT and DSDT point at: the sleep control/status registers (a
//! write of SLP_TYP=S5 with SLP_EN powers off), the reset register (reboots), and a Generic
//! Event Device (ACPI0013) whose event register and interrupt carry the power button.
//!
//! Register layout, one port-I/O block (see `vme_arch::acpi` for the tables describing it):
//!   +0  sleep control (FADT SLEEP_CONTROL_REG), 1 byte: bits 4:2 SLP_TYP, bit 5 SLP_EN
//!   +1  sleep status  (FADT SLEEP_STATUS_REG), 1 byte: bit 7 WAK_STS (reads 0)
//!   +2  reset         (FADT RESET_REG), 1 byte: writing RESET_VALUE reboots
//!   +4  GED event     4 bytes, read-to-clear: bit 0 = power button pressed, bit 1 = the
//!       VM Generation ID changed (the DSDT notifies `\_SB_.VGEN`)

use crate::bus::BusDevice;
use crate::{IrqLine, VmEvents};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const SLEEP_CONTROL: u64 = 0;
pub const SLEEP_STATUS: u64 = 1;
pub const RESET: u64 = 2;
pub const GED_EVENT: u64 = 4;
/// Bytes of port space the block decodes.
pub const LEN: u64 = 8;
/// The S5 (soft-off) sleep type the DSDT's `\_S5_` object announces.
pub const SLP_TYP_S5: u8 = 5;
pub const RESET_VALUE: u8 = 0x1;
/// GED event bit of the power button.
pub const EVENT_POWER_BUTTON: u32 = 1;
/// GED event bit of a new VM Generation ID (a clone's).
pub const EVENT_GENERATION: u32 = 2;

const SLP_EN: u8 = 1 << 5;

/// The ACPI block in a snapshot: the GED events the guest has not read yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiState {
    pub pending: u32,
}

pub struct AcpiDevice {
    events: Arc<dyn VmEvents>,
    ged_irq: Arc<dyn IrqLine>,
    pending: u32,
}

impl AcpiDevice {
    pub fn new(events: Arc<dyn VmEvents>, ged_irq: Arc<dyn IrqLine>) -> Self {
        AcpiDevice {
            events,
            ged_irq,
            pending: 0,
        }
    }

    pub fn state(&self) -> AcpiState {
        AcpiState {
            pending: self.pending,
        }
    }

    /// Takes a snapshot's pending events and drives the GED interrupt as they say.
    pub fn restore(&mut self, s: &AcpiState) -> Result<(), String> {
        if s.pending & !(EVENT_POWER_BUTTON | EVENT_GENERATION) != 0 {
            return Err(format!("GED events {:#x} do not exist", s.pending));
        }
        self.pending = s.pending;
        self.ged_irq.set_level(s.pending != 0);
        Ok(())
    }

    /// Tells the guest the power button was pressed (it runs its `_EVT` method, and Linux
    /// then shuts down in order).
    pub fn press_power_button(&mut self) {
        self.pending |= EVENT_POWER_BUTTON;
        self.ged_irq.set_level(true);
    }

    /// Tells the guest its VM Generation ID changed (write the new one first): Linux's
    /// vmgenid driver reads it and reseeds the kernel's random generator.
    pub fn notify_generation(&mut self) {
        self.pending |= EVENT_GENERATION;
        self.ged_irq.set_level(true);
    }
}

impl BusDevice for AcpiDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == GED_EVENT && data.len() == 4 {
            data.copy_from_slice(&self.pending.to_le_bytes());
            // Read-to-clear: the guest's _EVT has seen the event; drop the level interrupt.
            self.pending = 0;
            self.ged_irq.set_level(false);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let slp_typ = (value >> 2) & 0x7;
                if slp_typ == SLP_TYP_S5 {
                    self.events.power_off();
                } else {
                    // S1–S4 would need the machine state kept; we do not offer them.
                    log::debug!("guest asked for sleep state {slp_typ}, which is not offered");
                }
            }
            RESET if value == RESET_VALUE => self.events.reboot(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);
    impl Log {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }
    impl VmEvents for Log {
        fn power_off(&self) {
            self.0.lock().unwrap().push("off".into());
        }
        fn reboot(&self) {
            self.0.lock().unwrap().push("reboot".into());
        }
    }
    impl IrqLine for Log {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(format!("irq {high}"));
        }
    }

    fn device() -> (AcpiDevice, Arc<Log>, Arc<Log>) {
        let (ev, irq) = (Arc::new(Log::default()), Arc::new(Log::default()));
        (AcpiDevice::new(ev.clone(), irq.clone()), ev, irq)
    }

    #[test]
    fn s5_with_slp_en_powers_off_and_nothing_else_does() {
        let (mut dev, ev, _) = device();
        dev.write(SLEEP_CONTROL, &[SLP_TYP_S5 << 2]);
        dev.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]);
        dev.write(SLEEP_STATUS, &[0xff]);
        dev.write(SLEEP_CONTROL, &[]);
        assert!(ev.take().is_empty());
        dev.write(SLEEP_CONTROL, &[(SLP_TYP_S5 << 2) | SLP_EN]);
        assert_eq!(ev.take(), vec!["off"]);
    }

    #[test]
    fn reset_register_reboots_only_with_its_value() {
        let (mut dev, ev, _) = device();
        dev.write(RESET, &[0x2]);
        assert!(ev.take().is_empty());
        dev.write(RESET, &[RESET_VALUE]);
        assert_eq!(ev.take(), vec!["reboot"]);
    }

    #[test]
    fn power_button_raises_and_read_clears() {
        let (mut dev, _, irq) = device();
        dev.press_power_button();
        assert_eq!(irq.take(), vec!["irq true"]);
        let mut b = [0u8; 4];
        dev.read(GED_EVENT, &mut b);
        assert_eq!(u32::from_le_bytes(b), EVENT_POWER_BUTTON);
        assert_eq!(irq.take(), vec!["irq false"]);
        dev.read(GED_EVENT, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        // Odd widths and offsets read zero and change nothing.
        let mut one = [0xffu8; 1];
        dev.read(GED_EVENT, &mut one);
        assert_eq!(one, [0]);
    }

    #[test]
    fn a_new_generation_raises_its_own_bit_and_survives_a_snapshot() {
        let (mut dev, _, irq) = device();
        dev.press_power_button();
        dev.notify_generation();
        assert_eq!(irq.take(), vec!["irq true", "irq true"]);
        let st = dev.state();
        assert_eq!(st.pending, EVENT_POWER_BUTTON | EVENT_GENERATION);
        let (mut other, _, irq2) = device();
        other.restore(&st).unwrap();
        assert_eq!(irq2.take(), vec!["irq true"]);
        let mut b = [0u8; 4];
        other.read(GED_EVENT, &mut b);
        assert_eq!(u32::from_le_bytes(b), EVENT_POWER_BUTTON | EVENT_GENERATION);
        assert!(
            other.restore(&AcpiState { pending: 4 }).is_err(),
            "bit 2 does not exist"
        );
    }
}
