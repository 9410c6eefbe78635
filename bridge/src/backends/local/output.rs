//! A grant's `output.log`, capped: the workload's stdout and stderr are
//! appended until the file reaches its cap, which then ends with a marker
//! line saying that output was dropped. The file never grows past the cap,
//! however much a guest writes.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Default cap of a grant's `output.log`.
pub const DEFAULT_OUTPUT_CAP: u64 = 64 << 20;
/// The smallest cap: room for the marker and some output.
pub const MIN_OUTPUT_CAP: u64 = 4096;

/// The line that ends a truncated log (`{cap}` is the cap in bytes).
fn marker(cap: u64) -> String {
    format!("\n[kiln: output.log reached its cap of {cap} bytes; later output dropped]\n")
}

/// What one append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Written whole (or dropped: the log was already truncated).
    Kept,
    /// This append reached the cap: part of it was dropped and the marker
    /// written. Happens once per log.
    Truncated { dropped: u64 },
}

pub struct OutputLog {
    file: File,
    len: u64,
    cap: u64,
    truncated: bool,
}

impl OutputLog {
    /// Opens `path` for appending (what an earlier shim wrote counts
    /// toward the cap). `cap` below [`MIN_OUTPUT_CAP`] is raised to it.
    pub fn open(path: &Path, cap: u64) -> std::io::Result<OutputLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let len = file.metadata()?.len();
        let cap = cap.max(MIN_OUTPUT_CAP);
        Ok(OutputLog {
            file,
            len,
            cap,
            truncated: len >= cap,
        })
    }

    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Appends `data`, or what fits of it before the marker.
    pub fn append(&mut self, data: &[u8]) -> std::io::Result<Appended> {
        if self.truncated {
            return Ok(Appended::Kept);
        }
        let marker = marker(self.cap);
        let room = self.cap.saturating_sub(self.len + marker.len() as u64);
        if data.len() as u64 <= room {
            self.file.write_all(data)?;
            self.len += data.len() as u64;
            return Ok(Appended::Kept);
        }
        // `room` < data.len(), so it fits in usize.
        let kept = usize::try_from(room).unwrap_or(0);
        self.file.write_all(&data[..kept])?;
        self.file.write_all(marker.as_bytes())?;
        self.len += (kept + marker.len()) as u64;
        self.truncated = true;
        Ok(Appended::Truncated {
            dropped: (data.len() - kept) as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_stops_at_its_cap_with_a_marker_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let mut log = OutputLog::open(&path, 8192).unwrap();
        assert_eq!(log.append(&[b'a'; 5000]).unwrap(), Appended::Kept);
        let r = log.append(&[b'b'; 5000]).unwrap();
        let Appended::Truncated { dropped } = r else {
            panic!("{r:?}")
        };
        assert!(log.truncated());
        assert_eq!(log.append(&[b'c'; 100]).unwrap(), Appended::Kept);
        let text = std::fs::read(&path).unwrap();
        assert_eq!(text.len(), 8192);
        let m = marker(8192);
        assert!(text.ends_with(m.as_bytes()));
        assert_eq!(dropped as usize, 5000 - (8192 - 5000 - m.len()));
        assert!(!text[..text.len() - m.len()].contains(&b'c'));
        // A shim started again on the same grant counts what is there.
        let mut again = OutputLog::open(&path, 8192).unwrap();
        assert!(again.truncated());
        again.append(b"more").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
    }

    #[test]
    fn a_tiny_cap_is_raised_to_the_minimum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let mut log = OutputLog::open(&path, 1).unwrap();
        log.append(&vec![b'x'; 10_000]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MIN_OUTPUT_CAP);
    }
}
