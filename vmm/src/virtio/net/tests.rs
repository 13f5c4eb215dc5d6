//! The device against a mock guest driver (rings in real guest memory, see
//! [`crate::virtio::testing`]) and a real tap in a network namespace of its own, whose
//! kernel stack answers the guest: an ICMP echo request the "guest" sends comes back
//! as an echo reply in its rx buffers. Needs root (`/dev/net/tun`, namespaces).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use vfvm_netlink::{create_tap, AddressSpec, Handle, MacAddr, Netns};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::testing::{Ring, TestIrq, F_NEXT, F_WRITE};
use crate::virtio::{ActiveQueue, VirtioDevice};

const QSIZE: u16 = 256;
const MEM_SIZE: usize = 48 << 20;
const RING_BASE: u64 = 0x1_0000;
const RX_AREA: u64 = 0x10_0000;
const RX_BUF: u32 = 2048;
const TX_AREA: u64 = 0x80_0000;
const TX_SLOT: u64 = 0x2_0000;
/// Pair n's buffers are n * PAIR_AREA above pair 0's.
const PAIR_AREA: u64 = 0x100_0000;
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const TAP_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// A tap in a namespace of its own, up, at TAP_IP/24 with MTU 9000, that knows the
/// guest's MAC.
struct TestTap {
    _ns: Netns,
    handle: Handle,
    files: Vec<std::fs::File>,
    mac: [u8; 6],
    index: u32,
}

fn test_tap(queues: usize) -> TestTap {
    let ns = Netns::new_anonymous().expect("a network namespace (run the tests as root)");
    let files = ns.run_in(|| create_tap("vfvmtap0", queues)).unwrap().expect("tap");
    let handle = Handle::in_netns(&ns).unwrap();
    let link = handle.link_by_name("vfvmtap0").unwrap();
    handle.add_address(link.index, &AddressSpec::new(IpAddr::V4(TAP_IP), 24)).unwrap();
    // Jumbo frames: an echo reply larger than one rx buffer, unfragmented.
    handle.set_link_mtu(link.index, 9000).unwrap();
    handle.set_link_up(link.index, true).unwrap();
    handle.add_permanent_neighbour(link.index, IpAddr::V4(GUEST_IP), MacAddr(GUEST_MAC)).unwrap();
    let mac = link.mac.expect("a tap has a MAC").0;
    TestTap { _ns: ns, handle, files, mac, index: link.index }
}

/// The driver side of one queue pair.
struct Guest {
    mem: GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    rx_kick: EventFd,
    tx_kick: EventFd,
    irq: Arc<TestIrq>,
    /// This pair's rx buffers and tx frames (pairs share guest memory, not these).
    area: u64,
    rx_posted: u16,
    rx_seen: u16,
    tx_sent: u16,
}

