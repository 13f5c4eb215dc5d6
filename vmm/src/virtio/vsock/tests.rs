//! The device against a mock guest driver (split rings in real guest memory, written
//! here from the driver's side) and real Unix sockets on the host.
//!
//! The driver side is hand-written rather than virtio-queue's `MockSplitQueue`, whose
//! layout puts the used ring over the second half of the available ring (its ring `end()`
//! counts entries as bytes), which a test that goes round the rings would trip over.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::parse_connect_line;
use super::packet::*;
use super::*;
use crate::virtio::testing::{Ring, TestIrq, DEADLINE, F_NEXT, F_WRITE};
use crate::virtio::{ActiveQueue, VirtioDevice};

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 16 << 20;
/// Rings of queue i at RING_BASE * (i + 1).
const RING_BASE: u64 = 0x1_0000;
const RX_AREA: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
const RX_DATA_OFF: u64 = 0x100;
const RX_DATA_LEN: u32 = 4096;
const TX_AREA: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x1_1000;
const TX_DATA_OFF: u64 = 0x100;
/// Chains in flight at most per queue (two descriptors each).
const SLOTS: u16 = QSIZE / 2;

/// A mock guest driver: posts rx buffers, sends tx packets, reads what the device used.
struct Guest {
    mem: GuestMemoryMmap,
    rings: [Ring; 3],
    kicks: [EventFd; 3],
    irq: Arc<TestIrq>,
    rx_posted: u16,
    rx_seen: u16,
    tx_posted: u16,
}

fn g_hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 256 * 1024,
        ..Default::default()
    }
}

impl Guest {
    /// Activates `dev` with fresh queues and returns the driver.
    fn activate(dev: &mut Vsock) -> Guest {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let rings = [0, 1, 2].map(|i| Ring::new(RING_BASE * (i + 1), QSIZE));
        let irq = Arc::new(TestIrq::default());
        let mut kicks = Vec::new();
        let queues = (0..3u16)
            .map(|i| {
                let kick = EventFd::new(EFD_NONBLOCK).unwrap();
                kicks.push(kick.try_clone().unwrap());
                ActiveQueue { index: i, queue: rings[usize::from(i)].queue(), kick }
            })
            .collect();
        dev.activate(mem.clone(), irq.clone(), VIRTIO_F_VERSION_1, queues).unwrap();
        Guest { mem, rings, kicks: kicks.try_into().map_err(|_| ()).unwrap(), irq, rx_posted: 0, rx_seen: 0, tx_posted: 0 }
    }

    /// Posts `n` rx buffers (a 44-byte header descriptor and a 4 KiB data descriptor).
    fn give_rx(&mut self, n: u16) {
        for _ in 0..n {
            assert!(self.rx_posted.wrapping_sub(self.rx_seen) < SLOTS, "test posts too many rx buffers");
            let slot = self.rx_posted % SLOTS;
            let base = RX_AREA + u64::from(slot) * RX_SLOT;
            let r = &self.rings[0];
            r.set_desc(&self.mem, 2 * slot, base, len32(HDR_LEN), F_WRITE | F_NEXT, 2 * slot + 1);
            r.set_desc(&self.mem, 2 * slot + 1, base + RX_DATA_OFF, RX_DATA_LEN, F_WRITE, 0);
            r.publish(&self.mem, self.rx_posted, 2 * slot);
            self.rx_posted = self.rx_posted.wrapping_add(1);
        }
        self.kicks[0].write(1).unwrap();
    }

