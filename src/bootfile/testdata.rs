//! Test-only builders for boot-file fixtures (cpio archives, compressed members, kernels, UKIs),
//! shared with other tests in the crate. Everything is made in memory, deterministically.

use std::io::Write;

/// Deterministic incompressible bytes (xorshift64*).
pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Bytes of padding that bring `len` to a multiple of `align`.
pub(crate) fn pad_len(len: u64, align: u64) -> usize {
    ((align - len % align) % align) as usize
}

/// Appends zero bytes up to a multiple of `align`.
pub(crate) fn pad_to(out: &mut Vec<u8>, align: usize) {
    let n = pad_len(out.len() as u64, align as u64);
    out.resize(out.len() + n, 0);
}

/// One cpio newc header plus its name and the padding after it (the data is the caller's).
pub(crate) fn cpio_header(
    out: &mut Vec<u8>,
    magic: &[u8; 6],
    ino: u32,
    mode: u32,
    name: &str,
    filesize: u64,
) {
    cpio_header_sum(out, magic, ino, mode, name, filesize, 0);
}

fn cpio_header_sum(
    out: &mut Vec<u8>,
    magic: &[u8; 6],
    ino: u32,
    mode: u32,
    name: &str,
    filesize: u64,
    check: u32,
) {
    let start = out.len();
    out.extend_from_slice(magic);
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let fields = [
        u64::from(ino),
        u64::from(mode),
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        filesize,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        name.len() as u64 + 1,
        u64::from(check),
    ];
    for f in fields {
        write!(out, "{f:08X}").unwrap();
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    let n = pad_len((out.len() - start) as u64, 4);
    out.resize(out.len() + n, 0);
}

fn cpio_with(magic: &[u8; 6], files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (name, data)) in files.iter().enumerate() {
        let sum = if magic == b"070702" {
            data.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)))
        } else {
            0
        };
        cpio_header_sum(
            &mut out,
            magic,
            i as u32 + 1,
            0o100644,
            name,
            data.len() as u64,
            sum,
        );
        out.extend_from_slice(data);
        pad_to(&mut out, 4);
    }
    cpio_header(&mut out, magic, 0, 0, "TRAILER!!!", 0);
    // Like cpio(1): the archive is padded to a 512-byte block.
    pad_to(&mut out, 512);
    out
}

/// A cpio newc archive (`070701`) of regular files, ending with `TRAILER!!!`.
pub(crate) fn cpio(files: &[(&str, &[u8])]) -> Vec<u8> {
    cpio_with(b"070701", files)
}

/// The same with `070702` headers and their data checksums.
pub(crate) fn cpio_crc(files: &[(&str, &[u8])]) -> Vec<u8> {
    cpio_with(b"070702", files)
}

/// One zstd frame with a content checksum (as the zstd CLI writes by default).
pub(crate) fn zstd(data: &[u8]) -> Vec<u8> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_checksum(true).unwrap();
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// One xz stream (CRC64 check).
pub(crate) fn xz(data: &[u8]) -> Vec<u8> {
    let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 6);
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// One gzip member.
pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A raw arm64 `Image` of `len` bytes (at least 64): branch, text_offset 0, image_size a bit
/// above `len` (BSS), `ARMd` at 0x38, filler after the header.
pub(crate) fn arm64_image(len: usize) -> Vec<u8> {
    let mut img = noise(len.max(64), 11);
    img[..64].fill(0);
    set_arm64_header(&mut img);
    img
}

fn set_arm64_header(img: &mut [u8]) {
    let image_size = (img.len() as u64).next_multiple_of(0x10000) + 0x10000;
    img[16..24].copy_from_slice(&image_size.to_le_bytes());
    img[24..32].copy_from_slice(&0xAu64.to_le_bytes()); // flags: LE, 4K pages, anywhere
    img[0x38..0x3C].copy_from_slice(b"ARMd");
}

/// An arm64 `Image` with an EFI stub: a PE32+ file whose DOS header carries the arm64 header
/// (the two overlap in real kernels: `MZ` is also the first instruction).
pub(crate) fn arm64_efi_image(len: usize) -> Vec<u8> {
    let mut img = pe(0xAA64, &[(".text", &noise(len, 12))]);
    set_arm64_header(&mut img);
    img
}

