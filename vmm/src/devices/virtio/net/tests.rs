//! The queue logic against guest memory and a `SOCK_SEQPACKET` socket
//! standing in for the TAP (one frame per message, as a TAP), without KVM:
//! frames both ways, and each way a hostile driver can shape a chain.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_net::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::{Interrupt, Memory, VirtioDevice};

const MEM_SIZE: u64 = 4 << 20;
const RX_BUF: u64 = 0x10_0000;
const TX_BUF: u64 = 0x20_0000;

/// A descriptor the test driver offers: address, length, device-writable.
type Buf = (u64, u32, bool);

fn memory() -> Memory {
    Memory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// A connected pair of non-blocking `SOCK_SEQPACKET` sockets.
fn frame_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both were just created and are owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A frame with its header: `len` bytes after it, each saying where it is.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed));
    f
}

struct Rig<'a> {
    rx: MockSplitQueue<'a, Memory>,
    tx: MockSplitQueue<'a, Memory>,
    rx_next: u16,
    tx_next: u16,
    dev: Net,
    peer: Tap,
    irqfd: EventFd,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a Memory) -> Self {
        Self::with(mem, libc::TUN_F_CSUM, Some([0x02, 0, 0, 0, 0, 1]), 0)
    }

    fn with(mem: &'a Memory, offloads: u32, mac: Option<[u8; 6]>, acked: u64) -> Self {
        let (ours, theirs) = frame_pair();
        let rx = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x4_0000), QUEUE_SIZE);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irqfd.try_clone().unwrap()));
        let mut dev = Net::new(Tap::from_fd(ours, offloads), mac).unwrap();
        dev.set_acked_features(acked);
        let queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        dev.activate(mem.clone(), queues, interrupt).unwrap();
        Rig {
            rx,
            tx,
            rx_next: 0,
            tx_next: 0,
            dev,
            peer: Tap::from_fd(theirs, 0),
            irqfd,
        }
    }

    fn chain(start: u16, bufs: &[Buf]) -> Vec<RawDescriptor> {
        bufs.iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                let last = i + 1 == bufs.len();
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { start + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect()
    }

    fn offer_tx(&mut self, bufs: &[Buf]) {
        let descs = Self::chain(self.tx_next, bufs);
        self.offer_tx_raw(&descs);
    }

    fn offer_tx_raw(&mut self, descs: &[RawDescriptor]) {
        self.tx.add_desc_chains(descs, self.tx_next).unwrap();
        self.tx_next += descs.len() as u16;
    }

    fn offer_rx(&mut self, bufs: &[Buf]) {
        let descs = Self::chain(self.rx_next, bufs);
        self.rx.add_desc_chains(&descs, self.rx_next).unwrap();
        self.rx_next += descs.len() as u16;
    }

    /// The used ring entry `i` of a queue: (head, len).
    fn used(vq: &MockSplitQueue<'a, Memory>, i: u16) -> (u32, u32) {
        let e = vq.used().ring().ref_at(usize::from(i)).unwrap().load();
        (e.id(), e.len())
    }

    fn peer_frames(&self) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME + 16];
        while let Ok(n) = self.peer.read_frame(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }
}

#[test]
fn a_guest_frame_in_pieces_reaches_the_tap_as_one() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let f = frame(1500, 1);
    // Header alone, then the frame split over two buffers.
    mem.write_slice(&f[..VNET_HDR_LEN], GuestAddress(TX_BUF))
        .unwrap();
    mem.write_slice(&f[VNET_HDR_LEN..800], GuestAddress(TX_BUF + 0x1000))
        .unwrap();
    mem.write_slice(&f[800..], GuestAddress(TX_BUF + 0x2000))
        .unwrap();
    rig.offer_tx(&[
        (TX_BUF, VNET_HDR_LEN as u32, false),
        (TX_BUF + 0x1000, (800 - VNET_HDR_LEN) as u32, false),
        (TX_BUF + 0x2000, (f.len() - 800) as u32, false),
    ]);
    assert_eq!(rig.dev.process_tx(), 1);
    assert_eq!(rig.peer_frames(), vec![f]);
    assert_eq!(rig.tx.used().idx().load(), 1);
    assert_eq!(Rig::used(&rig.tx, 0), (0, 0));
    assert_eq!(rig.irqfd.read().unwrap(), 1);
    let c = rig.dev.counters();
    assert_eq!((c.tx_packets, c.tx_bytes, c.tx_dropped), (1, 1500, 0));
    assert_eq!(rig.dev.process_tx(), 0, "nothing more pending");
}

