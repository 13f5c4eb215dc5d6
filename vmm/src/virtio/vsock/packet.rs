//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and moving packets between
//! descriptor chains and host buffers, with every length checked.

use vm_memory::GuestMemoryMmap;

use crate::virtio::segments::OutsideMemory;
pub use crate::virtio::segments::Segments;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The largest payload one packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// The host's CID (VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more data / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`, in host order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// Why a tx packet was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("the chain has {0} readable bytes, less than a header")]
    ShortHeader(u64),
    #[error("payload length {0} is over the maximum of {MAX_PKT_PAYLOAD}")]
    TooLong(u32),
    #[error("payload length {len} is beyond the chain's {avail} bytes after the header")]
    BeyondChain { len: u32, avail: u64 },
    #[error("the chain points outside guest memory")]
    Memory,
}

impl From<OutsideMemory> for PacketError {
    fn from(_: OutsideMemory) -> Self {
        PacketError::Memory
    }
}

/// Parses a tx chain (device-readable segments): an exact header, then `len` bytes.
pub fn read_packet(mem: &GuestMemoryMmap, segs: &Segments) -> Result<(Header, Vec<u8>), PacketError> {
    if segs.total() < HDR_LEN as u64 {
        return Err(PacketError::ShortHeader(segs.total()));
    }
    let mut hb = [0u8; HDR_LEN];
    segs.read_at(mem, 0, &mut hb)?;
    let hdr = Header::from_bytes(&hb);
    if hdr.len as usize > MAX_PKT_PAYLOAD {
        return Err(PacketError::TooLong(hdr.len));
    }
    let avail = segs.total() - HDR_LEN as u64;
    if u64::from(hdr.len) > avail {
        return Err(PacketError::BeyondChain { len: hdr.len, avail });
    }
    let mut payload = vec![0u8; hdr.len as usize];
    segs.read_at(mem, HDR_LEN as u64, &mut payload)?;
    Ok((hdr, payload))
}

/// Writes a packet (header with `len` set to the payload's length, then the payload)
/// into rx segments that the caller checked are large enough. Returns the bytes written.
pub fn write_packet(mem: &GuestMemoryMmap, segs: &Segments, mut hdr: Header, payload: &[u8]) -> Result<u32, PacketError> {
    // Payloads come from the muxer's MAX_PKT_PAYLOAD buffer: packets are far below 4 GiB.
    hdr.len = u32::try_from(payload.len()).expect("a payload of at most MAX_PKT_PAYLOAD bytes");
    segs.write_at(mem, 0, &hdr.to_bytes())?;
    segs.write_at(mem, HDR_LEN as u64, payload)?;
    Ok(u32::try_from(HDR_LEN + payload.len()).expect("a header and at most MAX_PKT_PAYLOAD bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_is_little_endian() {
        let h = Header {
            src_cid: 0x0102030405060708,
            dst_cid: 2,
            src_port: 0x11223344,
            dst_port: 5,
            len: 6,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 3,
            buf_alloc: 0x40000,
            fwd_cnt: 9,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(u16::from_le_bytes([b[30], b[31]]), OP_RW);
        assert_eq!(Header::from_bytes(&b), h);
    }
}