impl Guest {
    fn new(pair: u64) -> (Guest, ActiveQueue, ActiveQueue) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Self::on(mem, pair)
    }

    /// Pair `pair`'s rings in `mem` (pairs share guest memory, not rings or buffers).
    fn on(mem: GuestMemoryMmap, pair: u64) -> (Guest, ActiveQueue, ActiveQueue) {
        let rx = Ring::new(RING_BASE * (2 * pair + 1), QSIZE);
        let tx = Ring::new(RING_BASE * (2 * pair + 2), QSIZE);
        let kick = || EventFd::new(EFD_NONBLOCK).unwrap();
        let (rx_kick, tx_kick) = (kick(), kick());
        let index = u16::try_from(2 * pair).unwrap();
        let rxq = ActiveQueue { index, queue: rx.queue(), kick: rx_kick.try_clone().unwrap() };
        let txq = ActiveQueue { index: index + 1, queue: tx.queue(), kick: tx_kick.try_clone().unwrap() };
        let g = Guest {
            mem,
            rx,
            tx,
            rx_kick,
            tx_kick,
            irq: Arc::new(TestIrq::default()),
            area: pair * PAIR_AREA,
            rx_posted: 0,
            rx_seen: 0,
            tx_sent: 0,
        };
        (g, rxq, txq)
    }

    fn rx_buf(&self, i: u16) -> u64 {
        self.area + RX_AREA + u64::from(i) * u64::from(RX_BUF)
    }

    /// Posts `n` rx buffers of RX_BUF bytes (one descriptor each).
    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let d = self.rx_posted % QSIZE;
            self.rx.set_desc(&self.mem, d, self.rx_buf(d), RX_BUF, F_WRITE, 0);
            self.rx.publish(&self.mem, self.rx_posted, d);
            self.rx_posted = self.rx_posted.wrapping_add(1);
        }
        self.rx_kick.write(1).unwrap();
    }

    /// Sends `frame` (virtio-net header first) as a chain of two descriptors:
    /// the header, then the frame; or as given by `flags2` for the second one.
    fn send(&mut self, frame: &[u8], second_flags: u16) {
        let slot = u64::from(self.tx_sent % 64);
        let addr = self.area + TX_AREA + slot * TX_SLOT;
        self.mem.write_slice(frame, GuestAddress(addr)).unwrap();
        let d = u16::try_from(slot * 2).unwrap();
        let first = u32::try_from(HEADER_LEN).unwrap();
        let rest = u32::try_from(frame.len() - HEADER_LEN).unwrap();
        self.tx.set_desc(&self.mem, d, addr, first, F_NEXT, d + 1);
        self.tx.set_desc(&self.mem, d + 1, addr + u64::from(first), rest, second_flags, 0);
        self.tx.publish(&self.mem, self.tx_sent, d);
        self.tx_sent = self.tx_sent.wrapping_add(1);
        self.tx_kick.write(1).unwrap();
    }

    fn wait_tx_used(&self, n: u16) {
        self.irq.wait_until("tx chains used", || self.tx.used_idx(&self.mem) == n);
    }

    /// The next frame the device put in the rx ring: (num_buffers, frame without the
    /// header), read across as many buffers as it says.
    fn receive(&mut self) -> (u16, Vec<u8>) {
        let seen = self.rx_seen;
        self.irq.wait_until("an rx frame", || self.rx.used_idx(&self.mem) != seen);
        let (id, len) = self.rx.used_elem(&self.mem, self.rx_seen);
        if len == 0 {
            // A frame the device dropped gives the buffer back empty.
            self.rx_seen = self.rx_seen.wrapping_add(1);
            return (0, Vec::new());
        }
        let mut hdr = [0u8; HEADER_LEN];
        self.mem.read_slice(&mut hdr, GuestAddress(self.rx_buf(u16::try_from(id).unwrap()))).unwrap();
        let count = u16::from_le_bytes([hdr[10], hdr[11]]);
        let mut data = Vec::new();
        for k in 0..count {
            let n = self.rx_seen.wrapping_add(k);
            self.irq.wait_until("the frame's next buffer", || self.rx.used_idx(&self.mem).wrapping_sub(n).wrapping_sub(1) < 0x8000);
            let (id, len) = if k == 0 { (id, len) } else { self.rx.used_elem(&self.mem, n) };
            let mut b = vec![0u8; usize::try_from(len).unwrap()];
            self.mem.read_slice(&mut b, GuestAddress(self.rx_buf(u16::try_from(id).unwrap()))).unwrap();
            data.extend_from_slice(&b);
        }
        self.rx_seen = self.rx_seen.wrapping_add(count);
        (count, data[HEADER_LEN..].to_vec())
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}

/// An Ethernet frame with an ICMP echo request from the guest to the tap's address,
/// `payload` bytes of data, behind an all-zero virtio-net header.
fn echo_request(tap_mac: [u8; 6], id: u16, payload: usize) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend((0..payload).map(|i| u8::try_from(i % 251).unwrap()));
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = u16::try_from(20 + icmp.len()).unwrap();
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&GUEST_IP.octets());
    ip.extend_from_slice(&TAP_IP.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = vec![0u8; HEADER_LEN];
    frame.extend_from_slice(&tap_mac);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&icmp);
    frame
}

/// Whether `frame` (from Ethernet on) is the echo reply to request `id` with
/// `payload` bytes, addressed to the guest.
fn is_echo_reply(frame: &[u8], id: u16, payload: usize) -> bool {
    frame.len() == 14 + 20 + 8 + payload
        && frame[..6] == GUEST_MAC
        && frame[12..14] == [0x08, 0x00]
        && frame[14 + 9] == 1
        && frame[14 + 16..14 + 20] == GUEST_IP.octets()
        && frame[34] == 0
        && frame[38..40] == id.to_be_bytes()
}

fn device(tap: &TestTap, datapath: Datapath) -> Net {
    let taps = tap.files.iter().map(|f| Tap::from_file(f.try_clone().unwrap(), HEADER_LEN).unwrap()).collect();
    Net::new(taps, GUEST_MAC, Some(1500), datapath).unwrap()
}

const GUEST_FEATURES: u64 = VIRTIO_F_VERSION_1 | F_MAC | F_MRG_RXBUF | F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6;

