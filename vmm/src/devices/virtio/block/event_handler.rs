//! Connects a virtio-blk device's queue event to the event loop.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::Block;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.queue_event(), EventSet::IN)) {
            tracing::error!("virtio-blk: cannot watch its queue: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.queue_event().read();
        self.process_queue();
    }
}