#[test]
fn a_tap_frame_fills_a_guest_buffer_with_num_buffers_one() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let f = frame(60, 2);
    rig.peer.write_frame(&f).unwrap();
    // Two buffers: the frame spans both.
    rig.offer_rx(&[(RX_BUF, 40, true), (RX_BUF + 0x1000, 4096, true)]);
    assert_eq!(rig.dev.process_rx(), 1);
    assert_eq!(Rig::used(&rig.rx, 0), (0, f.len() as u32));
    let mut got = vec![0u8; f.len()];
    mem.read_slice(&mut got[..40], GuestAddress(RX_BUF))
        .unwrap();
    mem.read_slice(&mut got[40..], GuestAddress(RX_BUF + 0x1000))
        .unwrap();
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[12..], &f[12..]);
    assert_eq!(rig.irqfd.read().unwrap(), 1);
    let c = rig.dev.counters();
    assert_eq!((c.rx_packets, c.rx_bytes, c.rx_dropped), (1, 60, 0));
}

#[test]
fn a_frame_waits_for_the_guest_to_post_buffers() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.peer.write_frame(&frame(100, 3)).unwrap();
    rig.peer.write_frame(&frame(200, 4)).unwrap();
    assert_eq!(rig.dev.process_rx(), 0, "no buffers yet");
    assert!(
        rig.irqfd.read().is_err(),
        "no interrupt without a used buffer"
    );
    rig.offer_rx(&[(RX_BUF, 4096, true)]);
    assert_eq!(rig.dev.process_rx(), 1);
    assert_eq!(Rig::used(&rig.rx, 0).1, 112);
    rig.offer_rx(&[(RX_BUF + 0x1000, 4096, true)]);
    assert_eq!(rig.dev.process_rx(), 1);
    assert_eq!(Rig::used(&rig.rx, 1).1, 212);
    assert_eq!(rig.dev.counters().rx_packets, 2);
}

#[test]
fn malformed_receive_chains_drop_their_frame_only() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    for seed in 0..4 {
        rig.peer.write_frame(&frame(1000, seed)).unwrap();
    }
    // Too small for the frame; read-only; outside guest memory; then good.
    rig.offer_rx(&[(RX_BUF, 512, true)]);
    rig.offer_rx(&[(RX_BUF, 4096, false)]);
    rig.offer_rx(&[(MEM_SIZE - 100, 4096, true)]);
    rig.offer_rx(&[(RX_BUF + 0x2000, 4096, true)]);
    assert_eq!(rig.dev.process_rx(), 4);
    let lens: Vec<u32> = (0..4).map(|i| Rig::used(&rig.rx, i).1).collect();
    assert_eq!(lens, [0, 0, 0, 1012]);
    let mut got = vec![0u8; 1012];
    mem.read_slice(&mut got, GuestAddress(RX_BUF + 0x2000))
        .unwrap();
    assert_eq!(&got[12..], &frame(1000, 3)[12..]);
    let c = rig.dev.counters();
    assert_eq!((c.rx_packets, c.rx_dropped), (1, 3));
}

#[test]
fn runt_frames_from_the_tap_are_dropped() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.peer.write_frame(&[0u8; 5]).unwrap();
    rig.peer.write_frame(&frame(60, 9)).unwrap();
    rig.offer_rx(&[(RX_BUF, 4096, true)]);
    assert_eq!(rig.dev.process_rx(), 1);
    assert_eq!(Rig::used(&rig.rx, 0).1, 72);
    assert_eq!(rig.dev.counters().rx_dropped, 1);
}

