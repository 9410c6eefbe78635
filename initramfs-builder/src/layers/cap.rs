//! A reader that fails once more than a fixed number of bytes came out of
//! it: the guard against decompression bombs, which would otherwise expand
//! without bound before any tar header is looked at.

use std::io::{self, Read};

#[derive(Debug, thiserror::Error)]
#[error("expanded size limit reached")]
pub struct CapExceeded;

pub struct Capped<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Capped<R> {
    pub fn new(inner: R, remaining: u64) -> Self {
        Capped { inner, remaining }
    }
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            // One byte more than allowed means the stream is over the limit.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::other(CapExceeded)),
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Whether an I/O error came from a `Capped` reader.
pub fn is_cap(e: &io::Error) -> bool {
    // tar wraps reader errors in its own error, so walk the whole chain.
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|x| x as _);
    while let Some(c) = cur {
        if c.is::<CapExceeded>() {
            return true;
        }
        cur = match c.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|x| x as _),
            None => c.source(),
        };
    }
    false
}
