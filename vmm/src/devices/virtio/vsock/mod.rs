//! virtio-vsock: the host<->guest channel, fronted on the host by a Unix
//! socket per VM (see [`muxer`]).

pub mod muxer;
pub mod packet;

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{check_queues, ActivateError, Interrupt, Memory, VirtioDevice, TYPE_VSOCK};
pub use muxer::{Muxer, MuxerError, HOST_CID};
use packet::{Header, HDR_LEN};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// `struct virtio_vsock_event { le32 id; }` with this id: all connections reset.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// Largest payload accepted from or sent to the guest in one packet.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Guest packets handled per tx notification before the event loop gets a
/// turn (the rest wait: the tx event is re-armed).
const TX_BATCH: usize = 4 * QUEUE_SIZE as usize;

struct Active {
    mem: Memory,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

pub struct Vsock {
    guest_cid: u64,
    queue_events: [EventFd; 3],
    acked_features: u64,
    active: Option<Active>,
    muxer: Muxer,
    on_activity: Option<Box<dyn Fn() + Send>>,
    /// Guest packets were left in the tx queue because the replies held
    /// for the guest were at their bound; served again once rx drains.
    tx_stalled: bool,
}

impl Vsock {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        let evt = || {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| MuxerError::Bind {
                path: uds_path.to_path_buf(),
                source,
            })
        };
        let queue_events = [evt()?, evt()?, evt()?];
        Ok(Vsock {
            guest_cid,
            queue_events,
            acked_features: 0,
            active: None,
            muxer: Muxer::new(uds_path, guest_cid)?,
            on_activity: None,
            tx_stalled: false,
        })
    }

    /// Called whenever the guest sends a packet (watchdog feed).
    pub fn set_activity_hook(&mut self, hook: Box<dyn Fn() + Send>) {
        self.on_activity = Some(hook);
    }

    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Tells the guest that every connection it had is gone (after a
    /// restore: the host ends of those connections did not survive): one
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue. Returns false
    /// when the device is not running or the driver left no event buffer.
    pub fn send_transport_reset(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let Some(chain) = active.queues[EVENT].pop_descriptor_chain(&active.mem) else {
            return false;
        };
        let head = chain.head_index();
        let written = chain
            .writer(&active.mem)
            .ok()
            .and_then(|mut w| w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).ok())
            .map_or(0, |_| 4);
        if active.queues[EVENT]
            .add_used(&active.mem, head, written)
            .is_err()
        {
            return false;
        }
        active.interrupt.signal_used_queue();
        written == 4
    }

    /// Reads every packet the guest queued for the host.
    fn process_tx(&mut self, ops: &mut EventOps) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        let mut packets = Vec::new();
        // Every packet handled may add one reply for the guest.
        let room = muxer::MAX_CONTROL.saturating_sub(self.muxer.control_len());
        self.tx_stalled = false;
        let mut taken = 0;
        loop {
            if packets.len() >= room {
                self.tx_stalled = true;
                break;
            }
            if taken >= TX_BATCH {
                let _ = self.queue_events[TX].write(1);
                break;
            }
            let Some(chain) = active.queues[TX].pop_descriptor_chain(&active.mem) else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            if let Ok(mut reader) = chain.reader(&active.mem) {
                let mut raw = [0u8; HDR_LEN];
                if reader.read_exact(&mut raw).is_ok() {
                    let hdr = Header::decode(&raw);
                    let len = (hdr.len as usize)
                        .min(MAX_PAYLOAD)
                        .min(reader.available_bytes());
                    let mut data = vec![0u8; len];
                    if reader.read_exact(&mut data).is_ok() {
                        packets.push((hdr, data));
                    }
                }
            }
            if active.queues[TX].add_used(&active.mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        if used {
            active.interrupt.signal_used_queue();
            if let Some(hook) = &self.on_activity {
                hook();
            }
        }
        for (hdr, data) in packets {
            self.muxer.handle_guest_packet(&hdr, &data, ops);
        }
    }

    /// Hands the guest every packet the host side has ready, while it has buffers.
    fn process_rx(&mut self, ops: &mut EventOps) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        let mut data = Vec::new();
        while self.muxer.has_rx() {
            let Some(chain) = active.queues[RX].pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            let Ok(mut writer) = chain.writer(&active.mem) else {
                let _ = active.queues[RX].add_used(&active.mem, head, 0);
                used = true;
                continue;
            };
            let room = writer
                .available_bytes()
                .saturating_sub(HDR_LEN)
                .min(MAX_PAYLOAD);
            let Some(hdr) = self.muxer.next_rx(room, &mut data, ops) else {
                // Nothing after all: give the buffer back untouched.
                active.queues[RX].go_to_previous_position();
                break;
            };
            let written = writer
                .write_all(&hdr.encode())
                .and_then(|_| writer.write_all(&data))
                .map(|_| HDR_LEN + data.len())
                .unwrap_or(0);
            if active.queues[RX]
                .add_used(&active.mem, head, written as u32)
                .is_err()
            {
                break;
            }
            used = true;
        }
        if used {
            active.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }
    fn avail_features(&self) -> u64 {
        0
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }
    fn activate(
        &mut self,
        mem: Memory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        check_queues(&mem, &queues, 3)?;
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        // Packets may have queued up before the driver was ready.
        for evt in &self.queue_events[RX..=RX] {
            let _ = evt.write(1);
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(|q| q.state()))
            .collect()
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.queue_events {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("virtio-vsock: cannot watch a queue: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::new_raw(self.muxer.listener_fd(), EventSet::IN)) {
            tracing::error!("virtio-vsock: cannot watch its socket: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.queue_events[RX].as_raw_fd() {
            let _ = self.queue_events[RX].read();
        } else if fd == self.queue_events[TX].as_raw_fd() {
            let _ = self.queue_events[TX].read();
            self.process_tx(ops);
        } else if fd == self.queue_events[EVENT].as_raw_fd() {
            let _ = self.queue_events[EVENT].read();
        } else if fd == self.muxer.listener_fd() {
            self.muxer.accept(ops);
        } else if self.muxer.owns(fd) {
            self.muxer.handle_stream_event(fd, events.event_set(), ops);
        } else {
            let _ = ops.remove(events);
        }
        self.process_rx(ops);
        if self.tx_stalled && !self.muxer.control_full() {
            self.process_tx(ops);
            self.process_rx(ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::packet::*;
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::os::unix::net::UnixListener;
    use std::sync::Mutex;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const RX_BUF: u64 = 0x10_0000;
    const TX_BUF: u64 = 0x20_0000;

    fn hdr(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5555,
            dst_port: 1234,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    /// Guest-initiated connect, host data back, guest data forth: the
    /// queue logic and the event loop, without KVM.
    #[test]
    fn guest_connects_to_a_host_socket_and_data_flows_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
        let mem = Memory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let ev = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let rx_descs: Vec<RawDescriptor> = (0..4)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    RX_BUF + i * 4096,
                    4096,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ))
            })
            .collect();
        rx.add_desc_chains(&rx_descs, 0).unwrap();
        mem.write_slice(&hdr(OP_REQUEST, 0).encode(), GuestAddress(TX_BUF))
            .unwrap();
        let mut request = hdr(OP_RW, 4);
        request.fwd_cnt = 0;
        let mut rw = request.encode().to_vec();
        rw.extend_from_slice(b"ping");
        mem.write_slice(&rw, GuestAddress(TX_BUF + 4096)).unwrap();
        tx.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                TX_BUF,
                HDR_LEN as u32,
                0,
                0,
            ))],
            0,
        )
        .unwrap();

        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irqfd.try_clone().unwrap()));
        let mut dev = Vsock::new(3, &uds).unwrap();
        let queues = vec![
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
            ev.create_queue().unwrap(),
        ];
        dev.activate(mem.clone(), queues, interrupt.clone())
            .unwrap();
        let tx_evt = dev.queue_events()[TX].try_clone().unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut em: EventManager<Arc<Mutex<Vsock>>> = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());

        // REQUEST -> the muxer connects to <uds>_1234 and answers RESPONSE.
        tx_evt.write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        let (mut host, _) = listener.accept().unwrap();
        assert_eq!(rx.used().idx().load(), 1);
        let mut raw = [0u8; HDR_LEN];
        mem.read_slice(&mut raw, GuestAddress(RX_BUF)).unwrap();
        let resp = Header::decode(&raw);
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port, resp.dst_cid),
            (OP_RESPONSE, 1234, 5555, 3)
        );
        assert_eq!(interrupt.status() & 1, 1);
        assert!(irqfd.read().unwrap() >= 1);

        // Host bytes become an RW packet in the next rx buffer.
        use std::io::{Read, Write};
        host.write_all(b"hello").unwrap();
        em.run_with_timeout(100).unwrap();
        assert_eq!(rx.used().idx().load(), 2);
        let mut pkt = [0u8; HDR_LEN + 5];
        mem.read_slice(&mut pkt, GuestAddress(RX_BUF + 4096))
            .unwrap();
        let rw_hdr = Header::decode(pkt[..HDR_LEN].try_into().unwrap());
        assert_eq!((rw_hdr.op, rw_hdr.len), (OP_RW, 5));
        assert_eq!(&pkt[HDR_LEN..], b"hello");

        // Guest RW -> bytes on the host stream.
        tx.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                TX_BUF + 4096,
                rw.len() as u32,
                0,
                0,
            ))],
            1,
        )
        .unwrap();
        tx_evt.write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        let mut got = [0u8; 4];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        assert_eq!(dev.lock().unwrap().muxer().connection_count(), 1);

        // The host ending its stream turns into a SHUTDOWN(SEND) for the
        // guest: a half-close, so the guest's answer still reaches the host.
        host.shutdown(std::net::Shutdown::Write).unwrap();
        em.run_with_timeout(100).unwrap();
        assert_eq!(rx.used().idx().load(), 3);
        mem.read_slice(&mut raw, GuestAddress(RX_BUF + 2 * 4096))
            .unwrap();
        let shut = Header::decode(&raw);
        assert_eq!((shut.op, shut.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        let mut answer = hdr(OP_RW, 4).encode().to_vec();
        answer.extend_from_slice(b"pong");
        mem.write_slice(&answer, GuestAddress(TX_BUF + 2 * 4096))
            .unwrap();
        let mut close = hdr(OP_SHUTDOWN, 0);
        close.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        mem.write_slice(&close.encode(), GuestAddress(TX_BUF + 3 * 4096))
            .unwrap();
        tx.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                TX_BUF + 2 * 4096,
                answer.len() as u32,
                0,
                0,
            ))],
            2,
        )
        .unwrap();
        tx_evt.write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
        assert_eq!(dev.lock().unwrap().muxer().connection_count(), 1);

        // The guest closing its end removes the connection: the host reads
        // the end of the stream.
        tx.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                TX_BUF + 3 * 4096,
                HDR_LEN as u32,
                0,
                0,
            ))],
            3,
        )
        .unwrap();
        tx_evt.write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        assert_eq!(dev.lock().unwrap().muxer().connection_count(), 0);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    #[test]
    fn request_to_a_port_nobody_listens_on_is_reset() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mem = Memory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let ev = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
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
        mem.write_slice(&hdr(OP_REQUEST, 0).encode(), GuestAddress(TX_BUF))
            .unwrap();
        tx.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                TX_BUF,
                HDR_LEN as u32,
                0,
                0,
            ))],
            0,
        )
        .unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut dev = Vsock::new(3, &uds).unwrap();
        dev.activate(
            mem.clone(),
            vec![
                rx.create_queue().unwrap(),
                tx.create_queue().unwrap(),
                ev.create_queue().unwrap(),
            ],
            interrupt,
        )
        .unwrap();
        let tx_evt = dev.queue_events()[TX].try_clone().unwrap();
        let mut em: EventManager<Arc<Mutex<Vsock>>> = EventManager::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(dev)));
        tx_evt.write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        let mut raw = [0u8; HDR_LEN];
        mem.read_slice(&mut raw, GuestAddress(RX_BUF)).unwrap();
        assert_eq!(Header::decode(&raw).op, OP_RST);
        drop(em);
        assert!(!uds.exists(), "socket removed with the device");
    }

    /// Writes chains of one descriptor each into the queue at `base` (laid
    /// out as [`ring_queue`] says), from descriptor slot `first`, and
    /// publishes them. The mock's helpers neither wrap the avail ring nor
    /// keep a 256-entry used ring clear of it.
    fn publish(mem: &Memory, base: u64, size: u16, first: u16, bufs: &[(u64, u32, u16)]) {
        let avail = base + 0x1000;
        let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let slot = (first + i as u16) % size;
            let d = base + 16 * u64::from(slot);
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            let at = idx.wrapping_add(i as u16) % size;
            mem.write_obj(slot, GuestAddress(avail + 4 + 2 * u64::from(at)))
                .unwrap();
        }
        mem.write_obj(idx.wrapping_add(bufs.len() as u16), GuestAddress(avail + 2))
            .unwrap();
    }

    /// A ready queue of [`Q`] entries: descriptors at `base`, the avail
    /// ring a page above, the used ring two pages above.
    fn ring_queue(mem: &Memory, base: u64) -> Queue {
        let mut q = Queue::new(Q).unwrap();
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
        q.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    /// A vsock device with rx, tx and event queues of 256 at 0, 0x1_0000
    /// and 0x2_0000, in 16 MiB of guest memory, under an event loop.
    struct Rig {
        mem: Memory,
        dev: Arc<Mutex<Vsock>>,
        em: EventManager<Arc<Mutex<Vsock>>>,
        tx_evt: EventFd,
        rx_evt: EventFd,
        uds: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    const Q: u16 = 256;

    impl Rig {
        fn new() -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let uds = dir.path().join("v.sock");
            let mem = Memory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
            let queues = [0u64, 0x1_0000, 0x2_0000]
                .iter()
                .map(|&b| ring_queue(&mem, b))
                .collect();
            let mut dev = Vsock::new(3, &uds).unwrap();
            let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
            dev.activate(mem.clone(), queues, interrupt).unwrap();
            let tx_evt = dev.queue_events()[TX].try_clone().unwrap();
            let rx_evt = dev.queue_events()[RX].try_clone().unwrap();
            let dev = Arc::new(Mutex::new(dev));
            let mut em = EventManager::new().unwrap();
            em.add_subscriber(dev.clone());
            Rig {
                mem,
                dev,
                em,
                tx_evt,
                rx_evt,
                uds,
                _dir: dir,
            }
        }

        fn used(&self, base: u64) -> u16 {
            self.mem.read_obj(GuestAddress(base + 0x2002)).unwrap()
        }

        fn run(&mut self) {
            for _ in 0..3 {
                self.em.run_with_timeout(50).unwrap();
            }
        }
    }

    /// A guest that sends more than the credit it was given on a stream
    /// whose host end does not read has the stream reset, instead of the
    /// VMM holding its bytes.
    #[test]
    fn a_guest_overrunning_its_credit_is_reset() {
        let mut rig = Rig::new();
        let _listener = UnixListener::bind(format!("{}_1234", rig.uds.display())).unwrap();
        publish(
            &rig.mem,
            0,
            Q,
            0,
            &[(0x10_0000, 4096, VRING_DESC_F_WRITE as u16); 64],
        );
        rig.mem
            .write_slice(&hdr(OP_REQUEST, 0).encode(), GuestAddress(TX_BUF))
            .unwrap();
        publish(&rig.mem, 0x1_0000, Q, 0, &[(TX_BUF, HDR_LEN as u32, 0)]);
        rig.tx_evt.write(1).unwrap();
        rig.run();
        assert_eq!(rig.dev.lock().unwrap().muxer().connection_count(), 1);

        // 16 packets of 64 KiB: 1 MiB, four times the credit, and more than
        // the socket's buffer holds.
        let mut rw = hdr(OP_RW, 64 * 1024).encode().to_vec();
        rw.resize(HDR_LEN + 64 * 1024, 0xab);
        let at = 0x40_0000u64;
        rig.mem.write_slice(&rw, GuestAddress(at)).unwrap();
        publish(&rig.mem, 0x1_0000, Q, 1, &[(at, rw.len() as u32, 0); 16]);
        rig.tx_evt.write(1).unwrap();
        rig.run();
        let dev = rig.dev.lock().unwrap();
        assert_eq!(dev.muxer().connection_count(), 0, "the stream was reset");
        assert_eq!(dev.muxer().bytes_held_for_host(), 0);
        drop(dev);
        let mut raw = [0u8; HDR_LEN];
        // The rx buffers all start at the same address: the last reply is there.
        rig.mem
            .read_slice(&mut raw, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(Header::decode(&raw).op, OP_RST);
    }

    /// A guest that sends packets but posts no rx buffers fills the replies
    /// held for it up to their bound and then is not served; once it posts
    /// buffers, its packets are served again.
    #[test]
    fn a_guest_taking_no_replies_stops_being_served() {
        let mut rig = Rig::new();
        // Requests to a port nobody listens on: each earns an RST.
        rig.mem
            .write_slice(&hdr(OP_REQUEST, 0).encode(), GuestAddress(TX_BUF))
            .unwrap();
        let mut sent = 0u16;
        while usize::from(sent) < muxer::MAX_CONTROL + 2 * usize::from(Q) {
            publish(
                &rig.mem,
                0x1_0000,
                Q,
                sent,
                &[(TX_BUF, HDR_LEN as u32, 0); Q as usize],
            );
            sent += Q;
            rig.tx_evt.write(1).unwrap();
            rig.run();
            if rig.used(0x1_0000) < sent {
                break;
            }
        }
        let taken = rig.used(0x1_0000);
        assert_eq!(usize::from(taken), muxer::MAX_CONTROL);
        assert!(rig.dev.lock().unwrap().muxer().control_full());

        // 16 rx buffers: 16 replies out, 16 more packets in.
        publish(
            &rig.mem,
            0,
            Q,
            0,
            &[(0x10_0000, 4096, VRING_DESC_F_WRITE as u16); 16],
        );
        rig.rx_evt.write(1).unwrap();
        rig.run();
        assert_eq!(rig.used(0), 16);
        assert_eq!(rig.used(0x1_0000), taken + 16);
        assert_eq!(
            rig.dev.lock().unwrap().muxer().control_len(),
            muxer::MAX_CONTROL
        );
    }
}