#[test]
fn runts_are_dropped_and_counted_against_the_batch() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let rx_evt = rig.dev.queue_events()[0].try_clone().unwrap();
    let _ = rx_evt.read();
    // As many as the socket queues (net.unix.max_dgram_qlen, often only
    // 10): past a batch, the rest wait for the re-armed event.
    let mut sent = 0;
    while sent < BATCH_LIMIT + 10 && rig.peer.write_frame(&[0u8; 4]).is_ok() {
        sent += 1;
    }
    assert_eq!(rig.dev.process_rx(), 0);
    let dropped = rig.dev.counters().rx_dropped;
    assert_eq!(dropped as usize, sent.min(BATCH_LIMIT));
    if sent > BATCH_LIMIT {
        assert_eq!(rx_evt.read().unwrap(), 1, "the rest re-armed");
    }
}

#[test]
fn malformed_transmit_chains_are_dropped_and_returned() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let f = frame(100, 5);
    mem.write_slice(&f, GuestAddress(TX_BUF)).unwrap();
    let len = f.len() as u32;
    // Device-writable; outside guest memory; over the largest frame;
    // shorter than an Ethernet header.
    rig.offer_tx(&[(TX_BUF, len, true)]);
    rig.offer_tx(&[(MEM_SIZE - 16, len, false)]);
    rig.offer_tx(&[(TX_BUF, MAX_FRAME as u32 + 1, false)]);
    rig.offer_tx(&[(TX_BUF, MIN_FRAME as u32 - 1, false)]);
    rig.offer_tx(&[(TX_BUF, 40_000, false), (TX_BUF, 40_000, false)]);
    // A chain whose next index is past the descriptor table.
    let d = rig.tx_next;
    rig.offer_tx_raw(&[RawDescriptor::from(SplitDescriptor::new(
        TX_BUF,
        len,
        VRING_DESC_F_NEXT as u16,
        QUEUE_SIZE + 5,
    ))]);
    // A descriptor that loops to itself.
    let d2 = d + 1;
    rig.offer_tx_raw(&[RawDescriptor::from(SplitDescriptor::new(
        TX_BUF,
        64,
        VRING_DESC_F_NEXT as u16,
        d2,
    ))]);
    // And a good one, which still goes out.
    rig.offer_tx(&[(TX_BUF, len, false)]);
    assert_eq!(rig.dev.process_tx(), 8);
    assert_eq!(rig.peer_frames(), vec![f]);
    let c = rig.dev.counters();
    assert_eq!((c.tx_packets, c.tx_dropped), (1, 7));
    assert_eq!(rig.tx.used().idx().load(), 8);
}

#[test]
fn an_avail_index_far_ahead_does_not_spin() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.offer_tx(&[(TX_BUF, 100, false)]);
    rig.tx.avail().idx().store(QUEUE_SIZE * 3);
    // Returns: whatever it takes, it does not loop forever.
    let served = rig.dev.process_tx();
    assert!(served <= BATCH_LIMIT);
    rig.rx.avail().idx().store(QUEUE_SIZE * 3);
    rig.peer.write_frame(&frame(100, 1)).unwrap();
    assert!(rig.dev.process_rx() <= BATCH_LIMIT);
}

#[test]
fn more_frames_than_buffers_fill_the_queue_and_wait() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let mut sent = 0;
    while sent < usize::from(QUEUE_SIZE) + 10 && rig.peer.write_frame(&frame(60, 0)).is_ok() {
        sent += 1;
    }
    for i in 0..u64::from(QUEUE_SIZE) {
        rig.offer_rx(&[(RX_BUF + i * 128, 128, true)]);
    }
    let served = rig.dev.process_rx();
    assert_eq!(served, sent.min(usize::from(QUEUE_SIZE)));
    assert_eq!(rig.irqfd.read().unwrap(), 1, "one interrupt for the pass");
    assert_eq!(rig.dev.process_rx(), 0, "the rest wait for buffers");
}

