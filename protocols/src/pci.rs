//! The one PCI address type of the project: a function's `domain:bus:device.function`,
//! as the host's sysfs names it (the VF manager), as the VMM places it on the guest's
//! bus, and as the agent finds a device in the guest. It crosses every process
//! boundary (the VMM control API, the agent API, the VF journal) as the kernel's text
//! form, `0000:01:10.2`, and is checked wherever it is decoded.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A PCI function's address. Domains are 32 bits wide, as in Linux (Intel VMD puts
/// devices in domains from `10000`); device numbers are 0..=0x1f and function numbers
/// 0..=7, which the constructors enforce. Ordered by domain, bus, device, function.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PciAddress {
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

/// A text that is not a PCI address, quoted, with what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCI address {input:?}: {reason}")]
pub struct PciAddressError {
    pub input: String,
    pub reason: String,
}

/// The form every parse error names.
const EXPECTED_FORM: &str = "expected DDDD:BB:DD.F (hex), e.g. 0000:00:05.0";

impl PciAddress {
    /// The largest device number on a bus.
    pub const MAX_DEVICE: u8 = 0x1f;
    /// The largest function number of a device.
    pub const MAX_FUNCTION: u8 = 7;

    /// An address from its parts; `None` if the device or function number is out of range.
    pub const fn new(domain: u32, bus: u8, device: u8, function: u8) -> Option<Self> {
        if device > Self::MAX_DEVICE || function > Self::MAX_FUNCTION {
            return None;
        }
        Some(Self { domain, bus, device, function })
    }

    /// An address from a bus number and the 8-bit device/function number that PCI
    /// configuration mechanisms carry (device in bits 7:3, function in bits 2:0), so
    /// every value is valid.
    pub const fn from_devfn(domain: u32, bus: u8, devfn: u8) -> Self {
        Self { domain, bus, device: devfn >> 3, function: devfn & 7 }
    }

    pub const fn domain(self) -> u32 {
        self.domain
    }

    pub const fn bus(self) -> u8 {
        self.bus
    }

    pub const fn device(self) -> u8 {
        self.device
    }

    pub const fn function(self) -> u8 {
        self.function
    }

    /// The device/function byte of configuration mechanisms (see [`Self::from_devfn`]).
    pub const fn devfn(self) -> u8 {
        (self.device << 3) | self.function
    }
}

impl FromStr for PciAddress {
    type Err = PciAddressError;

    /// Accepts the kernel's `DDDD:BB:DD.F` and lspci's domain-less `BB:DD.F` (domain 0),
    /// hex digits in any case; nothing around them (no spaces).
    fn from_str(input: &str) -> Result<Self, PciAddressError> {
        let bad = |reason: String| PciAddressError { input: input.to_string(), reason };
        let parts: Vec<&str> = input.split(':').collect();
        let (domain, bus, rest) = match parts.as_slice() {
            [domain, bus, rest] => (*domain, *bus, *rest),
            [bus, rest] => ("0", *bus, *rest),
            _ => return Err(bad(EXPECTED_FORM.into())),
        };
        let (device, function) = rest.split_once('.').ok_or_else(|| bad(EXPECTED_FORM.into()))?;
        let hex = |digits: &str, max_len: usize, what: &str| -> Result<u32, PciAddressError> {
            if digits.is_empty() || digits.len() > max_len || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                let digits = if max_len == 1 { "one hex digit".to_string() } else { format!("1 to {max_len} hex digits") };
                return Err(bad(format!("{what} must be {digits} ({EXPECTED_FORM})")));
            }
            u32::from_str_radix(digits, 16).map_err(|e| bad(format!("{what}: {e}")))
        };
        let domain = hex(domain, 8, "domain")?;
        // At most 2 and 1 hex digits: these fit their types.
        let in_u8 = |value: u32| u8::try_from(value).expect("at most two hex digits");
        let bus = in_u8(hex(bus, 2, "bus")?);
        let device = in_u8(hex(device, 2, "device")?);
        let function = in_u8(hex(function, 1, "function")?);
        if device > Self::MAX_DEVICE {
            return Err(bad(format!("device must be at most {:x}", Self::MAX_DEVICE)));
        }
        if function > Self::MAX_FUNCTION {
            return Err(bad(format!("function must be at most {}", Self::MAX_FUNCTION)));
        }
        Ok(Self { domain, bus, device, function })
    }
}