/// An arm64 EFI zboot image whose payload is a 256 KiB arm64 `Image` compressed with
/// `compression` ("zstd" or "gzip").
pub(crate) fn zboot(compression: &str) -> Vec<u8> {
    let image = arm64_image(256 * 1024);
    let payload = match compression {
        "zstd" => zstd(&image),
        "gzip" => gzip(&image),
        other => panic!("no fixture compressor for {other}"),
    };
    let mut k = zboot_with(compression, &payload);
    if compression == "zstd" {
        // zboot's zstd22_with_size appends the decoded size after the frame, outside the
        // payload size in the header; put it where the tail starts.
        let end = 0x1000 + payload.len();
        k[end..end + 4].copy_from_slice(&(image.len() as u32).to_le_bytes());
    }
    k
}

/// A zboot header (payload at 0x1000) naming `compression`, then `payload` verbatim and 512
/// bytes of tail (real images carry more code and data after the payload).
pub(crate) fn zboot_with(compression: &str, payload: &[u8]) -> Vec<u8> {
    let mut k = vec![0u8; 0x1000];
    k[..2].copy_from_slice(b"MZ");
    k[4..8].copy_from_slice(b"zimg");
    k[8..12].copy_from_slice(&0x1000u32.to_le_bytes());
    k[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    k[24..24 + compression.len()].copy_from_slice(compression.as_bytes());
    k[0x38..0x3C].copy_from_slice(&0x8182_23CDu32.to_le_bytes()); // LINUX_PE_MAGIC
    k.extend_from_slice(payload);
    k.resize(k.len() + 0x200, 0);
    k
}

/// An x86 bzImage: `setup_sects` (0 means 4) setup sectors after the boot sector, then
/// `protected_len` bytes of protected-mode kernel (rounded up to 16).
pub(crate) fn bzimage(setup_sects: u8, protected_len: usize) -> Vec<u8> {
    let sects = if setup_sects == 0 {
        4
    } else {
        usize::from(setup_sects)
    };
    let setup = (sects + 1) * 512;
    let syssize = protected_len.div_ceil(16);
    let mut k = vec![0u8; setup];
    k[..2].copy_from_slice(b"MZ");
    k[0x1F1] = setup_sects;
    k[0x1F4..0x1F8].copy_from_slice(&(syssize as u32).to_le_bytes());
    k[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
    k[0x211] = 0x01; // LOADED_HIGH
    k[0x248..0x24C].copy_from_slice(&0x100u32.to_le_bytes());
    k[0x24C..0x250].copy_from_slice(&((syssize * 16 - 0x200) as u32).to_le_bytes());
    k.extend(noise(syssize * 16, 13));
    k
}

const FILE_ALIGN: usize = 0x200;
const SECTION_ALIGN: usize = 0x1000;
const E_LFANEW: usize = 0x80;
const OPT_HEADER_LEN: usize = 240; // PE32+ with 16 data directories

/// A minimal but real PE32+ EFI application: DOS header, `PE\0\0`, COFF header, optional header
/// with 16 data directories, and one section per entry, raw data aligned to 0x200 with
/// SizeOfRawData padded and VirtualSize exact (so readers must bound by VirtualSize).
pub(crate) fn pe(machine: u16, sections: &[(&str, &[u8])]) -> Vec<u8> {
    let table_at = E_LFANEW + 4 + 20 + OPT_HEADER_LEN;
    let headers = (table_at + sections.len() * 40).next_multiple_of(FILE_ALIGN);
    let mut out = vec![0u8; headers];
    out[..2].copy_from_slice(b"MZ");
    out[0x3C..0x40].copy_from_slice(&(E_LFANEW as u32).to_le_bytes());
    out[E_LFANEW..E_LFANEW + 4].copy_from_slice(b"PE\0\0");
    let coff = E_LFANEW + 4;
    out[coff..coff + 2].copy_from_slice(&machine.to_le_bytes());
    out[coff + 2..coff + 4].copy_from_slice(&(sections.len() as u16).to_le_bytes());
    out[coff + 16..coff + 18].copy_from_slice(&(OPT_HEADER_LEN as u16).to_le_bytes());
    out[coff + 18..coff + 20].copy_from_slice(&0x0206u16.to_le_bytes()); // executable
    let opt = coff + 20;
    let put32 =
        |out: &mut Vec<u8>, at: usize, v: u32| out[at..at + 4].copy_from_slice(&v.to_le_bytes());
    out[opt..opt + 2].copy_from_slice(&0x020Bu16.to_le_bytes()); // PE32+
    put32(&mut out, opt + 16, SECTION_ALIGN as u32); // AddressOfEntryPoint
    put32(&mut out, opt + 32, SECTION_ALIGN as u32); // SectionAlignment
    put32(&mut out, opt + 36, FILE_ALIGN as u32); // FileAlignment
    put32(&mut out, opt + 60, headers as u32); // SizeOfHeaders
    out[opt + 68..opt + 70].copy_from_slice(&10u16.to_le_bytes()); // EFI application
    put32(&mut out, opt + 108, 16); // NumberOfRvaAndSizes

    let mut va = SECTION_ALIGN;
    for (i, (name, data)) in sections.iter().enumerate() {
        let raw_ptr = out.len();
        out.extend_from_slice(data);
        pad_to(&mut out, FILE_ALIGN);
        let raw_size = out.len() - raw_ptr;
        let h = table_at + i * 40;
        out[h..h + name.len()].copy_from_slice(name.as_bytes());
        put32(&mut out, h + 8, data.len() as u32); // VirtualSize
        put32(&mut out, h + 12, va as u32); // VirtualAddress
        put32(&mut out, h + 16, raw_size as u32); // SizeOfRawData
        put32(&mut out, h + 20, raw_ptr as u32); // PointerToRawData
        put32(&mut out, h + 36, 0x4000_0040); // initialized data, readable
        va += data.len().max(1).next_multiple_of(SECTION_ALIGN);
    }
    put32(&mut out, opt + 56, va as u32); // SizeOfImage
    out
}

/// A UKI as ukify lays it out: `.osrel`, `.cmdline` (NUL-terminated), `.linux`, `.initrd`.
pub(crate) fn uki(kernel: &[u8], initrd: &[u8], cmdline: &str) -> Vec<u8> {
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    pe(
        0xAA64,
        &[
            (".osrel", b"ID=talos\n"),
            (".cmdline", &cmd),
            (".linux", kernel),
            (".initrd", initrd),
        ],
    )
}

/// File offset of the header of the section called `name` in a file made by [`pe`].
pub(crate) fn section_header_at(pe_file: &[u8], name: &str) -> Option<usize> {
    let table_at = E_LFANEW + 4 + 20 + OPT_HEADER_LEN;
    let count = usize::from(u16::from_le_bytes([
        pe_file[E_LFANEW + 6],
        pe_file[E_LFANEW + 7],
    ]));
    (0..count).map(|i| table_at + i * 40).find(|&h| {
        let raw = &pe_file[h..h + 8];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(8);
        &raw[..end] == name.as_bytes()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_layout_is_aligned_newc() {
        let a = cpio(&[("a", b"12345")]);
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 512, 0);
        // header 110 + "a\0" = 112, data 5 -> 117, padded to 120: the trailer starts there.
        assert_eq!(&a[120..126], b"070701");
        assert_eq!(&a[120 + 110..120 + 120], b"TRAILER!!!");
    }

    #[test]
    fn pe_fixture_parses_with_object() {
        use object::read::pe::PeFile64;
        use object::LittleEndian as LE;
        let f = uki(b"kernel", b"initrd", "x");
        let pe = PeFile64::<&[u8]>::parse(&f[..]).unwrap();
        let names: Vec<_> = pe
            .section_table()
            .iter()
            .map(|s| String::from_utf8_lossy(s.raw_name()).into_owned())
            .collect();
        assert_eq!(names, [".osrel", ".cmdline", ".linux", ".initrd"]);
        let linux = pe.section_table().iter().nth(2).unwrap();
        let (at, size) = linux.pe_file_range();
        assert_eq!(&f[at as usize..(at + size) as usize], b"kernel");
        assert_eq!(linux.size_of_raw_data.get(LE), 0x200);
    }
}
