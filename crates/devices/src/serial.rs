//! The 16550A UART (vm-superio's model) wired to an interrupt line and an output sink.
//! The guest's console: 8 registers at 0x3f8 (IRQ 4) on x86, MMIO at 0x1000_0000 on riscv64.

use crate::IrqLine;
use crate::bus::BusDevice;
use crate::virtio::StateError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::Arc;
use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::{Serial as Uart, Trigger};

/// The UART in a snapshot: its registers and the input the guest has not read yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// At most the FIFO's 64 bytes.
    pub in_buffer: Vec<u8>,
}

/// Adapts our interrupt line to vm-superio's trigger. The UART signals events (data ready,
/// transmitter empty), so each is delivered as an edge.
pub struct IrqTrigger(pub Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.pulse();
        Ok(())
    }
}

pub struct Serial {
    uart: Uart<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
    output_failed: bool,
}

impl Serial {
    pub fn new(irq: Arc<dyn IrqLine>, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: Uart::new(IrqTrigger(irq), out),
            output_failed: false,
        }
    }

    /// Queues host input for the guest. Returns how many bytes fit in the receive FIFO; the
    /// caller retries the rest later.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }

    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    pub fn state(&self) -> SerialState {
        let u = self.uart.state();
        SerialState {
            baud_divisor_low: u.baud_divisor_low,
            baud_divisor_high: u.baud_divisor_high,
            interrupt_enable: u.interrupt_enable,
            interrupt_identification: u.interrupt_identification,
            line_control: u.line_control,
            line_status: u.line_status,
            modem_control: u.modem_control,
            modem_status: u.modem_status,
            scratch: u.scratch,
            in_buffer: u.in_buffer,
        }
    }

    /// A UART with a snapshot's registers and input; raises its interrupt if one was
    /// pending. Refuses more input than the FIFO holds.
    pub fn from_state(
        s: &SerialState,
        irq: Arc<dyn IrqLine>,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, StateError> {
        let u = UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let uart = Uart::from_state(&u, IrqTrigger(irq), NoEvents, out).map_err(|_| {
            StateError(format!(
                "{} bytes of input, more than the UART's FIFO holds",
                s.in_buffer.len()
            ))
        })?;
        Ok(Serial {
            uart,
            output_failed: false,
        })
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte registers; wider accesses read the addressed one, the rest zero.
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        // A closed console (stdout gone) must not stop the guest: drop output, say so once.
        if self.uart.write(off, value).is_err() && !self.output_failed {
            self.output_failed = true;
            log::warn!("serial console output failed; further guest output is discarded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);
    impl IrqLine for CountingIrq {
        fn set_level(&self, high: bool) {
            if high {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_receives_with_interrupts() {
        let irq = Arc::new(CountingIrq::default());
        let sink = Sink::default();
        let mut s = Serial::new(irq.clone(), Box::new(sink.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt (IER bit 0), then feed input.
        s.write(1, &[1]);
        let before = irq.0.load(Ordering::SeqCst);
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert!(
            irq.0.load(Ordering::SeqCst) > before,
            "input raises the interrupt"
        );
        let mut b = [0u8; 1];
        s.read(5, &mut b);
        assert_eq!(b[0] & 1, 1, "LSR data-ready");
        s.read(0, &mut b);
        assert_eq!(b[0], b'o');
    }

    #[test]
    fn state_round_trips_with_unread_input() {
        let irq = Arc::new(CountingIrq::default());
        let mut s = Serial::new(irq.clone(), Box::new(std::io::sink()));
        s.write(1, &[1]);
        s.write(7, &[0x5a]);
        assert_eq!(s.enqueue_input(b"abc"), 3);
        let state = s.state();
        let raised = irq.0.load(Ordering::SeqCst);
        let mut t = Serial::from_state(&state, irq.clone(), Box::new(std::io::sink())).unwrap();
        assert!(
            irq.0.load(Ordering::SeqCst) > raised,
            "pending input raises the line again"
        );
        assert_eq!(t.state(), state);
        let mut b = [0u8; 1];
        t.read(0, &mut b);
        assert_eq!(b[0], b'a');
        t.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        let mut big = state;
        big.in_buffer = vec![0; 65];
        let err = Serial::from_state(&big, irq, Box::new(std::io::sink()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("65 bytes"), "{err}");
    }

    #[test]
    fn hostile_offsets_are_harmless() {
        let mut s = Serial::new(Arc::new(CountingIrq::default()), Box::new(std::io::sink()));
        let mut b = [0u8; 8];
        s.read(u64::MAX, &mut b);
        s.write(u64::MAX, &[1, 2]);
        s.write(3, &[]);
    }
}
