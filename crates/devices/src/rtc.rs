//! The CMOS real-time clock at ports 0x70 (index) / 0x71 (data), as far as Linux reads it: the
//! date and time (so the guest's date is the host's), status registers and 128 bytes of NVRAM.
//! No alarms or periodic interrupts: Linux keeps time with kvmclock and the local APIC.

use crate::bus::BusDevice;
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// Status B bit 2: values are binary rather than BCD.
const B_BINARY: u8 = 1 << 2;
/// Status B bit 1: 24-hour clock.
const B_24H: u8 = 1 << 1;

pub const INDEX_PORT: u16 = 0x70;

/// The RTC in a snapshot: the selected register and the CMOS bytes (the clock itself
/// follows the host, so a restored guest reads the time of the restore).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    pub index: u8,
    /// 128 bytes.
    pub nvram: Vec<u8>,
}

pub struct Rtc {
    index: u8,
    nvram: [u8; 128],
    now: Box<dyn Fn() -> i64 + Send>,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// A clock that reads the host's UTC time.
    pub fn new() -> Self {
        Self::with_clock(Box::new(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        }))
    }

    /// A clock reading `now()` (Unix seconds); tests use a fixed instant.
    pub fn with_clock(now: Box<dyn Fn() -> i64 + Send>) -> Self {
        let mut nvram = [0u8; 128];
        nvram[STATUS_A as usize] = 0x26; // 32.768 kHz base, 1024 Hz rate, update not in progress
        nvram[STATUS_B as usize] = B_24H;
        nvram[STATUS_D as usize] = 0x80; // battery good: contents valid
        Rtc {
            index: 0,
            nvram,
            now,
        }
    }

    pub fn state(&self) -> RtcState {
        RtcState {
            index: self.index,
            nvram: self.nvram.to_vec(),
        }
    }

    /// Takes a snapshot's registers.
    pub fn restore(&mut self, s: &RtcState) -> Result<(), String> {
        if s.index > 0x7f || s.nvram.len() != self.nvram.len() {
            return Err(format!(
                "register {:#x} selected and {} CMOS bytes saved; the RTC has 128 registers",
                s.index,
                s.nvram.len()
            ));
        }
        self.index = s.index;
        self.nvram.copy_from_slice(&s.nvram);
        Ok(())
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.nvram[STATUS_B as usize] & B_BINARY != 0 {
            v
        } else {
            (v / 10) << 4 | (v % 10)
        }
    }

    fn read_register(&self, reg: u8) -> u8 {
        let t = civil((self.now)());
        match reg {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => self.encode(t.hour),
            WEEKDAY => self.encode(t.weekday + 1),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode(t.year.rem_euclid(100) as u32),
            CENTURY => self.encode(t.year.div_euclid(100).clamp(0, 99) as u32),
            STATUS_C => 0,
            _ => self.nvram[reg as usize & 0x7f],
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        match reg {
            // The clock follows the host; setting it from the guest is ignored, as is clearing
            // the read-only status registers.
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {}
            STATUS_A => self.nvram[STATUS_A as usize] = value & 0x7f,
            STATUS_C | STATUS_D => {}
            _ => self.nvram[reg as usize & 0x7f] = value,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 1
            && let Some(b) = data.first_mut()
        {
            *b = self.read_register(self.index);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port masks NMIs on real hardware; we have none to mask.
            0 => self.index = v & 0x7f,
            1 => self.write_register(self.index, v),
            _ => {}
        }
    }
}

struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Sunday.
    weekday: u32,
}

/// Unix seconds to the proleptic Gregorian calendar (UTC), by counting 400-year eras.
fn civil(unix: i64) -> Civil {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400) as u32;
    // Shift the epoch to 0000-03-01 so leap days fall at the end of each year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        hour: secs / 3600,
        minute: secs / 60 % 60,
        second: secs % 60,
        // 1970-01-01 was a Thursday.
        weekday: (days + 4).rem_euclid(7) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn reports_the_clock_in_bcd_and_binary() {
        // 2026-11-22 05:52:42 UTC, a Sunday.
        let mut rtc = Rtc::with_clock(Box::new(|| 1_795_326_762));
        assert_eq!(read(&mut rtc, YEAR), 0x26);
        assert_eq!(read(&mut rtc, CENTURY), 0x20);
        assert_eq!(read(&mut rtc, MONTH), 0x11);
        assert_eq!(read(&mut rtc, DAY), 0x22);
        assert_eq!(read(&mut rtc, HOURS), 0x05);
        assert_eq!(read(&mut rtc, MINUTES), 0x52);
        assert_eq!(read(&mut rtc, SECONDS), 0x42);
        assert_eq!(read(&mut rtc, WEEKDAY), 1);
        assert_eq!(read(&mut rtc, STATUS_D), 0x80);
        rtc.write(0, &[STATUS_B]);
        rtc.write(1, &[B_24H | B_BINARY]);
        assert_eq!(read(&mut rtc, MINUTES), 52);
        assert_eq!(
            read(&mut rtc, 0x8a) & 0x80,
            0,
            "NMI bit masked, update not in progress"
        );
    }

    #[test]
    fn state_round_trips_and_bad_sizes_are_refused() {
        let mut rtc = Rtc::with_clock(Box::new(|| 0));
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0x5a]);
        let s = rtc.state();
        let mut back = Rtc::with_clock(Box::new(|| 0));
        back.restore(&s).unwrap();
        assert_eq!(read(&mut back, 0x40), 0x5a);
        let short = RtcState {
            index: 0,
            nvram: vec![0; 12],
        };
        assert!(back.restore(&short).is_err());
        let index = RtcState { index: 0x80, ..s };
        assert!(back.restore(&index).is_err());
    }

    #[test]
    fn calendar_edges() {
        let c = civil(0);
        assert_eq!((c.year, c.month, c.day, c.weekday), (1970, 1, 1, 4));
        let c = civil(951_782_400); // 2000-02-29
        assert_eq!((c.year, c.month, c.day), (2000, 2, 29));
        let c = civil(-1);
        assert_eq!((c.year, c.month, c.day, c.hour), (1969, 12, 31, 23));
        let _ = civil(i64::MAX / 2);
        let _ = civil(i64::MIN / 2);
    }

    #[test]
    fn nvram_keeps_guest_bytes_and_clock_ignores_writes() {
        let mut rtc = Rtc::with_clock(Box::new(|| 0));
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0x5a]);
        assert_eq!(read(&mut rtc, 0x40), 0x5a);
        rtc.write(0, &[YEAR]);
        rtc.write(1, &[0x99]);
        assert_eq!(read(&mut rtc, YEAR), 0x70);
    }
}