#[test]
fn a_guest_pings_the_tap_and_gets_the_kernel_reply_in_its_rx_buffers() {
    let tap = test_tap(1);
    let mut net = device(&tap, Datapath::Userspace);
    assert_eq!(net.tap_name(), "vfvmtap0");
    assert_eq!(net.device_features() & (F_MQ | F_CTRL_VQ), 0, "one pair: no control queue");
    assert_eq!(net.queue_max_sizes(), &[QSIZE, QSIZE]);
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500, "the MTU");

    let (mut g, rx, tx) = Guest::new(0);
    net.activate(g.mem.clone(), g.irq.clone(), GUEST_FEATURES, vec![rx, tx]).unwrap();
    assert_eq!(net.active_datapath(), Some(Datapath::Userspace));
    g.post_rx(32);
    // Small, then larger than one rx buffer (a frame over two and three buffers).
    for (id, payload) in [(1u16, 56usize), (2, 3000), (3, 5000)] {
        g.send(&echo_request(tap.mac, id, payload), 0);
        let (count, reply) = g.receive();
        assert!(is_echo_reply(&reply, id, payload), "echo reply {id}: {:02x?}", &reply[..reply.len().min(48)]);
        let want = (HEADER_LEN + reply.len()).div_ceil(usize::try_from(RX_BUF).unwrap());
        assert_eq!(usize::from(count), want, "num_buffers of a {payload}-byte reply");
    }
    g.wait_tx_used(3);
    net.reset();
    assert_eq!(net.active_datapath(), None);
}

#[test]
fn frames_wait_for_rx_buffers_and_bad_tx_chains_are_dropped() {
    let tap = test_tap(1);
    let mut net = device(&tap, Datapath::Userspace);
    let (mut g, rx, tx) = Guest::new(0);
    net.activate(g.mem.clone(), g.irq.clone(), GUEST_FEATURES, vec![rx, tx]).unwrap();

    // A chain whose frame part is device-writable, and one longer than MAX_FRAME:
    // both used and dropped, and the device goes on.
    g.send(&echo_request(tap.mac, 10, 56), F_WRITE);
    let mut long = echo_request(tap.mac, 11, 56);
    long.resize(MAX_FRAME + 1, 0);
    g.send(&long, 0);
    g.wait_tx_used(2);

    // No rx buffers: the replies wait (in the tap and the device), then all arrive.
    for id in 20..24u16 {
        g.send(&echo_request(tap.mac, id, 100), 0);
    }
    g.wait_tx_used(6);
    assert_eq!(g.rx.used_idx(&g.mem), 0, "nothing delivered without buffers");
    g.post_rx(16);
    for id in 20..24u16 {
        let (_, reply) = g.receive();
        assert!(is_echo_reply(&reply, id, 100), "echo reply {id} after buffers came");
    }
    assert_eq!(g.rx_seen, 4, "the dropped requests got no reply");
    let stats = tap.handle.link_by_name("vfvmtap0").unwrap();
    assert_eq!(stats.index, tap.index);
}

#[test]
fn without_mergeable_buffers_a_frame_too_big_for_one_buffer_is_dropped() {
    let tap = test_tap(1);
    let mut net = device(&tap, Datapath::Userspace);
    let (mut g, rx, tx) = Guest::new(0);
    net.activate(g.mem.clone(), g.irq.clone(), GUEST_FEATURES & !F_MRG_RXBUF, vec![rx, tx]).unwrap();
    g.post_rx(8);
    g.send(&echo_request(tap.mac, 30, 3000), 0);
    g.send(&echo_request(tap.mac, 31, 100), 0);
    let (count, reply) = g.receive();
    // The big reply took one buffer back empty; the small one came whole.
    let (count, reply) = if reply.is_empty() { g.receive() } else { (count, reply) };
    assert_eq!(count, 1);
    assert!(is_echo_reply(&reply, 31, 100), "the reply that fits one buffer");
}

