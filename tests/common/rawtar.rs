//! Byte-by-byte tar archives for hostile-input tests: raw 512-byte ustar / GNU headers with
//! correct checksums, PAX extended headers and GNU long names, with any path, type, size or link
//! the `tar` crate's builder would refuse (`../`, absolute paths, devices, lying sizes). Also
//! decompression bombs (multi-member gzip, hand-made zstd frames of RLE blocks).

use std::io::Write;

pub const BLOCK: usize = 512;

/// Tar type flags.
pub mod kind {
    pub const REGULAR: u8 = b'0';
    pub const HARDLINK: u8 = b'1';
    pub const SYMLINK: u8 = b'2';
    pub const CHAR: u8 = b'3';
    pub const BLOCK: u8 = b'4';
    pub const DIR: u8 = b'5';
    pub const FIFO: u8 = b'6';
    pub const PAX: u8 = b'x';
    pub const GNU_LONGNAME: u8 = b'L';
    pub const GNU_LONGLINK: u8 = b'K';
}

/// Header flavour: POSIX ustar (`ustar\0` `00`) or old GNU (`ustar  \0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    Ustar,
    Gnu,
}

/// The fields of one raw header. `name` and `linkname` are written as given (at most 100 bytes
/// each; longer names need a GNU long name or PAX `path` entry before the header).
#[derive(Debug, Clone)]
pub struct RawHeader {
    pub name: Vec<u8>,
    pub mode: u32,
    /// Written in octal, or base-256 (GNU) when it does not fit 11 octal digits.
    pub size: u64,
    pub typeflag: u8,
    pub linkname: Vec<u8>,
    pub devmajor: u32,
    pub devminor: u32,
    pub magic: Magic,
}

impl RawHeader {
    pub fn new(typeflag: u8, name: impl AsRef<[u8]>, size: u64) -> RawHeader {
        RawHeader {
            name: name.as_ref().to_vec(),
            mode: if typeflag == kind::DIR { 0o755 } else { 0o644 },
            size,
            typeflag,
            linkname: Vec::new(),
            devmajor: 0,
            devminor: 0,
            magic: Magic::Ustar,
        }
    }

    pub fn link(mut self, target: impl AsRef<[u8]>) -> Self {
        self.linkname = target.as_ref().to_vec();
        self
    }

    pub fn device(mut self, major: u32, minor: u32) -> Self {
        self.devmajor = major;
        self.devminor = minor;
        self
    }

    pub fn gnu(mut self) -> Self {
        self.magic = Magic::Gnu;
        self
    }

    /// The 512-byte header block, checksum included.
    pub fn block(&self) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        assert!(self.name.len() <= 100, "name longer than 100 bytes");
        assert!(self.linkname.len() <= 100, "linkname longer than 100 bytes");
        b[..self.name.len()].copy_from_slice(&self.name);
        octal(&mut b[100..108], self.mode as u64);
        octal(&mut b[108..116], 0); // uid
        octal(&mut b[116..124], 0); // gid
        if self.size < 1 << 33 {
            octal(&mut b[124..136], self.size);
        } else {
            // GNU base-256: high bit of the first byte set, big-endian number in the rest.
            b[124] = 0x80;
            b[128..136].copy_from_slice(&self.size.to_be_bytes());
        }
        octal(&mut b[136..148], 1_700_000_000); // mtime
        b[156] = self.typeflag;
        b[157..157 + self.linkname.len()].copy_from_slice(&self.linkname);
        match self.magic {
            Magic::Ustar => {
                b[257..263].copy_from_slice(b"ustar\0");
                b[263..265].copy_from_slice(b"00");
            }
            Magic::Gnu => b[257..265].copy_from_slice(b"ustar  \0"),
        }
        b[265..269].copy_from_slice(b"root");
        b[297..301].copy_from_slice(b"root");
        octal(&mut b[329..337], self.devmajor as u64);
        octal(&mut b[337..345], self.devminor as u64);
        set_checksum(&mut b);
        b
    }
}

/// `value` as zero-padded octal digits followed by a NUL, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    assert!(
        s.len() == digits,
        "{value} does not fit {digits} octal digits"
    );
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

/// The header checksum: the sum of all bytes with the checksum field read as spaces, written as
/// six octal digits, NUL, space.
pub fn set_checksum(b: &mut [u8; BLOCK]) {
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&x| x as u32).sum();
    let s = format!("{sum:06o}");
    b[148..154].copy_from_slice(s.as_bytes());
    b[154] = 0;
    b[155] = b' ';
}

/// One PAX record: `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
pub fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + 1 + value.len() + 1; // "key=value\n"
    let mut len = body + 2;
    loop {
        let total = len.to_string().len() + 1 + body;
        if total == len {
            break;
        }
        len = total;
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    assert_eq!(r.len(), len);
    r
}

/// A tar stream assembled entry by entry.
#[derive(Debug, Clone, Default)]
pub struct RawTar {
    pub bytes: Vec<u8>,
}

impl RawTar {
    pub fn new() -> RawTar {
        RawTar::default()
    }

    /// A header block and `data`, padded to a whole block (`data` need not match `h.size`: that
    /// is how a lying header is made).
    pub fn entry(mut self, h: &RawHeader, data: &[u8]) -> RawTar {
        self.bytes.extend_from_slice(&h.block());
        self.bytes.extend_from_slice(data);
        self.pad();
        self
    }

