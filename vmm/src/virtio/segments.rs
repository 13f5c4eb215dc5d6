//! A descriptor chain's buffers in guest memory, one direction at a time, read and
//! written as one byte range.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// A chain's buffers do not cover the range asked for, or point outside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the chain points outside guest memory or is shorter than the range")]
pub struct OutsideMemory;

/// Guest memory segments (address, length) of a descriptor chain, one direction.
#[derive(Debug, Default)]
pub struct Segments {
    segs: Vec<(GuestAddress, u32)>,
    total: u64,
}

impl Segments {
    /// Collects the device-readable (`writable == false`) or device-writable descriptors.
    pub fn collect<I>(descs: I, writable: bool) -> Self
    where
        I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let mut s = Segments::default();
        for d in descs {
            if d.is_write_only() == writable && d.len() > 0 {
                s.segs.push((d.addr(), d.len()));
                s.total += u64::from(d.len());
            }
        }
        s
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Reads `buf.len()` bytes starting `offset` bytes into the segments.
    pub fn read_at(&self, mem: &GuestMemoryMmap, offset: u64, buf: &mut [u8]) -> Result<(), OutsideMemory> {
        self.each_piece(offset, buf.len(), |addr, at, n| mem.read_slice(&mut buf[at..at + n], addr).map_err(|_| OutsideMemory))
    }

    /// Writes `data` starting `offset` bytes into the segments.
    pub fn write_at(&self, mem: &GuestMemoryMmap, offset: u64, data: &[u8]) -> Result<(), OutsideMemory> {
        self.each_piece(offset, data.len(), |addr, at, n| mem.write_slice(&data[at..at + n], addr).map_err(|_| OutsideMemory))
    }

    /// Splits the range of `len` bytes starting `offset` bytes into the segments into
    /// its pieces in guest memory: `piece(address, position in the range, length)`
    /// for each, in order. Fails if the segments end before the range does.
    fn each_piece(
        &self,
        mut offset: u64,
        len: usize,
        mut piece: impl FnMut(GuestAddress, usize, usize) -> Result<(), OutsideMemory>,
    ) -> Result<(), OutsideMemory> {
        let mut done = 0usize;
        for &(addr, seg_len) in &self.segs {
            if done == len {
                break;
            }
            let seg_len = u64::from(seg_len);
            if offset >= seg_len {
                offset -= seg_len;
                continue;
            }
            let n = usize::try_from(seg_len - offset).unwrap_or(usize::MAX).min(len - done);
            piece(addr.checked_add(offset).ok_or(OutsideMemory)?, done, n)?;
            done += n;
            offset = 0;
        }
        if done == len {
            Ok(())
        } else {
            Err(OutsideMemory)
        }
    }
}
