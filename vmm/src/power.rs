//! How a guest powers off or resets: the ACPI PM1a control register (sleep type S5
//! with SLP_EN) and the i8042 keyboard controller's reset command, the two paths
//! Linux uses on x86 (`poweroff` and `reboot=k`).

use crate::bus::{BusAction, BusDevice};

/// PIO port of PM1a_CNT; the ACPI FADT the VMM generates points here.
pub const PM1A_CNT_PORT: u64 = 0x604;
/// i8042 command port.
pub const I8042_COMMAND_PORT: u64 = 0x64;

const SLP_EN: u16 = 1 << 13;
const I8042_RESET: u8 = 0xfe;

/// PM1a_CNT: any write with SLP_EN set is a request to sleep, which for a microVM
/// means power off.
#[derive(Default)]
pub struct AcpiPm1aControl;

impl BusDevice for AcpiPm1aControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        let value = match (offset, data) {
            (0, [lo, hi, ..]) => u16::from_le_bytes([*lo, *hi]),
            (1, [hi]) => u16::from(*hi) << 8,
            _ => return BusAction::None,
        };
        if value & SLP_EN != 0 {
            BusAction::PowerOff
        } else {
            BusAction::None
        }
    }
}

/// Just enough of the i8042 to see a reset request. Its status register reads
/// "output buffer full, input buffer empty" forever (and the data port, 0x60, is not
/// there): Linux's probe drains at most 16 bytes, then decides there is no
/// controller at once instead of timing out on every command, while `reboot=k`'s
/// wait for an empty input buffer passes straight to the 0xFE reset pulse.
#[derive(Default)]
pub struct I8042;

/// Status register bits: output buffer full (bit 0); input buffer full (bit 1) clear.
pub const I8042_STATUS: u8 = 0x01;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = I8042_STATUS;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if offset == 0 && data.first() == Some(&I8042_RESET) {
            BusAction::Reset
        } else {
            BusAction::None
        }
    }
}
