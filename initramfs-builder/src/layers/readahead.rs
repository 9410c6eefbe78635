//! Decompression on a helper thread: the producer inflates a layer while
//! this thread parses tar headers, hashes and writes the cpio, so the two
//! halves of the work overlap. Chunks travel over a small bounded channel
//! (memory stays at a few MiB); when the consumer stops early, the
//! producer sees the closed channel and stops too.

use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread;

const CHUNK: usize = 256 * 1024;
const DEPTH: usize = 8;

/// Reads `src` on a helper thread while `consume` reads the same bytes
/// here. Returns what `consume` returned and `src` (read to its end
/// unless `consume` stopped early).
pub fn run<R: Read + Send, T>(mut src: R, consume: impl FnOnce(&mut dyn Read) -> T) -> (T, R) {
    thread::scope(|s| {
        let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(DEPTH);
        let producer = s.spawn(move || {
            loop {
                let mut buf = vec![0u8; CHUNK];
                match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send(Ok(buf)).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
            src
        });
        let out = {
            let mut reader = ChannelReader {
                rx,
                cur: Vec::new(),
                pos: 0,
            };
            consume(&mut reader)
            // The receiver drops here, releasing a producer blocked on send.
        };
        match producer.join() {
            Ok(src) => (out, src),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

struct ChannelReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(v)) => {
                    self.cur = v;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // Producer finished: end of stream.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_bytes_errors_and_early_stops() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let (got, _) = run(&data[..], |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).map(|_| v)
        });
        assert_eq!(got.unwrap(), data);
        // The consumer stops after 10 bytes; the producer must not hang.
        let (first, _) = run(io::repeat(1), |r| {
            let mut b = [0u8; 10];
            r.read_exact(&mut b).map(|_| b)
        });
        assert_eq!(first.unwrap(), [1u8; 10]);
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::InvalidData, "bad block"))
            }
        }
        let (err, _) = run(Broken, |r| r.read_to_end(&mut Vec::new()));
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
