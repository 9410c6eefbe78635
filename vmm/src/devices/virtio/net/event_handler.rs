//! Connects a virtio-net device's queue events and TAP to the event loop.
//! The TAP is watched edge-triggered: a frame the guest has no buffer for
//! stays in the TAP (or the device's one-frame hold) until the guest's
//! next rx notification, instead of waking the loop again and again.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::{RX, TX};
use super::Net;

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in self.queue_event_fds() {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("virtio-net: cannot watch a queue: {e:?}");
            }
        }
        let tap = Events::new_raw(
            self.tap().as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        if let Err(e) = ops.add(tap) {
            tracing::error!("virtio-net: cannot watch its TAP: {e:?}");
        }
        for limiter in [self.rx_limiter(), self.tx_limiter()].into_iter().flatten() {
            let timer = Events::new_raw(limiter.timer().as_raw_fd(), EventSet::IN);
            if let Err(e) = ops.add(timer) {
                tracing::error!("virtio-net: cannot watch a rate limiter: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.queue_event_fds()[RX].as_raw_fd() {
            let _ = self.queue_event_fds()[RX].read();
            self.process_rx();
        } else if fd == self.queue_event_fds()[TX].as_raw_fd() {
            let _ = self.queue_event_fds()[TX].read();
            self.process_tx();
        } else if fd == self.tap().as_raw_fd() {
            self.process_rx();
        } else if self
            .rx_limiter()
            .is_some_and(|l| l.timer().as_raw_fd() == fd)
        {
            self.rx_timer_fired();
        } else if self
            .tx_limiter()
            .is_some_and(|l| l.timer().as_raw_fd() == fd)
        {
            self.tx_timer_fired();
        } else {
            let _ = ops.remove(events);
        }
    }
}
