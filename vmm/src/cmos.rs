//! Just enough of the MC146818 RTC/CMOS at ports 0x70/0x71 for Linux not to wait on
//! it: the update-in-progress bit is never set, and the clock reads the host's UTC
//! time, binary 24-hour (the guest's running wall clock comes from kvmclock).

use crate::bus::{BusAction, BusDevice};

pub const CMOS_PORT: u64 = 0x70;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Clock register `reg` (binary) at `unix` seconds, UTC.
fn clock_register(reg: u8, unix: u64) -> u8 {
    let days = unix / 86400;
    let secs = unix % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm; every
    // intermediate is non-negative from 1970 on, so it runs in unsigned arithmetic).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let value = match reg {
        0 => secs % 60,
        2 => secs / 60 % 60,
        4 => secs / 3600,
        6 => (days + 4) % 7 + 1, // 1970-01-01 was a Thursday; Sunday is 1
        7 => day,
        8 => month,
        9 => year % 100,
        REG_CENTURY => year / 100,
        _ => 0,
    };
    // Only the century of a host clock past the year 25599 does not fit.
    u8::try_from(value).unwrap_or(u8::MAX)
}

#[derive(Default)]
pub struct Cmos {
    index: u8,
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, self.index) {
            (0, _) => self.index,
            (_, i @ (0..=9 | REG_CENTURY)) => clock_register(i, unix_now()),
            (_, REG_A) => 0x26,        // 32.768 kHz time base, 1024 Hz rate, UIP clear
            (_, REG_B) => 0x02 | 0x04, // 24-hour, binary
            (_, REG_D) => 0x80,        // valid RAM and time
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if let (0, Some(v)) = (offset, data.first()) {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = v & 0x7f;
        }
        BusAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_reads_utc() {
        // 2026-11-22 23:58:07 UTC, a Sunday.
        let t = 1_795_391_887;
        let regs: Vec<u8> = [0, 2, 4, 6, 7, 8, 9, REG_CENTURY].iter().map(|r| clock_register(*r, t)).collect();
        assert_eq!(regs, [7, 58, 23, 1, 22, 11, 26, 20]);
        assert_eq!(clock_register(8, 951_782_400), 2); // 2000-02-29
        assert_eq!(clock_register(7, 951_782_400), 29);
    }

    #[test]
    fn uip_is_never_set() {
        let mut c = Cmos::default();
        c.write(0, &[0x80 | REG_A]);
        let mut v = [0xffu8];
        c.read(1, &mut v);
        assert_eq!(v[0] & 0x80, 0);
        c.write(0, &[REG_D]);
        c.read(1, &mut v);
        assert_eq!(v[0], 0x80);
    }
}