    /// The next packet the device put in the rx queue, from the host.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let (h, p) = self.recv_any();
        assert_eq!(h.src_cid, HOST_CID);
        assert_eq!(h.type_, TYPE_STREAM);
        (h, p)
    }

    /// The next packet the device put in the rx queue.
    fn recv_any(&mut self) -> (Header, Vec<u8>) {
        let (ring, mem, seen) = (&self.rings[0], &self.mem, self.rx_seen);
        self.irq.wait_until("an rx packet", || ring.used_idx(mem) != seen);
        let (id, len) = ring.used_elem(mem, seen);
        self.rx_seen = seen.wrapping_add(1);
        let base = RX_AREA + u64::from(id / 2) * RX_SLOT;
        let mut hb = [0u8; HDR_LEN];
        self.mem.read_slice(&mut hb, GuestAddress(base)).unwrap();
        let h = Header::from_bytes(&hb);
        assert_eq!(len as usize, HDR_LEN + h.len as usize, "used length of {h:?}");
        let mut payload = vec![0u8; h.len as usize];
        self.mem.read_slice(&mut payload, GuestAddress(base + RX_DATA_OFF)).unwrap();
        assert_eq!(h.dst_cid, GUEST_CID);
        (h, payload)
    }

    /// The next packet, which must have op `op`.
    fn expect(&mut self, op: u16) -> (Header, Vec<u8>) {
        let (h, p) = self.recv();
        assert_eq!(h.op, op, "unexpected packet {h:?}");
        (h, p)
    }

    /// Sends a chain of raw (address, length, flags) descriptors on tx and waits until the
    /// device has used it.
    fn send_descs(&mut self, descs: &[(u64, u32, u16)]) {
        let slot = self.tx_posted % SLOTS;
        assert!(descs.len() <= 2);
        let r = &self.rings[1];
        for (i, &(addr, len, flags)) in (0u16..).zip(descs) {
            let more = usize::from(i) + 1 < descs.len();
            let flags = if more { flags | F_NEXT } else { flags };
            let idx = 2 * slot + i;
            r.set_desc(&self.mem, idx, addr, len, flags, idx + 1);
        }
        r.publish(&self.mem, self.tx_posted, 2 * slot);
        self.tx_posted = self.tx_posted.wrapping_add(1);
        self.kicks[1].write(1).unwrap();
        let (mem, want) = (&self.mem, self.tx_posted);
        self.irq.wait_until("tx used", || r.used_idx(mem) == want);
    }

    /// Sends a packet (header descriptor, then a payload descriptor if any).
    fn send(&mut self, mut h: Header, payload: &[u8]) {
        h.len = len32(payload.len());
        let base = TX_AREA + u64::from(self.tx_posted % SLOTS) * TX_SLOT;
        self.mem.write_slice(&h.to_bytes(), GuestAddress(base)).unwrap();
        if payload.is_empty() {
            self.send_descs(&[(base, len32(HDR_LEN), 0)]);
        } else {
            self.mem.write_slice(payload, GuestAddress(base + TX_DATA_OFF)).unwrap();
            self.send_descs(&[(base, len32(HDR_LEN), 0), (base + TX_DATA_OFF, len32(payload.len()), 0)]);
        }
    }

    /// Receives RW payloads (skipping credit updates) until `n` bytes came.
    fn recv_data(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < n {
            if self.rx_posted == self.rx_seen {
                self.give_rx(8);
            }
            let (h, p) = self.recv();
            match h.op {
                OP_RW => out.extend_from_slice(&p),
                OP_CREDIT_UPDATE => {}
                _ => panic!("unexpected packet {h:?} while receiving data"),
            }
        }
        assert_eq!(out.len(), n);
        out
    }
}

/// A temporary directory with the device's socket path in it.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!("vfvm-vsock-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("v.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn client(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8];
    loop {
        let n = s.read(&mut b).expect("reading a line");
        assert_eq!(n, 1, "EOF in the middle of a line: {line:?}");
        if b[0] == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(b[0]);
    }
}

/// Reads until EOF; a reset counts as closed too.
fn assert_closed(s: &mut UnixStream) {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => panic!("expected the device to close the stream, got {e}"),
        }
    }
}

fn read_exact_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..=u8::MAX).cycle().take(n).map(|i| i.wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A test length as a descriptor or header length.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap()
}

/// Host client connects to guest port `port`; the guest answers with `buf_alloc`.
/// Returns the client and the host-side port.
fn host_connect(g: &mut Guest, path: &Path, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
    let mut c = client(path);
    c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    g.give_rx(4);
    let (req, _) = g.expect(OP_REQUEST);
    assert_eq!(req.dst_port, port);
    assert!(req.src_port >= HOST_PORT_BASE);
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    let mut resp = g_hdr(OP_RESPONSE, port, req.src_port);
    resp.buf_alloc = buf_alloc;
    g.send(resp, &[]);
    assert_eq!(read_line(&mut c), format!("OK {}", req.src_port));
    (c, req.src_port)
}

#[test]
fn connect_line_parsing() {
    assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect_line(b"connect 4294967295"), Some(u32::MAX));
    assert_eq!(parse_connect_line(b"Connect 7\r"), Some(7));
    assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
    assert_eq!(parse_connect_line(b"CONNECT -1"), None);
    assert_eq!(parse_connect_line(b"CONNECT +1"), None);
    assert_eq!(parse_connect_line(b"CONNECT"), None);
    assert_eq!(parse_connect_line(b"CONNECT 1 2"), None);
    assert_eq!(parse_connect_line(b"OPEN 1"), None);
    assert_eq!(guest_port_path(Path::new("/run/v.sock"), 1024), PathBuf::from("/run/v.sock_1024"));
}