#[test]
fn offloads_follow_what_both_sides_accept() {
    let mem = memory();
    let bit = |b: u32| 1u64 << b;
    // A TAP with checksum and TSO, a driver that takes checksums only.
    let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    let acked = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_MAC);
    let mut rig = Rig::with(&mem, offloads, None, acked);
    let f = rig.dev.avail_features();
    for b in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
    ] {
        assert_ne!(f & bit(b), 0, "feature {b}");
    }
    assert_eq!(f & bit(VIRTIO_NET_F_MAC), 0, "no MAC configured");
    // Applied on the event loop's thread, at the next rx pass.
    assert_eq!(rig.dev.tap().current_offloads(), 0);
    rig.dev.process_rx();
    assert_eq!(rig.dev.tap().current_offloads(), libc::TUN_F_CSUM);
    // A TAP without offloads offers none, and a driver claiming them
    // anyway gets none.
    let mut rig = Rig::with(&mem, 0, None, bit(VIRTIO_NET_F_GUEST_CSUM));
    rig.dev.process_rx();
    assert_eq!(rig.dev.tap().current_offloads(), 0);
    assert_eq!(
        rig.dev.avail_features() & (bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM)),
        0
    );
}

#[test]
fn the_mac_is_in_config_space() {
    let mem = memory();
    let rig = Rig::new(&mem);
    assert_ne!(rig.dev.avail_features() & (1 << VIRTIO_NET_F_MAC), 0);
    let mut mac = [0u8; 6];
    rig.dev.read_config(0, &mut mac);
    assert_eq!(mac, [0x02, 0, 0, 0, 0, 1]);
    let mut past = [0xffu8; 4];
    rig.dev.read_config(4, &mut past);
    assert_eq!(past, [0, 1, 0, 0]);
}

#[test]
fn macs_parse_strictly() {
    assert_eq!(
        parse_mac("02:aB:00:11:22:ff"),
        Some([0x02, 0xab, 0, 0x11, 0x22, 0xff])
    );
    for bad in [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:00:00",
        "02:00:00:00:00:0g",
        "2:00:00:00:00:00",
        "02-00-00-00-00-00",
        "01:00:5e:00:00:01",
        "ff:ff:ff:ff:ff:ff",
        "+2:00:00:00:00:00",
    ] {
        assert_eq!(parse_mac(bad), None, "{bad:?}");
    }
}

#[test]
fn an_inactive_or_reset_device_serves_nothing() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.peer.write_frame(&frame(60, 0)).unwrap();
    rig.dev.reset();
    assert_eq!(rig.dev.process_rx(), 0);
    assert_eq!(rig.dev.process_tx(), 0);
}

/// Frames between the guest's queues and an `AF_PACKET` socket on a real
/// TAP, in a network namespace this test's thread makes (root only; the
/// TAP goes with the namespace when the thread ends).
#[test]
fn frames_cross_a_real_tap_in_a_private_namespace() {
    let outcome = std::thread::spawn(|| {
        // SAFETY: unshare affects only this thread, which the test owns.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("unshare: {}", std::io::Error::last_os_error()));
        }
        let tap = Tap::open("kiln-test0").map_err(|e| format!("{e:#?}"))?;
        real_tap_exchange(tap);
        Ok(())
    })
    .join()
    .unwrap();
    if let Err(why) = outcome {
        eprintln!("skipped: no TAP here ({why})");
    }
}

