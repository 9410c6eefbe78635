//! Output compression of the initramfs. Every encoder here is
//! deterministic (fixed levels, no timestamps, single-threaded), and each
//! format is one the kernel's initramfs unpacker reads.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Default: on kiln's hosts an uncompressed initramfs boots fastest
    /// (the kernel's decompressor is slower than copying the bytes).
    #[default]
    None,
    Gzip,
    Zstd,
    Lz4,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown compression {0:?} (none, gzip, zstd, lz4)")]
pub struct UnknownCompression(String);

impl FromStr for Compression {
    type Err = UnknownCompression;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            "lz4" => Ok(Compression::Lz4),
            _ => Err(UnknownCompression(s.to_string())),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        })
    }
}

impl Compression {
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "cpio",
            Compression::Gzip => "cpio.gz",
            Compression::Zstd => "cpio.zst",
            Compression::Lz4 => "cpio.lz4",
        }
    }
}

const ZSTD_LEVEL: i32 = 9;

/// A compressing writer; `finish` flushes the format's trailer.
pub enum Encoder<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Lz4(Lz4Legacy<W>),
}

impl<W: Write> Encoder<W> {
    pub fn new(c: Compression, out: W) -> io::Result<Self> {
        Ok(match c {
            Compression::None => Encoder::None(out),
            // GzBuilder defaults: mtime 0, no name: nothing from the host.
            Compression::Gzip => {
                Encoder::Gzip(flate2::GzBuilder::new().write(out, flate2::Compression::new(6)))
            }
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
                e.include_checksum(true)?;
                Encoder::Zstd(e)
            }
            Compression::Lz4 => Encoder::Lz4(Lz4Legacy::new(out)),
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Lz4(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Lz4(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Lz4(e) => e.flush(),
        }
    }
}

/// The legacy LZ4 format (`lz4 -l`): the only LZ4 framing the kernel's
/// initramfs decompressor accepts. Magic, then blocks of at most 8 MiB of
/// input, each as a little-endian compressed length and an LZ4 block.
pub struct Lz4Legacy<W: Write> {
    out: W,
    buf: Vec<u8>,
}

const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
const LZ4_LEGACY_CHUNK: usize = 8 << 20;

impl<W: Write> Lz4Legacy<W> {
    fn new(mut out: W) -> Self {
        // A write error here surfaces at the first block write.
        let _ = out.write_all(&LZ4_LEGACY_MAGIC.to_le_bytes());
        Lz4Legacy {
            out,
            buf: Vec::with_capacity(LZ4_LEGACY_CHUNK),
        }
    }

    fn block(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let c = lz4_flex::block::compress(&self.buf);
        let len = u32::try_from(c.len()).map_err(io::Error::other)?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&c)?;
        self.buf.clear();
        Ok(())
    }

    fn finish(mut self) -> io::Result<W> {
        self.block()?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for Lz4Legacy<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(LZ4_LEGACY_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == LZ4_LEGACY_CHUNK {
            self.block()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
