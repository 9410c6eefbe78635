//! The last bytes of a child's output stream, kept for error messages.
//! A pipe the VMM writes to must always be drained, or a full pipe would
//! stall the guest's console.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Mutex};

/// How much of a stream is kept.
const KEEP: usize = 64 * 1024;

/// A bounded, shared buffer holding the end of a stream.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<u8>>>);

impl Tail {
    /// Copies `from` into the buffer on a thread of its own until EOF.
    pub fn drain(&self, mut from: impl Read + Send + 'static) {
        let tail = self.clone();
        let spawned = std::thread::Builder::new()
            .name("kiln-vmm-output".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match from.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => tail.push(&buf[..n]),
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot drain VMM output: {e}");
        }
    }

    pub fn push(&self, bytes: &[u8]) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.extend(bytes);
        let excess = q.len().saturating_sub(KEEP);
        q.drain(..excess);
    }

    /// Everything kept, as text.
    pub fn text(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (a, b) = q.as_slices();
        let mut v = Vec::with_capacity(q.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).replace('\r', "")
    }

    /// The last line that is not blank.
    pub fn last_line(&self) -> String {
        self.text()
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or_default()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_end_and_finds_the_last_line() {
        let t = Tail::default();
        t.push(b"first\r\n");
        t.push(&vec![b'x'; KEEP]);
        t.push(b"\nlast line\n\n");
        let text = t.text();
        assert_eq!(text.len(), KEEP);
        assert!(!text.contains("first"));
        assert_eq!(t.last_line(), "last line");
    }

    #[test]
    fn drains_a_reader_to_its_end() {
        let t = Tail::default();
        t.drain(std::io::Cursor::new(b"a\nb\n".to_vec()));
        for _ in 0..100 {
            if t.last_line() == "b" {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("not drained: {:?}", t.text());
    }
}