fn real_tap_exchange(tap: Tap) {
    assert_ne!(tap.supported_offloads() & libc::TUN_F_CSUM, 0);
    assert_eq!(tap.current_offloads(), 0, "none until the driver accepts");
    // SAFETY: plain socket calls on descriptors this function owns; every
    // pointer passed is to a local of the size given.
    unsafe {
        let ctl = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(ctl >= 0);
        let mut req = [0u8; 40];
        req[..10].copy_from_slice(b"kiln-test0");
        let flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        assert_eq!(libc::ioctl(ctl, libc::SIOCSIFFLAGS, req.as_mut_ptr()), 0);
        assert_eq!(libc::ioctl(ctl, libc::SIOCGIFINDEX, req.as_mut_ptr()), 0);
        let index = i32::from_ne_bytes([req[16], req[17], req[18], req[19]]);
        libc::close(ctl);

        let proto = (libc::ETH_P_ALL as u16).to_be();
        let pkt = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        );
        assert!(pkt >= 0);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index;
        let sll_len = size_of::<libc::sockaddr_ll>() as u32;
        assert_eq!(
            libc::bind(pkt, (&sll as *const libc::sockaddr_ll).cast(), sll_len),
            0
        );
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        libc::setsockopt(
            pkt,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        );

        let mem = memory();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x4_0000), QUEUE_SIZE);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = Net::new(tap, Some([2, 0, 0, 0, 0, 9])).unwrap();
        dev.set_acked_features(dev.avail_features());
        let queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        dev.activate(mem.clone(), queues, Arc::new(Interrupt::new(irqfd)))
            .unwrap();

        // Guest to host: a broadcast frame of an unused EtherType.
        let mut eth = vec![0xffu8; 6];
        eth.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x88, 0xb5]);
        eth.extend((0..100).map(|i| i as u8));
        let mut guest_frame = vec![0u8; VNET_HDR_LEN];
        guest_frame.extend_from_slice(&eth);
        mem.write_slice(&guest_frame, GuestAddress(TX_BUF)).unwrap();
        tx.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                TX_BUF,
                guest_frame.len() as u32,
                0,
                0,
            ))],
            0,
        )
        .unwrap();
        assert_eq!(dev.process_tx(), 1);
        assert_eq!(dev.counters().tx_packets, 1);
        let mut buf = [0u8; 2048];
        // The host kernel sends frames of its own on a TAP that just came
        // up (IPv6 MLD reports, router solicitations): skip any that is
        // not of the test's EtherType.
        let mut n = -1;
        for _ in 0..32 {
            n = libc::recv(pkt, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 14 || buf[12..14] == [0x88, 0xb5] {
                break;
            }
        }
        assert_eq!(n, eth.len() as isize, "the frame left the TAP");
        assert_eq!(&buf[..eth.len()], &eth[..]);

        // Host to guest: the same frame back, as the guest receives it.
        let mut back = eth.clone();
        back[..6].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
        back[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        let sent = libc::send(pkt, back.as_ptr().cast(), back.len(), 0);
        assert_eq!(sent, back.len() as isize);
        // The kernel may send its own frames (IPv6 solicitations) first.
        let bufs: Vec<RawDescriptor> = (0..16)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    RX_BUF + i * 4096,
                    4096,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ))
            })
            .collect();
        rx.add_desc_chains(&bufs, 0).unwrap();
        let mut seen = 0u16;
        let mut found = false;
        for _ in 0..200 {
            dev.process_rx();
            while seen < rx.used().idx().load() {
                let e = rx.used().ring().ref_at(usize::from(seen)).unwrap().load();
                let at = RX_BUF + u64::from(e.id()) * 4096 + VNET_HDR_LEN as u64;
                let mut got = vec![0u8; (e.len() as usize).saturating_sub(VNET_HDR_LEN)];
                mem.read_slice(&mut got, GuestAddress(at)).unwrap();
                found |= got == back;
                seen += 1;
            }
            if found {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(found, "the host's frame reached the guest");
        assert_eq!(
            dev.tap().current_offloads() & libc::TUN_F_CSUM,
            libc::TUN_F_CSUM
        );
        libc::close(pkt);
    }
}