    /// Raw bytes appended as they are (no padding).
    pub fn raw(mut self, data: &[u8]) -> RawTar {
        self.bytes.extend_from_slice(data);
        self
    }

    fn pad(&mut self) {
        let rem = self.bytes.len() % BLOCK;
        if rem != 0 {
            self.bytes.resize(self.bytes.len() + BLOCK - rem, 0);
        }
    }

    pub fn file(self, path: impl AsRef<[u8]>, data: &[u8]) -> RawTar {
        let h = RawHeader::new(kind::REGULAR, path, data.len() as u64);
        self.entry(&h, data)
    }

    pub fn dir(self, path: impl AsRef<[u8]>) -> RawTar {
        self.entry(&RawHeader::new(kind::DIR, path, 0), &[])
    }

    pub fn symlink(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> RawTar {
        let h = RawHeader::new(kind::SYMLINK, path, 0).link(target);
        self.entry(&h, &[])
    }

    pub fn hardlink(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> RawTar {
        let h = RawHeader::new(kind::HARDLINK, path, 0).link(target);
        self.entry(&h, &[])
    }

    /// A character or block device node (`kind::CHAR` / `kind::BLOCK`).
    pub fn device(self, typeflag: u8, path: impl AsRef<[u8]>, major: u32, minor: u32) -> RawTar {
        let h = RawHeader::new(typeflag, path, 0).device(major, minor);
        self.entry(&h, &[])
    }

    pub fn fifo(self, path: impl AsRef<[u8]>) -> RawTar {
        self.entry(&RawHeader::new(kind::FIFO, path, 0), &[])
    }

    /// A PAX extended header (`x`) describing the next entry.
    pub fn pax(self, records: &[(&str, &[u8])]) -> RawTar {
        let data: Vec<u8> = records.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
        let h = RawHeader::new(kind::PAX, "./PaxHeaders/entry", data.len() as u64);
        self.entry(&h, &data)
    }

    /// A GNU long name (`L`) entry: the next entry's path is `name`.
    pub fn gnu_longname(self, name: impl AsRef<[u8]>) -> RawTar {
        let mut data = name.as_ref().to_vec();
        data.push(0);
        let h = RawHeader::new(kind::GNU_LONGNAME, "././@LongLink", data.len() as u64).gnu();
        self.entry(&h, &data)
    }

    /// A GNU long link (`K`) entry: the next entry's link target is `target`.
    pub fn gnu_longlink(self, target: impl AsRef<[u8]>) -> RawTar {
        let mut data = target.as_ref().to_vec();
        data.push(0);
        let h = RawHeader::new(kind::GNU_LONGLINK, "././@LongLink", data.len() as u64).gnu();
        self.entry(&h, &data)
    }

    /// The archive with its end marker (two zero blocks).
    pub fn finish(mut self) -> Vec<u8> {
        self.pad();
        self.bytes.resize(self.bytes.len() + 2 * BLOCK, 0);
        self.bytes
    }

    /// The archive without an end marker (so it ends where the last entry's data ends).
    pub fn unterminated(mut self) -> Vec<u8> {
        self.pad();
        self.bytes
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// The tar header of a bomb: a regular file `path` of `zeros - 1024` bytes, so the stream
/// `header + zeros` is a complete archive (the file's zeros, then the two-block end marker).
pub fn bomb_header(path: &str, zeros: u64) -> [u8; BLOCK] {
    assert!(zeros.is_multiple_of(BLOCK as u64) && zeros >= 2 * BLOCK as u64);
    RawHeader::new(kind::REGULAR, path, zeros - 2 * BLOCK as u64).block()
}

/// A gzip bomb: a multi-member gzip stream that inflates to `header` followed by `members *
/// 32 MiB` of zeros. Deflate cannot beat ~1032:1, so this is about 32 KiB per 32 MiB.
pub fn gzip_bomb(path: &str, members: u64) -> Vec<u8> {
    const MEMBER: usize = 32 << 20;
    let zeros = vec![0u8; MEMBER];
    let compress = |data: &[u8]| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    };
    let header = bomb_header(path, members * MEMBER as u64);
    let mut out = compress(&header);
    let member = compress(&zeros);
    for _ in 0..members {
        out.extend_from_slice(&member);
    }
    out
}

/// A zstd bomb, one hand-made frame: a raw block holding the tar `header`, then `blocks` RLE
/// blocks of 128 KiB zeros each (4 bytes per block: 32 KiB of frame per GiB of output).
pub fn zstd_bomb(path: &str, blocks: u64) -> Vec<u8> {
    const RLE_SIZE: u32 = 128 << 10;
    let header = bomb_header(path, blocks * RLE_SIZE as u64);
    let mut out = vec![0x28, 0xB5, 0x2F, 0xFD];
    // Frame header descriptor: no content size, not single segment, no checksum, no dictionary;
    // then the window descriptor: 2^(10 + 7) = 128 KiB.
    out.push(0x00);
    out.push(7 << 3);
    let block_header = |last: bool, block_type: u32, size: u32| {
        let v = (last as u32) | (block_type << 1) | (size << 3);
        [v as u8, (v >> 8) as u8, (v >> 16) as u8]
    };
    out.extend_from_slice(&block_header(false, 0, header.len() as u32));
    out.extend_from_slice(&header);
    for i in 0..blocks {
        out.extend_from_slice(&block_header(i + 1 == blocks, 1, RLE_SIZE));
        out.push(0);
    }
    out
}
