//! Layer decompression chosen by magic bytes, not by media type: registries
//! and `docker save` label layers inconsistently, the bytes do not lie.

use std::io::{self, BufRead, BufReader, Read};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Plain,
    Gzip,
    Zstd,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Wraps `r` in the decoder its first bytes call for.
pub fn open<'a, R: Read + Send + 'a>(r: R) -> io::Result<(Codec, Box<dyn Read + Send + 'a>)> {
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let head = r.fill_buf()?;
    if head.starts_with(GZIP_MAGIC) {
        // Multi-member gzip is legal in layers.
        Ok((
            Codec::Gzip,
            Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        ))
    } else if head.starts_with(ZSTD_MAGIC) {
        Ok((
            Codec::Zstd,
            Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
        ))
    } else {
        Ok((Codec::Plain, Box::new(r)))
    }
}