/// Through the event loop: the TAP's readiness (edge-triggered) and the
/// queue notifications drive the device, and a frame held for want of a
/// buffer goes out on the guest's next rx notification.
#[test]
fn the_event_loop_moves_frames_both_ways() {
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::Mutex;

    let mem = memory();
    let rig = Rig::new(&mem);
    let rx_evt = rig.dev.queue_events()[0].try_clone().unwrap();
    let tx_evt = rig.dev.queue_events()[1].try_clone().unwrap();
    let (peer, rx, tx) = (rig.peer, rig.rx, rig.tx);
    let dev = Arc::new(Mutex::new(rig.dev));
    let mut em: EventManager<Arc<Mutex<Net>>> = EventManager::new().unwrap();
    em.add_subscriber(dev.clone());
    // The activation's kick: nothing to hand over yet.
    em.run_with_timeout(50).unwrap();

    // A frame arrives with no buffer posted: held.
    peer.write_frame(&frame(64, 1)).unwrap();
    em.run_with_timeout(50).unwrap();
    assert_eq!(rx.used().idx().load(), 0);
    // The guest posts one and notifies: delivered, without a new edge.
    rx.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(
            RX_BUF,
            4096,
            VRING_DESC_F_WRITE as u16,
            0,
        ))],
        0,
    )
    .unwrap();
    rx_evt.write(1).unwrap();
    em.run_with_timeout(50).unwrap();
    assert_eq!(rx.used().idx().load(), 1);
    assert_eq!(Rig::used(&rx, 0).1, 76);

    // Guest to host on a tx notification.
    let f = frame(80, 2);
    mem.write_slice(&f, GuestAddress(TX_BUF)).unwrap();
    tx.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(
            TX_BUF,
            f.len() as u32,
            0,
            0,
        ))],
        0,
    )
    .unwrap();
    tx_evt.write(1).unwrap();
    em.run_with_timeout(50).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = peer.read_frame(&mut buf).unwrap();
    assert_eq!(&buf[..n], &f[..]);
    let c = dev.lock().unwrap().counters();
    assert_eq!((c.rx_packets, c.tx_packets), (1, 1));
}

fn limiter(bytes: u64, refill_ms: u64) -> crate::rate_limiter::RateLimiter {
    crate::rate_limiter::RateLimiter::new(&crate::rate_limiter::RateLimiterConfig {
        bandwidth: Some(crate::rate_limiter::TokenBucketConfig {
            size: bytes,
            one_time_burst: 0,
            refill_time: refill_ms,
        }),
        ops: None,
    })
    .unwrap()
}

#[test]
fn a_transmit_limit_holds_frames_in_the_queue_until_its_timer() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    // 1000 bytes per 100 ms: two 500-byte frames pass, the third waits.
    rig.dev.set_rate_limiters(None, Some(limiter(1000, 100)));
    let f = frame(500, 1);
    mem.write_slice(&f, GuestAddress(TX_BUF)).unwrap();
    for _ in 0..3 {
        rig.offer_tx(&[(TX_BUF, f.len() as u32, false)]);
    }
    assert_eq!(rig.dev.process_tx(), 2);
    assert_eq!(rig.peer_frames().len(), 2);
    assert_eq!(rig.tx.used().idx().load(), 2);
    // A notification meanwhile changes nothing.
    assert_eq!(rig.dev.process_tx(), 0);
    let timer = rig.dev.tx_limiter().unwrap().timer().as_raw_fd();
    wait_readable(timer);
    assert_eq!(rig.dev.tx_timer_fired(), 1);
    assert_eq!(rig.peer_frames(), vec![f]);
    let c = rig.dev.counters();
    assert_eq!((c.tx_packets, c.tx_dropped), (3, 0));
}

#[test]
fn a_receive_limit_holds_frames_until_its_timer() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.dev.set_rate_limiters(Some(limiter(1000, 100)), None);
    for seed in 0..3 {
        rig.peer.write_frame(&frame(500, seed)).unwrap();
    }
    for i in 0..4 {
        rig.offer_rx(&[(RX_BUF + i * 4096, 4096, true)]);
    }
    assert_eq!(rig.dev.process_rx(), 2);
    assert_eq!(rig.dev.process_rx(), 0, "blocked");
    let timer = rig.dev.rx_limiter().unwrap().timer().as_raw_fd();
    wait_readable(timer);
    assert_eq!(rig.dev.rx_timer_fired(), 1);
    // The held frame went to the next buffer, none was skipped.
    assert_eq!(Rig::used(&rig.rx, 2), (2, 512));
    let mut got = vec![0u8; 500];
    mem.read_slice(&mut got, GuestAddress(RX_BUF + 2 * 4096 + 12))
        .unwrap();
    assert_eq!(got, frame(500, 2)[12..]);
}

/// Waits up to 2 s for `fd` to be readable.
fn wait_readable(fd: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call.
    let n = unsafe { libc::poll(&mut p, 1, 2000) };
    assert_eq!(n, 1, "the limiter's timer never fired");
}
