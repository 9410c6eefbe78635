//! Loading the kernel and initramfs, and everything the kernel reads at
//! entry: command line, memory map, MP table, and the PVH start info or the
//! Linux zero page.

pub mod gdt;
pub mod mapped_file;
pub mod mptable;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::*;
use mapped_file::MappedFile;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PVH_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

/// Ways loading or configuring the boot can fail.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel not found: {0}")]
    KernelNotFound(PathBuf),
    #[error("cannot read kernel {path}")]
    ReadKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(PathBuf),
    #[error("cannot load kernel {path}: {reason}")]
    LoadKernel { path: PathBuf, reason: String },
    #[error("initramfs not found: {0}")]
    InitrdNotFound(PathBuf),
    #[error("cannot read initramfs {path}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initramfs of {size} bytes does not fit in guest memory ({room} bytes free above the kernel); give the VM more memory")]
    InitrdTooLarge { size: u64, room: u64 },
    #[error("kernel command line is invalid: {0}")]
    Cmdline(String),
    #[error("cannot write {0} into guest memory")]
    GuestMemory(&'static str),
}

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// 32-bit protected mode at the ELF's PVH note, RBX = start info.
    Pvh,
    /// 64-bit long mode, RSI = zero page.
    Linux64,
}

/// Where the kernel landed and how to start it.
#[derive(Clone, Copy, Debug)]
pub struct KernelEntry {
    pub entry: GuestAddress,
    pub protocol: BootProtocol,
    /// First byte after the kernel image.
    pub kernel_end: u64,
    /// The bzImage setup header, when there is one.
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

impl KernelEntry {
    /// An entry point for code loaded without a kernel image.
    pub fn raw(entry: GuestAddress, protocol: BootProtocol) -> Self {
        KernelEntry {
            entry,
            protocol,
            kernel_end: entry.0,
            setup_header: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

fn kernel_format(path: &Path, file: &mut File) -> Result<KernelFormat, BootError> {
    let read_err = |source| BootError::ReadKernel {
        path: path.to_path_buf(),
        source,
    };
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(read_err)?;
    if n == 4 && magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    // A bzImage carries "HdrS" at 0x202.
    if file.seek(SeekFrom::Start(0x202)).is_ok()
        && file.read_exact(&mut magic).is_ok()
        && u32::from_le_bytes(magic) == KERNEL_HDR_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownKernelFormat(path.to_path_buf()))
}

/// Loads an ELF vmlinux (PVH entry preferred) or a bzImage into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<KernelEntry, BootError> {
    let mut file = crate::jail::held::open_read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            BootError::KernelNotFound(path.to_path_buf())
        } else {
            BootError::ReadKernel {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let format = kernel_format(path, &mut file)?;
    let read_err = |source| BootError::ReadKernel {
        path: path.to_path_buf(),
        source,
    };
    file.rewind().map_err(read_err)?;
    let mut file = MappedFile::new(file, mem).map_err(read_err)?;
    let load_err = |e: linux_loader::loader::Error| BootError::LoadKernel {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let r: KernelLoaderResult = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            let (entry, protocol) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (addr, BootProtocol::Pvh),
                _ => {
                    // No PVH note: enter at the ELF entry point in long mode.
                    let e_entry = elf_entry(&mut file).map_err(read_err)?;
                    (GuestAddress(e_entry), BootProtocol::Linux64)
                }
            };
            Ok(KernelEntry {
                entry,
                protocol,
                kernel_end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(KernelEntry {
                entry: GuestAddress(r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                protocol: BootProtocol::Linux64,
                kernel_end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
    }
}

/// The physical entry point of an ELF64 image (e_entry masked to its load address).
fn elf_entry(file: &mut (impl Read + Seek)) -> std::io::Result<u64> {
    let mut raw = [0u8; 8];
    file.seek(SeekFrom::Start(0x18))?;
    file.read_exact(&mut raw)?;
    // vmlinux links at a virtual address; its physical load address is the
    // low bits (the kernel is linked at __START_KERNEL_map + phys).
    Ok(u64::from_le_bytes(raw) & 0x7fff_ffff)
}

/// Where the initramfs was placed.
#[derive(Clone, Copy, Debug)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Places the initramfs at the top of low memory, page aligned.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdPlacement, BootError> {
    let file = crate::jail::held::open_read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            BootError::InitrdNotFound(path.to_path_buf())
        } else {
            BootError::ReadInitrd {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::ReadInitrd {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let low_end = low_ram_end(mem);
    let room = low_end.saturating_sub(align_up(kernel_end, PAGE_SIZE));
    if size > room {
        return Err(BootError::InitrdTooLarge { size, room });
    }
    let addr = (low_end - size) & !(PAGE_SIZE - 1);
    let mut file = MappedFile::new(file, mem).map_err(|source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|_| BootError::GuestMemory("initramfs"))?;
    Ok(InitrdPlacement { addr, size })
}

fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

/// End of RAM below the 32-bit MMIO gap.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    (mem.last_addr().0 + 1).min(MMIO_GAP_START)
}

/// The guest's memory map: (start, size, e820 type).
pub fn memory_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_bytes) {
        if start == 0 {
            map.push((HIMEM_START, size - HIMEM_START, E820_RAM));
        } else {
            map.push((start, size, E820_RAM));
        }
    }
    map
}

/// Builds the kernel command line: `base`, the host's workarounds, then one
/// `virtio_mmio.device=` per device.
pub fn build_cmdline(
    base: &str,
    host_extra: &[String],
    virtio_devices: &[(u64, u32)],
) -> Result<Cmdline, BootError> {
    let err = |e: linux_loader::cmdline::Error| BootError::Cmdline(e.to_string());
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(err)?;
    // A base that carries init arguments ("-- args") must keep them last.
    let (kernel_part, init_part) = match base.split_once(" -- ") {
        Some((k, i)) => (k, Some(i)),
        None => (base, None),
    };
    if !kernel_part.trim().is_empty() {
        cmdline.insert_str(kernel_part.trim()).map_err(err)?;
    }
    for extra in host_extra {
        cmdline.insert_str(extra).map_err(err)?;
    }
    for (i, (base_addr, irq)) in virtio_devices.iter().enumerate() {
        cmdline
            .add_virtio_mmio_device(
                VIRTIO_MMIO_SIZE,
                GuestAddress(*base_addr),
                *irq,
                Some(i as u32),
            )
            .map_err(err)?;
    }
    if let Some(init) = init_part {
        cmdline.insert_init_args(init.trim()).map_err(err)?;
    }
    Ok(cmdline)
}

/// Writes the command line, MP table, GDT/IDT, page tables and the
/// protocol's boot structure.
pub fn configure(
    mem: &GuestMemoryMmap,
    kernel: &KernelEntry,
    initrd: Option<InitrdPlacement>,
    cmdline: &Cmdline,
    vcpus: u8,
    mem_bytes: u64,
) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();
    mem.write_slice(&mptable::build(EBDA_START, vcpus), GuestAddress(EBDA_START))
        .map_err(|_| BootError::GuestMemory("MP table"))?;
    let gdt: &[u64] = match kernel.protocol {
        BootProtocol::Pvh => &gdt::GDT_PVH,
        BootProtocol::Linux64 => &gdt::GDT_LONG_MODE,
    };
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| BootError::GuestMemory("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| BootError::GuestMemory("IDT"))?;
    let map = memory_map(mem_bytes);
    match kernel.protocol {
        BootProtocol::Pvh => write_pvh_start_info(mem, initrd, &map),
        BootProtocol::Linux64 => {
            write_identity_page_tables(mem)?;
            write_zero_page(mem, kernel, initrd, cmdline_len, &map)
        }
    }
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    map: &[(u64, u64, u32)],
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|(addr, size, kind)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    if let Some(initrd) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|_| BootError::GuestMemory("PVH start info"))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &KernelEntry,
    initrd: Option<InitrdPlacement>,
    cmdline_len: usize,
    map: &[(u64, u64, u32)],
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = map.len() as u8;
    let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(|_| BootError::GuestMemory("zero page"))
}

/// Identity-maps the first GiB with 2 MiB pages.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let err = |_| BootError::GuestMemory("page tables");
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(err)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(err)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_reserves_the_mp_table_and_skips_the_hole() {
        let map = memory_map(256 << 20);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn cmdline_order_is_base_host_devices_then_init_args() {
        let c = build_cmdline(
            "console=ttyS0 -- --flag",
            &["noxsave".to_string()],
            &[(0xd000_0000, 5)],
        )
        .unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            s,
            "console=ttyS0 noxsave virtio_mmio.device=4K@0xd0000000:5:0 -- --flag"
        );
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, vec![0x5au8; 4096]).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        assert!(matches!(
            load_kernel(&mem, &p),
            Err(BootError::UnknownKernelFormat(_))
        ));
        assert!(matches!(
            load_kernel(&mem, &dir.path().join("missing")),
            Err(BootError::KernelNotFound(_))
        ));
    }
}