#[test]
fn construction_checks_cid_and_path_and_config_space() {
    let d = TempDir::new();
    assert!(matches!(Vsock::new(2, d.sock()), Err(VsockError::InvalidCid(2))));
    assert!(matches!(Vsock::new(u64::from(u32::MAX), d.sock()), Err(VsockError::InvalidCid(_))));
    let dev = Vsock::new(0x1234_5678, d.sock()).unwrap();
    assert_eq!(dev.uds_path(), d.sock());
    let e = Vsock::new(5, d.sock()).err().expect("path in use");
    assert!(e.to_string().contains(d.sock().to_str().unwrap()), "{e}");

    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    assert_eq!(dev.device_features(), VIRTIO_F_VERSION_1);
    let mut cfg = [0xffu8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [0x78, 0x56, 0x34, 0x12, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut hi = [0xffu8; 4];
    dev.read_config(2, &mut hi);
    assert_eq!(hi, [0x34, 0x12, 0, 0]);
    dev.read_config(u64::MAX, &mut hi);
    assert_eq!(hi, [0; 4]);
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let d = TempDir::new();
    let mut dev = Vsock::new(GUEST_CID, d.sock()).unwrap();
    // Connected before the driver is up: waits in the backlog.
    let mut c = client(&d.sock());
    // Data right behind the line must not be eaten with it.
    c.write_all(b"CONNECT 1234\nearly").unwrap();
    let mut g = Guest::activate(&mut dev);
    g.give_rx(8);
    let (req, _) = g.expect(OP_REQUEST);
    assert_eq!(req.dst_port, 1234);
    let hp = req.src_port;
    assert!(hp >= HOST_PORT_BASE);
    g.send(g_hdr(OP_RESPONSE, 1234, hp), &[]);
    assert_eq!(read_line(&mut c), format!("OK {hp}"));
    assert_eq!(g.recv_data(5), b"early");

    // host -> guest, more than one rx buffer's worth
    let big = pattern(20_000, 1);
    c.write_all(&big).unwrap();
    assert_eq!(g.recv_data(big.len()), big);

    // guest -> host
    let msg = pattern(3000, 7);
    g.send(g_hdr(OP_RW, 1234, hp), &msg);
    g.send(g_hdr(OP_RW, 1234, hp), b"tail");
    assert_eq!(read_exact_n(&mut c, 3000), msg);
    assert_eq!(read_exact_n(&mut c, 4), b"tail");

    // A second client gets another host port.
    let (_c2, hp2) = host_connect(&mut g, &d.sock(), 1234, 65536);
    assert_ne!(hp2, hp);

    // Host closes: the guest is told SHUTDOWN, answers RST.
    drop(c);
    g.give_rx(4);
    let (sd, _) = g.expect(OP_SHUTDOWN);
    assert_eq!(sd.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert_eq!((sd.src_port, sd.dst_port), (hp, 1234));
    g.send(g_hdr(OP_RST, 1234, hp), &[]);
    // The connection is gone: more data for it gets RST back.
    g.send(g_hdr(OP_RW, 1234, hp), b"late");
    let (rst, _) = g.expect(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (hp, 1234));
}

#[test]
fn guest_initiated_connection_and_shutdown() {
    let d = TempDir::new();
    let mut dev = Vsock::new(GUEST_CID, d.sock()).unwrap();
    let listener = UnixListener::bind(guest_port_path(&d.sock(), 5000)).unwrap();
    let mut g = Guest::activate(&mut dev);
    g.give_rx(8);
    g.send(g_hdr(OP_REQUEST, 40000, 5000), &[]);
    let (resp, _) = g.expect(OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5000, 40000));
    assert_eq!(resp.buf_alloc, BUF_ALLOC);
    let (mut h, _) = listener.accept().unwrap();
    h.set_read_timeout(Some(DEADLINE)).unwrap();

    let up = pattern(70_000, 3);
    for chunk in up.chunks(30_000) {
        g.send(g_hdr(OP_RW, 40000, 5000), chunk);
    }
    assert_eq!(read_exact_n(&mut h, up.len()), up);

    let down = pattern(9000, 9);
    h.write_all(&down).unwrap();
    assert_eq!(g.recv_data(down.len()), down);

    // Guest closes its side: the host reads EOF after the data; then the host closes and
    // the device sends SHUTDOWN and RST (both sides done).
    g.send(g_hdr(OP_RW, 40000, 5000), b"bye");
    let mut sd = g_hdr(OP_SHUTDOWN, 40000, 5000);
    sd.flags = SHUTDOWN_SEND;
    g.send(sd, &[]);
    let mut rest = Vec::new();
    h.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    drop(h);
    g.give_rx(4);
    g.expect(OP_SHUTDOWN);
    let (rst, _) = g.expect(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (5000, 40000));

    // A full guest shutdown is answered with RST right away.
    g.send(g_hdr(OP_REQUEST, 40001, 5000), &[]);
    g.expect(OP_RESPONSE);
    let (mut h2, _) = listener.accept().unwrap();
    h2.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut sd = g_hdr(OP_SHUTDOWN, 40001, 5000);
    sd.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    g.send(sd, &[]);
    g.expect(OP_RST);
    assert_closed(&mut h2);
}

#[test]
fn guest_connect_to_nobody_is_reset() {
    let d = TempDir::new();
    let mut dev = Vsock::new(GUEST_CID, d.sock()).unwrap();
    let mut g = Guest::activate(&mut dev);
    g.give_rx(4);
    g.send(g_hdr(OP_REQUEST, 40000, 6000), &[]);
    let (rst, _) = g.expect(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (6000, 40000));
    // Not to the host CID, and a non-stream type: RST as well.
    let mut h = g_hdr(OP_REQUEST, 40001, 6000);
    h.dst_cid = 7;
    g.send(h, &[]);
    let (rst, _) = g.recv_any();
    assert_eq!((rst.op, rst.src_cid, rst.dst_port), (OP_RST, 7, 40001));
    let mut h = g_hdr(OP_REQUEST, 40002, 6000);
    h.type_ = 2;
    g.send(h, &[]);
    let (rst, _) = g.recv_any();
    assert_eq!((rst.op, rst.dst_port, rst.type_), (OP_RST, 40002, 2));
}

#[test]
fn host_connect_refused_by_guest_closes_client() {
    let d = TempDir::new();
    let mut dev = Vsock::new(GUEST_CID, d.sock()).unwrap();
    let mut g = Guest::activate(&mut dev);
    let mut c = client(&d.sock());
    c.write_all(b"connect 99\n").unwrap();
    g.give_rx(4);
    let (req, _) = g.expect(OP_REQUEST);
    g.send(g_hdr(OP_RST, 99, req.src_port), &[]);
    assert_closed(&mut c);
}

#[test]
fn bad_connect_lines_close_the_client() {
    let d = TempDir::new();
    let mut dev = Vsock::new(GUEST_CID, d.sock()).unwrap();
    let mut g = Guest::activate(&mut dev);
    for line in [&b"HELLO 5\n"[..], b"CONNECT x\n", b"CONNECT 99999999999\n", &[b'A'; 40], b"CONNECT 1 2\n"] {
        let mut c = client(&d.sock());
        c.write_all(line).unwrap();
        assert_closed(&mut c);
    }
    // None of them reached the guest; a good one still works.
    host_connect(&mut g, &d.sock(), 5, 65536);
}

#[test]
fn guest_beyond_credit_is_reset() {
    let d = TempDir::new();
    let mut dev = Vsock::new(GUEST_CID, d.sock()).unwrap();
    let listener = UnixListener::bind(guest_port_path(&d.sock(), 5001)).unwrap();
    let mut g = Guest::activate(&mut dev);
    g.give_rx(100);
    g.send(g_hdr(OP_REQUEST, 41000, 5001), &[]);
    g.expect(OP_RESPONSE);
    // The host accepts but never reads.
    let (_h, _) = listener.accept().unwrap();
    let chunk = vec![0x5a; MAX_PKT_PAYLOAD];
    let mut reset = false;
    for _ in 0..64 {
        g.send(g_hdr(OP_RW, 41000, 5001), &chunk);
        // Drain what the device said so far (credit updates, then the RST).
        while g.rings[0].used_idx(&g.mem) != g.rx_seen {
            let (h, _) = g.recv();
            match h.op {
                OP_CREDIT_UPDATE => {}
                OP_RST => reset = true,
                _ => panic!("unexpected {h:?}"),
            }
        }
        if reset {
            break;
        }
    }
    assert!(reset, "4 MiB beyond credit and no RST");
}

/// SIOCOUTQ on a Unix stream: bytes sent and not yet read by the peer.
fn outq(s: &UnixStream) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(rc, 0);
    n
}

#[test]
fn host_data_waits_for_guest_credit() {
    let d = TempDir::new();
    let mut dev = Vsock::new(GUEST_CID, d.sock()).unwrap();
    let mut g = Guest::activate(&mut dev);
    // Not a multiple of the rx buffer size: the last packet of a window is cut to fit.
    const CREDIT: u32 = 6000;
    let (mut c, hp) = host_connect(&mut g, &d.sock(), 77, CREDIT);
    let data = pattern(40_000, 5);
    c.write_all(&data).unwrap();
    g.give_rx(20);

    let mut got = Vec::new();
    let mut fwd = 0u32;
    while got.len() < data.len() {
        // Exactly the credit arrives, then a credit request, then nothing more.
        let window = got.len() + (CREDIT as usize).min(data.len() - got.len());
        while got.len() < window {
            let (h, p) = g.expect(OP_RW);
            got.extend_from_slice(&p);
            assert!(got.len() <= window, "the device overran the guest's credit");
            let _ = h;
        }
        if got.len() == data.len() {
            break;
        }
        g.expect(OP_CREDIT_REQUEST);
        // A ping: the answer comes next, no data before it; the rest is still unread.
        let mut ping = g_hdr(OP_CREDIT_REQUEST, 77, hp);
        ping.buf_alloc = CREDIT;
        ping.fwd_cnt = fwd;
        g.send(ping, &[]);
        let (u, _) = g.expect(OP_CREDIT_UPDATE);
        assert_eq!(u.buf_alloc, BUF_ALLOC);
        assert!(outq(&c) > 0, "the device read host data it could not place");
        if g.rx_posted.wrapping_sub(g.rx_seen) < 20 {
            g.give_rx(20);
        }
        // The guest's application consumed it all: new credit.
        fwd = len32(got.len());
        let mut upd = g_hdr(OP_CREDIT_UPDATE, 77, hp);
        upd.buf_alloc = CREDIT;
        upd.fwd_cnt = fwd;
        g.send(upd, &[]);
    }
    assert!(fwd > 0);
    assert_eq!(got, data);
}

#[test]
fn malformed_tx_packets_are_dropped() {
    let d = TempDir::new();
    let mut dev = Vsock::new(GUEST_CID, d.sock()).unwrap();
    let mut g = Guest::activate(&mut dev);
    g.give_rx(4);
    let base = TX_AREA;
    // Short header.
    g.send_descs(&[(base, 20, 0)]);
    // Length beyond the chain.
    let mut h = g_hdr(OP_RW, 1, 2);
    h.len = 100;
    g.mem.write_slice(&h.to_bytes(), GuestAddress(base)).unwrap();
    g.send_descs(&[(base, len32(HDR_LEN), 0), (base + 0x100, 10, 0)]);
    // Length over the maximum.
    h.len = len32(MAX_PKT_PAYLOAD) + 1;
    g.mem.write_slice(&h.to_bytes(), GuestAddress(base)).unwrap();
    g.send_descs(&[(base, len32(HDR_LEN), 0), (base + 0x100, h.len, 0)]);
    // Outside guest memory.
    g.send_descs(&[(MEM_SIZE as u64 - 8, len32(HDR_LEN), 0)]);
    // Only device-writable descriptors.
    g.send_descs(&[(base, len32(HDR_LEN), F_WRITE)]);
    // A wrong source CID is dropped too.
    let mut h = g_hdr(OP_REQUEST, 1, 2);
    h.src_cid = 9;
    g.send(h, &[]);
    assert_eq!(g.rings[0].used_idx(&g.mem), 0, "nothing was answered");
    // The device is still alive.
    g.send(g_hdr(OP_REQUEST, 40000, 6000), &[]);
    g.expect(OP_RST);
}

#[test]
fn reset_stops_the_worker_and_drop_unlinks_the_socket() {
    let d = TempDir::new();
    let mut dev = Vsock::new(GUEST_CID, d.sock()).unwrap();
    let mut g = Guest::activate(&mut dev);
    let (mut c, _) = host_connect(&mut g, &d.sock(), 1, 65536);
    assert!(dev.is_active());
    dev.reset();
    assert!(!dev.is_active());
    // The worker is gone and its connections with it.
    assert_closed(&mut c);

    // Clients connecting while reset wait in the backlog for the next activation.
    let mut c2 = client(&d.sock());
    c2.write_all(b"CONNECT 2\n").unwrap();
    let mut g = Guest::activate(&mut dev);
    g.give_rx(4);
    let (req, _) = g.expect(OP_REQUEST);
    assert_eq!(req.dst_port, 2);
    g.send(g_hdr(OP_RESPONSE, 2, req.src_port), &[]);
    assert_eq!(read_line(&mut c2), format!("OK {}", req.src_port));

    drop(dev);
    assert_closed(&mut c2);
    assert!(d.sock().symlink_metadata().is_err(), "socket file left behind");
    assert!(UnixStream::connect(d.sock()).is_err());
}

#[test]
fn bounded_waits_expire() {
    let d = TempDir::new();
    let mut dev = Vsock::new(GUEST_CID, d.sock()).unwrap();
    let short = Duration::from_millis(200);
    dev.set_timeouts(muxer::Timeouts { connect_line: short, guest_answer: short, shutdown: short });
    let mut g = Guest::activate(&mut dev);

    // A CONNECT line that never ends.
    let started = Instant::now();
    let mut c = client(&d.sock());
    c.write_all(b"CONNECT 12").unwrap();
    assert_closed(&mut c);
    assert!(started.elapsed() >= short);

    // A guest that never answers the REQUEST: RST to it, and the client is closed.
    let mut c = client(&d.sock());
    c.write_all(b"CONNECT 12\n").unwrap();
    g.give_rx(4);
    let (req, _) = g.expect(OP_REQUEST);
    let (rst, _) = g.expect(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 12));
    assert_closed(&mut c);

    // A guest that never answers our SHUTDOWN: RST.
    let (c, hp) = host_connect(&mut g, &d.sock(), 13, 65536);
    drop(c);
    g.expect(OP_SHUTDOWN);
    let (rst, _) = g.expect(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (hp, 13));
}

