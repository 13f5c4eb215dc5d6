//! How a guest powers off or resets: the ACPI PM1a control register (sleep type S5
//! with SLP_EN) and the i8042 keyboard controller's reset command (also the FADT's
//! reset register), the two paths Linux uses on x86 (`poweroff` and `reboot=k` or
//! ACPI reboot). The PM1a event block beside them is just enough for ACPICA.

use crate::bus::{read_registers, BusAction, BusDevice};

/// PIO port of PM1a_EVT (status word, then enable word); in the FADT.
pub const PM1A_EVT_PORT: u64 = 0x600;
/// PIO port of PM1a_CNT; the ACPI FADT the VMM generates points here.
pub const PM1A_CNT_PORT: u64 = 0x604;
/// i8042 command port.
pub const I8042_COMMAND_PORT: u64 = 0x64;

const SLP_EN: u16 = 1 << 13;
/// PM1_CNT.SCI_EN: the machine is in ACPI mode (always, here).
const SCI_EN: u16 = 1;
const I8042_RESET: u8 = 0xfe;

/// PM1a_CNT: any write with SLP_EN set is a request to sleep, which for a microVM
/// means power off. Reads say SCI_EN (ACPI mode), nothing else.
#[derive(Default)]
pub struct AcpiPm1aControl;

impl BusDevice for AcpiPm1aControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_registers(&SCI_EN.to_le_bytes(), offset, data);
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

/// PM1_STS/PM1_EN bit 8: the fixed-feature power button.
pub const PWRBTN: u16 = 1 << 8;

/// Drives the SCI's interrupt line (level-triggered: asserted while an enabled
/// status bit is set).
pub type SciLine = Box<dyn FnMut(bool) + Send>;

/// PM1a_EVT: PM1_STS (offset 0) and PM1_EN (offset 2). The one event is the
/// power button ([`AcpiPm1aEvent::press_power_button`], the control API's graceful
/// shutdown): it sets PWRBTN_STS, and while PWRBTN_EN is set too the SCI is
/// asserted, until the guest writes 1 to the status bit to clear it. Other enable
/// bits stick as written (ACPICA reads them back) but nothing raises them.
#[derive(Default)]
pub struct AcpiPm1aEvent {
    status: u16,
    enable: u16,
    sci: Option<SciLine>,
    sci_level: bool,
}

impl AcpiPm1aEvent {
    pub fn new(sci: SciLine) -> Self {
        Self { sci: Some(sci), ..Self::default() }
    }

    /// Presses the power button; false if the guest has not enabled the event (no
    /// ACPI button driver), so nothing will happen.
    pub fn press_power_button(&mut self) -> bool {
        self.status |= PWRBTN;
        self.update_sci();
        self.enable & PWRBTN != 0
    }

    fn update_sci(&mut self) {
        let level = self.status & self.enable != 0;
        if level != self.sci_level {
            self.sci_level = level;
            if let Some(sci) = self.sci.as_mut() {
                sci(level);
            }
        }
    }
}

impl BusDevice for AcpiPm1aEvent {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [s0, s1] = self.status.to_le_bytes();
        let [e0, e1] = self.enable.to_le_bytes();
        read_registers(&[s0, s1, e0, e1], offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        let mut en = self.enable.to_le_bytes();
        let mut clear = [0u8; 2];
        for (i, b) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(0) => clear[0] = *b,
                Some(1) => clear[1] = *b,
                Some(2) => en[0] = *b,
                Some(3) => en[1] = *b,
                _ => {}
            }
        }
        // Status bits are write-one-to-clear.
        self.status &= !u16::from_le_bytes(clear);
        self.enable = u16::from_le_bytes(en);
        self.update_sci();
        BusAction::None
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm1a_control_powers_off_on_slp_en_and_reads_sci_en() {
        let mut c = AcpiPm1aControl;
        let mut w = [0u8; 2];
        c.read(0, &mut w);
        assert_eq!(w, [1, 0]);
        // Linux writes SLP_TYP first, then SLP_TYP | SLP_EN.
        assert_eq!(c.write(0, &((5 << 10) | SCI_EN).to_le_bytes()), BusAction::None);
        assert_eq!(c.write(0, &((5 << 10) | SLP_EN | SCI_EN).to_le_bytes()), BusAction::PowerOff);
        assert_eq!(c.write(1, &[0x34]), BusAction::PowerOff);
    }

    #[test]
    fn power_button_raises_the_sci_while_enabled_until_cleared() {
        let levels = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = levels.clone();
        let mut e = AcpiPm1aEvent::new(Box::new(move |l| seen.lock().unwrap().push(l)));
        assert!(!e.press_power_button(), "not enabled yet: the guest will not see it");
        assert!(levels.lock().unwrap().is_empty());
        let mut sts = [0u8; 2];
        e.read(0, &mut sts);
        assert_eq!(u16::from_le_bytes(sts), PWRBTN);
        // The guest enables the event: the pending press raises the SCI.
        e.write(2, &PWRBTN.to_le_bytes());
        assert_eq!(*levels.lock().unwrap(), [true]);
        assert!(e.press_power_button());
        // Writing 0 to status clears nothing; writing the bit clears it and the line.
        e.write(0, &[0, 0]);
        assert_eq!(*levels.lock().unwrap(), [true]);
        e.write(1, &[0x01]);
        assert_eq!(*levels.lock().unwrap(), [true, false]);
        e.read(0, &mut sts);
        assert_eq!(sts, [0, 0]);
    }

    #[test]
    fn pm1a_event_status_reads_zero_and_enable_sticks() {
        let mut e = AcpiPm1aEvent::default();
        assert_eq!(e.write(2, &0x0021u16.to_le_bytes()), BusAction::None);
        assert_eq!(e.write(0, &[0xff, 0xff]), BusAction::None);
        let mut all = [0u8; 4];
        e.read(0, &mut all);
        assert_eq!(all, [0, 0, 0x21, 0]);
        let mut hi = [0u8; 1];
        e.write(3, &[0x01]);
        e.read(3, &mut hi);
        assert_eq!(hi, [1]);
    }
}