impl TryFrom<String> for PciAddress {
    type Error = PciAddressError;
    fn try_from(text: String) -> Result<Self, PciAddressError> {
        text.parse()
    }
}

impl From<PciAddress> for String {
    fn from(address: PciAddress) -> String {
        address.to_string()
    }
}

/// The kernel's form: `0000:01:10.2` (a domain wider than 16 bits prints in full).
impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

impl fmt::Debug for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> PciAddress {
        text.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn the_kernels_form_and_lspcis_parse_and_print_canonically() {
        assert_eq!(parse("0000:01:10.0").to_string(), "0000:01:10.0");
        assert_eq!(parse("0000:AF:1f.7").to_string(), "0000:af:1f.7");
        assert_eq!(parse("af:00.3").to_string(), "0000:af:00.3");
        assert_eq!(parse("10000:e1:00.0").to_string(), "10000:e1:00.0");
        let a = parse("0001:02:03.4");
        assert_eq!((a.domain(), a.bus(), a.device(), a.function()), (1, 2, 3, 4));
        assert_eq!(PciAddress::new(1, 2, 3, 4), Some(a));
    }

    #[test]
    fn malformed_text_is_quoted_with_what_was_expected() {
        for (text, says) in [
            ("", "expected DDDD:BB:DD.F"),
            ("0000:01:10", "expected DDDD:BB:DD.F"),
            ("0000-00:05.0", "expected DDDD:BB:DD.F"),
            ("a:b:c:d.0", "expected DDDD:BB:DD.F"),
            ("0000:01:10.0.1", "function must be one hex digit"),
            ("000g:00:05.0", "domain must be"),
            ("0000:001:10.0", "bus must be"),
            ("0000:00:05.0 ", "function must be"),
            (" 0000:00:05.0", "domain must be"),
            ("0000:00:20.0", "device must be at most 1f"),
            ("0000:00:05.8", "function must be at most 7"),
            ("0000:00:05.a", "function must be at most 7"),
            ("123456789:00:05.0", "domain must be 1 to 8 hex digits"),
        ] {
            let err = text.parse::<PciAddress>().expect_err(text);
            let shown = err.to_string();
            assert!(shown.starts_with(&format!("invalid PCI address {text:?}: ")) && shown.contains(says), "{text:?}: {shown}");
        }
    }

    #[test]
    fn out_of_range_parts_are_refused_and_devfn_round_trips() {
        assert_eq!(PciAddress::new(0, 0, 0x20, 0), None);
        assert_eq!(PciAddress::new(0, 0, 0, 8), None);
        for devfn in 0..=u8::MAX {
            let a = PciAddress::from_devfn(0, 7, devfn);
            assert_eq!(a.devfn(), devfn);
            assert_eq!(PciAddress::new(0, 7, a.device(), a.function()), Some(a));
        }
    }

    #[test]
    fn order_is_domain_bus_device_function() {
        let mut v = ["0001:00:00.0", "0000:01:00.0", "0000:00:02.0", "0000:00:01.7", "0000:00:01.0"].map(parse).to_vec();
        v.sort();
        assert_eq!(
            v.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["0000:00:01.0", "0000:00:01.7", "0000:00:02.0", "0000:01:00.0", "0001:00:00.0"]
        );
    }

    #[test]
    fn serde_carries_the_text_and_refuses_malformed_text_quoting_it() {
        let a = parse("0000:00:05.0");
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"0000:00:05.0\"");
        assert_eq!(serde_json::from_str::<PciAddress>("\"0000:00:05.0\"").unwrap(), a);
        let err = serde_json::from_str::<PciAddress>("\"0000:00:25.0\"").unwrap_err().to_string();
        assert!(err.contains("invalid PCI address \"0000:00:25.0\": device must be at most 1f"), "{err}");
        assert!(serde_json::from_str::<PciAddress>("5").is_err());
    }
}