#[test]
fn several_queue_pairs_each_carry_frames_and_the_control_queue_sets_the_pair_count() {
    let tap = test_tap(2);
    let mut net = device(&tap, Datapath::Userspace);
    assert_ne!(net.device_features() & F_MQ, 0);
    assert_eq!(net.queue_max_sizes(), &[QSIZE, QSIZE, QSIZE, QSIZE, CTRL_QUEUE_SIZE]);
    let mut cfg = [0u8; 10];
    net.read_config(0, &mut cfg);
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 2, "max_virtqueue_pairs");

    let (mut g0, rx0, tx0) = Guest::new(0);
    let (mut g1, rx1, tx1) = Guest::on(g0.mem.clone(), 1);
    let ctrl_ring = Ring::new(RING_BASE * 5, CTRL_QUEUE_SIZE);
    let ctrl_kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let ctrl = ActiveQueue { index: 4, queue: ctrl_ring.queue(), kick: ctrl_kick.try_clone().unwrap() };
    // One interrupt sink for the whole device: the guests' waits share it.
    g1.irq = g0.irq.clone();
    net.activate(g0.mem.clone(), g0.irq.clone(), GUEST_FEATURES | F_MQ | F_CTRL_VQ, vec![rx0, tx0, rx1, tx1, ctrl]).unwrap();

    // VQ_PAIRS_SET 2 is acknowledged, 3 refused.
    let mem = &g0.mem;
    for (n, pairs) in [(0u16, 2u16), (1, 3)] {
        let base = 0x2F0_0000 + u64::from(n) * 0x100;
        let mut cmd = vec![4u8, 0];
        cmd.extend_from_slice(&pairs.to_le_bytes());
        mem.write_slice(&cmd, GuestAddress(base)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(base + 0x80)).unwrap();
        ctrl_ring.set_desc(mem, 2 * n, base, 4, F_NEXT, 2 * n + 1);
        ctrl_ring.set_desc(mem, 2 * n + 1, base + 0x80, 1, F_WRITE, 0);
        ctrl_ring.publish(mem, n, 2 * n);
        ctrl_kick.write(1).unwrap();
        g0.irq.wait_until("the control answer", || ctrl_ring.used_idx(mem) == n + 1);
        let ack: u8 = mem.read_obj(GuestAddress(base + 0x80)).unwrap();
        assert_eq!(ack, if pairs == 2 { ctrl::ACK_OK } else { ctrl::ACK_ERR }, "VQ_PAIRS_SET {pairs}");
    }

    // Each pair's tx reaches the kernel; the replies come back on some pair's rx (the
    // tap picks the queue by flow).
    g0.post_rx(16);
    g1.post_rx(16);
    g0.send(&echo_request(tap.mac, 40, 64), 0);
    g1.send(&echo_request(tap.mac, 41, 64), 0);
    g0.wait_tx_used(1);
    g1.wait_tx_used(1);
    let irq = g0.irq.clone();
    irq.wait_until("both replies", || g0.rx.used_idx(&g0.mem).wrapping_add(g1.rx.used_idx(&g1.mem)) == 2);
    let mut ids = Vec::new();
    for g in [&mut g0, &mut g1] {
        while g.rx_seen != g.rx.used_idx(&g.mem) {
            let (_, reply) = g.receive();
            ids.push(u16::from_be_bytes([reply[38], reply[39]]));
        }
    }
    ids.sort_unstable();
    assert_eq!(ids, [40, 41]);
}

#[test]
fn what_is_not_a_tap_with_virtio_net_headers_is_refused() {
    let null = std::fs::File::open("/dev/null").unwrap();
    let err = Tap::from_file(null, HEADER_LEN).unwrap_err();
    assert!(matches!(err, TapError::NotATap { .. }), "{err}");
    assert!(err.to_string().contains("not an open tap queue"), "{err}");
    let err = Tap::from_inherited_fd(987_654, HEADER_LEN).unwrap_err();
    assert!(err.to_string().contains("fd 987654"), "{err}");

    let a = test_tap(1);
    let taps = vec![Tap::from_file(a.files[0].try_clone().unwrap(), HEADER_LEN).unwrap()];
    assert!(matches!(Net::new(Vec::new(), GUEST_MAC, None, Datapath::Auto), Err(NetError::QueueCount(0))));
    assert!(matches!(Net::new(taps, GUEST_MAC, Some(20), Datapath::Auto), Err(NetError::Mtu(20))));
    assert_eq!("vhost".parse::<Datapath>(), Ok(Datapath::Vhost));
    assert!("fast".parse::<Datapath>().unwrap_err().contains("expected auto, vhost or userspace"));
}

#[test]
fn the_virtio_net_header_reaches_the_tap_so_checksum_offload_works() {
    let tap = test_tap(1);
    let mut net = device(&tap, Datapath::Userspace);
    let (mut g, rx, tx) = Guest::new(0);
    net.activate(g.mem.clone(), g.irq.clone(), GUEST_FEATURES, vec![rx, tx]).unwrap();
    g.post_rx(16);
    // An echo request with a wrong ICMP checksum is dropped by the kernel...
    let mut bad = echo_request(tap.mac, 50, 64);
    let icmp = HEADER_LEN + 14 + 20;
    bad[icmp + 2] ^= 0xff;
    g.send(&bad, 0);
    // ...unless its header says the checksum is left to the other side
    // (VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start at the ICMP header, csum_offset 2).
    let mut partial = echo_request(tap.mac, 51, 64);
    partial[icmp + 2..icmp + 4].copy_from_slice(&[0, 0]);
    partial[0] = 1;
    partial[6..8].copy_from_slice(&u16::try_from(icmp - HEADER_LEN).unwrap().to_le_bytes());
    partial[8..10].copy_from_slice(&2u16.to_le_bytes());
    g.send(&partial, 0);
    let (_, reply) = g.receive();
    assert!(is_echo_reply(&reply, 51, 64), "the reply to the request with a partial checksum, not to the bad one");
    g.wait_tx_used(2);
    assert_eq!(g.rx.used_idx(&g.mem), 1, "one reply only");
}
