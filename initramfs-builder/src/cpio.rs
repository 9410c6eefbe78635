//! A deterministic writer for the "newc" cpio format the kernel unpacks as
//! an initramfs: entries appear in the order added, inode numbers count up
//! from 1, and nothing from the host (time, uid, inode) leaks in.

use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
/// newc's fixed header length.
const HEADER_LEN: u64 = 110;
const PAGE: u64 = 4096;
/// Regular files at least this large get their data on a page boundary of
/// the archive (`Writer::align_data`); below it the padding would cost the
/// unpacker more than the pages save.
pub const PAGE_ALIGN_MIN: u64 = 64 * 1024;

const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFIFO: u32 = 0o010000;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("cpio path must be relative and non-empty: {0:?}")]
    BadPath(String),
    #[error("cpio entry {0:?} is larger than 4 GiB")]
    TooLarge(String),
    #[error("data for {0:?} ended early")]
    ShortData(String),
    #[error("cannot write cpio archive")]
    Io(#[from] io::Error),
}

/// Owner and permission bits of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits (the file type is added by the writer).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Meta {
    pub const fn root(mode: u32) -> Self {
        Meta {
            mode,
            uid: 0,
            gid: 0,
        }
    }
}

pub struct Writer<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    pub fn dir(&mut self, path: &str, meta: Meta) -> Result<(), CpioError> {
        self.entry(path, S_IFDIR | (meta.mode & 0o7777), meta, 2, &[])
    }

    pub fn file(&mut self, path: &str, meta: Meta, data: &[u8]) -> Result<(), CpioError> {
        self.entry(path, S_IFREG | (meta.mode & 0o7777), meta, 1, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str, meta: Meta) -> Result<(), CpioError> {
        self.entry(path, S_IFLNK | 0o777, meta, 1, target.as_bytes())
    }

    pub fn char_device(
        &mut self,
        path: &str,
        meta: Meta,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.device(path, S_IFCHR, meta, (major, minor))
    }

    pub fn block_device(
        &mut self,
        path: &str,
        meta: Meta,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.device(path, S_IFBLK, meta, (major, minor))
    }

    /// A device node of type `kind` (S_IFCHR or S_IFBLK): header only.
    fn device(
        &mut self,
        path: &str,
        kind: u32,
        meta: Meta,
        rdev: (u32, u32),
    ) -> Result<(), CpioError> {
        self.header(path, kind | (meta.mode & 0o7777), meta, 1, 0, rdev)
            .map(|_| ())
    }

    pub fn fifo(&mut self, path: &str, meta: Meta) -> Result<(), CpioError> {
        self.header(path, S_IFIFO | (meta.mode & 0o7777), meta, 1, 0, (0, 0))
            .map(|_| ())
    }

    /// A regular file whose `size` bytes are streamed from `data`, under
    /// one or more hardlinked `paths`. All names share one inode; the data
    /// goes with the first, later names have size 0: the kernel's unpacker
    /// (init/initramfs.c) creates the first and links the rest to it.
    pub fn file_from(
        &mut self,
        paths: &[&str],
        meta: Meta,
        size: u64,
        data: &mut dyn io::Read,
    ) -> Result<(), CpioError> {
        let Some((first, rest)) = paths.split_first() else {
            return Ok(());
        };
        let size32 = u32::try_from(size).map_err(|_| CpioError::TooLarge(first.to_string()))?;
        let nlink =
            u32::try_from(paths.len()).map_err(|_| CpioError::TooLarge(first.to_string()))?;
        let mode = S_IFREG | (meta.mode & 0o7777);
        let ino = self.header(first, mode, meta, nlink, size32, (0, 0))?;
        let copied = io::copy(&mut io::Read::take(data, size), &mut self.out)?;
        self.written += copied;
        if copied != size {
            return Err(CpioError::ShortData(first.to_string()));
        }
        self.pad()?;
        for p in rest {
            let name = checked_name(p)?;
            self.raw_header(name, ino, mode, meta, nlink, 0, (0, 0))?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        meta: Meta,
        nlink: u32,
        data: &[u8],
    ) -> Result<(), CpioError> {
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(path.to_string()))?;
        self.header(path, mode, meta, nlink, size, (0, 0))?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    fn header(
        &mut self,
        path: &str,
        mode: u32,
        meta: Meta,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> Result<u32, CpioError> {
        let name = checked_name(path)?;
        if mode & S_IFMT == S_IFREG && u64::from(size) >= PAGE_ALIGN_MIN {
            self.align_data(name)?;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.raw_header(name, ino, mode, meta, nlink, size, rdev)?;
        Ok(ino)
    }

    /// Ends the archive and pads it with NULs so that the data of the next
    /// entry, `name`, starts on a page boundary: the kernel unpacks archives
    /// laid end to end with NUL padding between them. kiln's guest kernel
    /// then gives those pages to the file as they are instead of copying
    /// them (guest patch 0013), where the VMM loads the initramfs on a page
    /// boundary too, as kiln-vmm does. Hardlinked names follow their data
    /// (`file_from`), so no link spans the trailer.
    fn align_data(&mut self, name: &str) -> Result<(), CpioError> {
        let entry = (HEADER_LEN + name.len() as u64 + 1).next_multiple_of(4);
        if (self.written + entry).is_multiple_of(PAGE) {
            return Ok(());
        }
        self.raw_header(TRAILER, 0, 0, Meta::root(0), 1, 0, (0, 0))?;
        let zeros = (PAGE - (self.written + entry) % PAGE) % PAGE;
        io::copy(&mut io::Read::take(io::repeat(0), zeros), &mut self.out)?;
        self.written += zeros;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    #[allow(clippy::too_many_arguments)]
    fn raw_header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        meta: Meta,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> Result<(), CpioError> {
        let header = format!(
            "{MAGIC}{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = meta.uid,
            gid = meta.gid,
            mtime = 0,
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            namesize = name.len() + 1,
            check = 0,
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += header.len() as u64 + name.len() as u64 + 1;
        self.pad()
    }

    /// newc pads headers+names and data to 4 bytes.
    fn pad(&mut self) -> Result<(), CpioError> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += pad as u64;
        Ok(())
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.raw_header(TRAILER, 0, 0, Meta::root(0), 1, 0, (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One entry read back from a newc archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Reads a whole newc archive back (tests and inspection; the kernel is
/// the real reader), across the trailers and NUL padding between archives
/// laid end to end, as the kernel does.
pub fn parse(mut b: &[u8]) -> Result<Vec<Entry>, CpioError> {
    let bad = || CpioError::Io(io::Error::new(io::ErrorKind::InvalidData, "malformed newc"));
    let mut out = Vec::new();
    let mut offset = 0usize;
    loop {
        if b.len() < 110 || &b[..6] != MAGIC.as_bytes() {
            return Err(bad());
        }
        let field = |i: usize| {
            std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i])
                .ok()
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .ok_or_else(bad)
        };
        let (ino, mode, uid, gid, nlink) = (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
        let size = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_end = 110 + namesize;
        let name = b.get(110..name_end - 1).ok_or_else(bad)?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| bad())?;
        let data_start = (offset + name_end).next_multiple_of(4) - offset;
        let data_end = data_start + size;
        let data = b.get(data_start..data_end).ok_or_else(bad)?.to_vec();
        let next = (offset + data_end).next_multiple_of(4) - offset;
        b = b.get(next..).ok_or_else(bad)?;
        offset += next;
        if name == TRAILER {
            // The kernel skips NULs to the next archive, which starts on a
            // 4-byte boundary.
            let zeros = b.iter().take_while(|&&c| c == 0).count();
            if zeros == b.len() {
                return Ok(out);
            }
            if zeros % 4 != 0 {
                return Err(bad());
            }
            b = &b[zeros..];
            offset += zeros;
            continue;
        }
        out.push(Entry {
            path: name,
            ino,
            mode,
            uid,
            gid,
            nlink,
            rdev,
            data,
        });
    }
}

fn checked_name(path: &str) -> Result<&str, CpioError> {
    let name = path.trim_start_matches("./");
    // The kernel reads the name up to its first NUL: one inside would
    // unpack the entry under a shorter name than the one checked here.
    if name.is_empty()
        || name.starts_with('/')
        || name.contains('\0')
        || name.split('/').any(|c| c == "..")
    {
        return Err(CpioError::BadPath(path.to_string()));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new());
        w.dir("dev", Meta::root(0o755)).unwrap();
        w.char_device("dev/console", Meta::root(0o600), 5, 1)
            .unwrap();
        w.file("init", Meta::root(0o755), b"#!/bin/sh\n").unwrap();
        w.symlink("bin", "usr/bin", Meta::root(0o777)).unwrap();
        w.file(
            "home/u/f",
            Meta {
                mode: 0o640,
                uid: 1000,
                gid: 100,
            },
            b"abc",
        )
        .unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn deterministic_and_aligned() {
        let a = sample();
        assert_eq!(a, sample());
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        let trailer = a.windows(10).position(|w| w == b"TRAILER!!!");
        assert!(trailer.is_some());
    }

    #[test]
    fn hardlinks_share_an_inode_with_data_first() {
        let mut w = Writer::new(Vec::new());
        w.file_from(&["a", "b"], Meta::root(0o644), 3, &mut &b"xyz"[..])
            .unwrap();
        let out = w.finish().unwrap();
        // Header fields: magic(6) ino(8) mode(8) uid gid nlink mtime filesize ...
        let field = |off: usize, i: usize| {
            let s = std::str::from_utf8(&out[off + 6 + 8 * i..off + 14 + 8 * i]).unwrap();
            u32::from_str_radix(s, 16).unwrap()
        };
        let second = out.windows(6).skip(1).position(|w| w == b"070701").unwrap() + 1;
        assert_eq!(field(0, 0), field(second, 0), "same inode");
        assert_eq!((field(0, 4), field(second, 4)), (2, 2), "nlink");
        assert_eq!((field(0, 6), field(second, 6)), (3, 0), "data on the first");
        let mut short = Writer::new(Vec::new());
        assert!(matches!(
            short.file_from(&["a"], Meta::root(0o644), 5, &mut &b"xy"[..]),
            Err(CpioError::ShortData(_))
        ));
    }

    #[test]
    fn parse_reads_back_what_was_written() {
        let entries = parse(&sample()).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["dev", "dev/console", "init", "bin", "home/u/f"]);
        assert_eq!(entries[4].data, b"abc");
        assert_eq!((entries[4].uid, entries[4].gid), (1000, 100));
        assert_eq!(entries[1].rdev, (5, 1));
    }

    #[test]
    fn large_files_have_their_data_on_a_page_boundary() {
        let big: Vec<u8> = (0..PAGE_ALIGN_MIN + 5).map(|i| (i % 251) as u8).collect();
        let mut w = Writer::new(Vec::new());
        w.file("small", Meta::root(0o644), b"abc").unwrap();
        w.file_from(
            &["bin/big", "bin/big2"],
            Meta::root(0o755),
            big.len() as u64,
            &mut &big[..],
        )
        .unwrap();
        w.file("after", Meta::root(0o644), b"xyz").unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        // The data sits, whole, at a page boundary of the archive.
        let at = out.windows(64).position(|w| w == &big[..64]).unwrap();
        assert_eq!(at % PAGE as usize, 0);
        assert_eq!(&out[at..at + big.len()], &big[..]);
        // Read back across the trailer and padding before it, links intact.
        let entries = parse(&out).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["small", "bin/big", "bin/big2", "after"]);
        assert_eq!(entries[1].data, big);
        assert_eq!(entries[1].ino, entries[2].ino);
        assert_eq!(entries[3].data, b"xyz");
        // In-memory files too.
        let mut w = Writer::new(Vec::new());
        w.file("a", Meta::root(0o644), b"abc").unwrap();
        w.file("b", Meta::root(0o644), &big).unwrap();
        let out = w.finish().unwrap();
        let at = out.windows(64).position(|w| w == &big[..64]).unwrap();
        assert_eq!(at % PAGE as usize, 0);
        assert_eq!(parse(&out).unwrap()[1].data, big);
        // Small files are not padded.
        let mut w = Writer::new(Vec::new());
        w.file(
            "small",
            Meta::root(0o644),
            &big[..PAGE_ALIGN_MIN as usize - 1],
        )
        .unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.windows(10).filter(|w| w == b"TRAILER!!!").count(), 1);
        // Padding that is not a whole number of words is malformed.
        let mut bad = sample();
        bad.extend_from_slice(&[0, 0]);
        bad.extend_from_slice(&sample());
        assert!(parse(&bad).is_err());
    }

    #[test]
    fn rejects_escaping_paths() {
        let mut w = Writer::new(Vec::new());
        assert!(matches!(
            w.file("../x", Meta::root(0o644), b""),
            Err(CpioError::BadPath(_))
        ));
        assert!(matches!(
            w.file("/etc/x", Meta::root(0o644), b""),
            Err(CpioError::BadPath(_))
        ));
        assert!(matches!(
            w.dir("a/../../b", Meta::root(0o755)),
            Err(CpioError::BadPath(_))
        ));
    }

    #[test]
    fn rejects_a_nul_inside_a_name() {
        // Found by the cpio_names fuzz target: "etc\0/x" was written whole,
        // and the kernel would have unpacked it as "etc".
        let mut w = Writer::new(Vec::new());
        for path in ["etc\0/x", "a\0", "\0"] {
            assert!(
                matches!(
                    w.symlink(path, "t", Meta::root(0o777)),
                    Err(CpioError::BadPath(_))
                ),
                "{path:?}"
            );
        }
        assert_eq!(w.written(), 0);
    }

    #[test]
    fn gnu_cpio_reads_it_back() {
        // The reference reader, when installed (scripts/setup.sh installs it).
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "-v", "-n", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            panic!("cpio not installed: run scripts/setup.sh");
        };
        child.stdin.take().unwrap().write_all(&sample()).unwrap();
        let out = child.wait_with_output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"));
        assert!(
            lines[1].starts_with("crw-------")
                && lines[1].contains("5,")
                && lines[1].ends_with("dev/console")
        );
        assert!(lines[2].starts_with("-rwxr-xr-x") && lines[2].ends_with(" init"));
        assert!(lines[3].starts_with("lrwxrwxrwx") && lines[3].ends_with("bin -> usr/bin"));
        assert!(
            lines[4].starts_with("-rw-r-----")
                && lines[4].contains(" 1000 ")
                && lines[4].contains(" 100 ")
                && lines[4].ends_with("home/u/f"),
            "{listing}"
        );
    }
}