#[test]
fn concurrent_streams_stay_apart() {
    let d = TempDir::new();
    let mut dev = Vsock::new(GUEST_CID, d.sock()).unwrap();
    let listener = UnixListener::bind(guest_port_path(&d.sock(), 7000)).unwrap();
    let mut g = Guest::activate(&mut dev);
    g.give_rx(16);
    const N: u32 = 6;
    const LEN: usize = 30_000;
    let mut hosts = Vec::new();
    for i in 0..N {
        g.send(g_hdr(OP_REQUEST, 50000 + i, 7000), &[]);
        let (r, _) = g.expect(OP_RESPONSE);
        assert_eq!(r.dst_port, 50000 + i);
        let (h, _) = listener.accept().unwrap();
        h.set_read_timeout(Some(DEADLINE)).unwrap();
        hosts.push(h);
    }
    // Host-initiated ones beside them.
    for i in 0..N {
        let (c, hp) = host_connect(&mut g, &d.sock(), 8000 + i, 256 * 1024);
        assert!(hp >= HOST_PORT_BASE);
        hosts.push(c);
    }
    // Every host stream writes its own pattern at once; the guest demultiplexes by port.
    for (i, h) in (0u8..).zip(hosts.iter_mut()) {
        h.write_all(&pattern(LEN, i)).unwrap();
    }
    let mut got: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut total = 0;
    while total < LEN * hosts.len() {
        if g.rx_posted == g.rx_seen {
            g.give_rx(16);
        }
        let (h, p) = g.recv();
        match h.op {
            OP_RW => {
                total += p.len();
                got.entry(h.dst_port).or_default().extend_from_slice(&p);
            }
            OP_CREDIT_UPDATE => {}
            _ => panic!("unexpected {h:?}"),
        }
    }
    for i in 0..N {
        assert_eq!(got[&(50000 + i)], pattern(LEN, u8::try_from(i).unwrap()), "guest stream {i}");
        assert_eq!(got[&(8000 + i)], pattern(LEN, u8::try_from(i + N).unwrap()), "host stream {i}");
    }
    // And guest -> host, interleaved.
    for round in 0..3u8 {
        for i in 0..N {
            g.send(g_hdr(OP_RW, 50000 + i, 7000), &[round, u8::try_from(i).unwrap()]);
        }
    }
    for (i, h) in (0u8..).zip(hosts.iter_mut().take(N as usize)) {
        assert_eq!(read_exact_n(h, 6), [0, i, 1, i, 2, i]);
    }
}
