//! Kernel check: arm64 EFI zboot (payload decoded to its end), raw arm64 `Image`, x86 bzImage, or
//! another PE/EFI image. Offsets and layouts: Documentation/arch/arm64/booting.rst,
//! Documentation/arch/x86/boot.rst, drivers/firmware/efi/libstub/zboot-header.S.

use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};

use super::pe::{self, PeInfo};
use super::{mb, CheckError, Limits, Verdict};
use crate::io::{is_limit, read_full, Budget, Capped, ForwardSeek};

/// Enough for every header field read here (the x86 setup header ends before 0x270).
const HEAD_LEN: u64 = 4096;
/// What a stream check keeps to look back into: the headers and a PE section table (a few KiB
/// in every kernel and UKI seen), with room to spare.
const STREAM_HEAD: usize = 64 * 1024;
const MIN_LEN: u64 = 64;
const ARM64_MAGIC: &[u8] = b"ARMd";
const ARM64_MAGIC_AT: usize = 0x38;
const ARM64_IMAGE_SIZE_AT: usize = 16;
/// An arm64 `image_size` (file plus BSS) beyond this is no kernel; Talos's are about 60 MB.
const MAX_ARM64_IMAGE_SIZE: u64 = 1 << 30;
const ZBOOT_OFFSET_AT: usize = 8;
const ZBOOT_SIZE_AT: usize = 12;
const ZBOOT_COMP_AT: usize = 24;
/// Compressions the zboot Makefile knows; only gzip and zstd are decoded here.
const ZBOOT_UNDECODED: [&str; 5] = ["lz4", "lzma", "lzo", "xzkern", "bzip2"];
const PAYLOAD_BUF: usize = 128 * 1024;
const X86_HDRS_AT: usize = 0x202;
const X86_SETUP_SECTS_AT: usize = 0x1f1;
const X86_SYSSIZE_AT: usize = 0x1f4;
const X86_VERSION_AT: usize = 0x206;
const X86_LOADFLAGS_AT: usize = 0x211;
const X86_PAYLOAD_AT: usize = 0x248;
const X86_HEADER_END: usize = 0x250;

#[cfg(test)]
/// Checks a kernel with the default [`Limits`].
pub fn check_kernel<R: Read + Seek>(r: R, len: u64) -> Result<Verdict, CheckError> {
    check_kernel_with(r, len, &Limits::default())
}

/// Recognises the kernel format by magic and checks that the file holds all of it; a zboot
/// payload is decompressed completely.
pub fn check_kernel_with<R: Read + Seek>(
    mut r: R,
    len: u64,
    limits: &Limits,
) -> Result<Verdict, CheckError> {
    let head = read_head(&mut r, len)?;
    if len < MIN_LEN {
        return Err(CheckError::new(
            "kernel header",
            0,
            format!("only {len} bytes: too short for any kernel header"),
        ));
    }
    if head.starts_with(b"MZ") && head.get(4..8) == Some(b"zimg") {
        return zboot(&mut r, len, &head, limits);
    }
    if head.get(ARM64_MAGIC_AT..ARM64_MAGIC_AT + 4) == Some(ARM64_MAGIC) {
        return arm64_image(&mut r, len, &head);
    }
    if head.get(X86_HDRS_AT..X86_HDRS_AT + 4) == Some(b"HdrS") {
        return bzimage(len, &head);
    }
    if head.starts_with(b"MZ") {
        let info = pe_image(&mut r, len)?;
        let uki = if info.section(".linux").is_some() {
            ", UKI"
        } else {
            ""
        };
        return Ok(Verdict {
            format: format!(
                "PE/EFI application ({}, {} sections{uki}, {})",
                info.machine_name(),
                info.sections.len(),
                mb(len)
            ),
        });
    }
    Err(CheckError::new(
        "kernel format",
        0,
        "no known kernel magic: not an arm64 EFI zboot (MZ+zimg), arm64 Image (ARMd at 0x38), \
         x86 bzImage (HdrS at 0x202) or PE/EFI image (MZ)",
    ))
}

/// Checks a kernel from a stream of `len` bytes, read once front to back (the bytes of a file
/// as it is written). `None` when this file needs to look back further than its first 64 KiB
/// (a PE section table far into the file): then check the written file with
/// [`check_kernel_with`].
pub fn check_kernel_stream<R: Read>(
    r: R,
    len: u64,
    limits: &Limits,
) -> Option<Result<Verdict, CheckError>> {
    let mut stream = ForwardSeek::new(r, STREAM_HEAD, len);
    let verdict = check_kernel_with(&mut stream, len, limits);
    (!stream.refused()).then_some(verdict)
}

/// Whether a file's first bytes look like a kernel this module knows (or any PE image).
pub(crate) fn looks_like_kernel(head: &[u8]) -> bool {
    head.starts_with(b"MZ")
        || head.get(ARM64_MAGIC_AT..ARM64_MAGIC_AT + 4) == Some(ARM64_MAGIC)
        || head.get(X86_HDRS_AT..X86_HDRS_AT + 4) == Some(b"HdrS")
}

fn read_head<R: Read + Seek>(r: &mut R, len: u64) -> Result<Vec<u8>, CheckError> {
    r.seek(SeekFrom::Start(0))
        .map_err(|e| CheckError::new("kernel read", 0, e.to_string()))?;
    // At most HEAD_LEN, so the cast cannot truncate.
    let want = len.min(HEAD_LEN) as usize;
    let mut head = vec![0; want];
    let got =
        read_full(r, &mut head).map_err(|e| CheckError::new("kernel read", 0, e.to_string()))?;
    if got < want {
        return Err(CheckError::new(
            "kernel read",
            got as u64,
            format!("file ends after {got} bytes, but its length was given as {len}"),
        ));
    }
    Ok(head)
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A header shorter than its fields: only possible when the file itself is that short.
fn short(check: &'static str, at: usize, len: u64) -> CheckError {
    CheckError::new(
        check,
        at as u64,
        format!("file of {len} bytes ends inside the header"),
    )
}

/// Why an arm64 `image_size` is implausible, if it is.
fn arm64_image_size_problem(image_size: u64) -> Option<String> {
    if image_size == 0 {
        Some("image_size is 0 (a pre-3.17 kernel or a corrupt header)".into())
    } else if image_size > MAX_ARM64_IMAGE_SIZE {
        Some(format!(
            "image_size {image_size} is implausible (over {MAX_ARM64_IMAGE_SIZE})"
        ))
    } else {
        None
    }
}

fn arm64_image<R: Read + Seek>(r: &mut R, len: u64, head: &[u8]) -> Result<Verdict, CheckError> {
    const CHECK: &str = "arm64 Image header";
    let image_size =
        le_u64(head, ARM64_IMAGE_SIZE_AT).ok_or_else(|| short(CHECK, ARM64_IMAGE_SIZE_AT, len))?;
    if let Some(reason) = arm64_image_size_problem(image_size) {
        return Err(CheckError::new(CHECK, ARM64_IMAGE_SIZE_AT as u64, reason));
    }
    // With an EFI stub the PE section table covers the whole file: that catches truncation.
    let stub = if head.starts_with(b"MZ") {
        pe_image(r, len)?;
        " with EFI stub"
    } else {
        ""
    };
    Ok(Verdict {
        format: format!(
            "arm64 Image{stub} ({}, image_size {})",
            mb(len),
            mb(image_size)
        ),
    })
}

fn pe_image<R: Read + Seek>(r: &mut R, len: u64) -> Result<PeInfo, CheckError> {
    let info = pe::parse(r)?;
    pe::check_loadable(&info, len)?;
    Ok(info)
}

fn zboot<R: Read + Seek>(
    r: &mut R,
    len: u64,
    head: &[u8],
    limits: &Limits,
) -> Result<Verdict, CheckError> {
    const CHECK: &str = "zboot header";
    let off = le_u32(head, ZBOOT_OFFSET_AT).ok_or_else(|| short(CHECK, ZBOOT_OFFSET_AT, len))?;
    let size = le_u32(head, ZBOOT_SIZE_AT).ok_or_else(|| short(CHECK, ZBOOT_SIZE_AT, len))?;
    let (off, size) = (u64::from(off), u64::from(size));
    let field = head
        .get(ZBOOT_COMP_AT..ARM64_MAGIC_AT)
        .ok_or_else(|| short(CHECK, ZBOOT_COMP_AT, len))?;
    let name_len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let comp = std::str::from_utf8(&field[..name_len])
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric()))
        .ok_or_else(|| {
            CheckError::new(
                CHECK,
                ZBOOT_COMP_AT as u64,
                format!(
                    "compression name \"{}\" is not a name",
                    field[..name_len].escape_ascii()
                ),
            )
        })?;
    if size == 0 {
        return Err(CheckError::new(
            CHECK,
            ZBOOT_SIZE_AT as u64,
            "payload size is 0",
        ));
    }
    if off < MIN_LEN {
        return Err(CheckError::new(
            CHECK,
            ZBOOT_OFFSET_AT as u64,
            format!("payload offset {off} lies inside the header"),
        ));
    }
    let end = off + size;
    if end > len {
        return Err(CheckError::new(
            "zboot payload",
            off,
            format!(
                "payload of {size} bytes at offset {off} would end at {end}, past the end of the \
                 file ({len} bytes): truncated"
            ),
        ));
    }
    let decoded = match comp {
        "gzip" | "zstd" => Some(decode_payload(r, off, size, comp, limits)?),
        c if ZBOOT_UNDECODED.contains(&c) => None,
        other => {
            return Err(CheckError::new(
                CHECK,
                ZBOOT_COMP_AT as u64,
                format!("unknown payload compression {other:?}"),
            ))
        }
    };
    let detail = match decoded {
        Some(n) => format!("decodes to a {} arm64 Image", mb(n)),
        None => "payload not decoded".into(),
    };
    Ok(Verdict {
        format: format!("arm64 EFI zboot ({comp} payload, {}, {detail})", mb(size)),
    })
}

/// Keeps the first 64 bytes of what is written (the arm64 header) and counts the rest.
#[derive(Default)]
struct HeadSink {
    head: Vec<u8>,
    len: u64,
}

impl Write for HeadSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let keep = (MIN_LEN as usize)
            .saturating_sub(self.head.len())
            .min(buf.len());
        self.head.extend_from_slice(&buf[..keep]);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decodes the whole payload to a sink (a truncated or corrupt one fails its checksum or its
/// stream structure) and checks that it is an arm64 Image. Returns the decoded size.
fn decode_payload<R: Read + Seek>(
    r: &mut R,
    off: u64,
    size: u64,
    comp: &str,
    limits: &Limits,
) -> Result<u64, CheckError> {
    const CHECK: &str = "zboot payload";
    r.seek(SeekFrom::Start(off))
        .map_err(|e| CheckError::new(CHECK, off, format!("seek: {e}")))?;
    let input = BufReader::with_capacity(PAYLOAD_BUF, (&mut *r).take(size));
    let mut budget = Budget::new(limits.max_decompressed);
    let mut sink = HeadSink::default();
    let res = if comp == "zstd" {
        // The zboot build appends the decoded size after the frame: decode exactly one frame.
        crate::io::zstd_frame(input)
            .and_then(|dec| io::copy(&mut Capped::new(dec, &mut budget), &mut sink))
    } else {
        let dec = crate::io::gzip_member(input);
        io::copy(&mut Capped::new(dec, &mut budget), &mut sink)
    };
    match res {
        Err(e) if is_limit(&e) => {
            return Err(CheckError::new("decompression limit", off, e.to_string()))
        }
        Err(e) => {
            return Err(CheckError::new(
                CHECK,
                off,
                format!("{comp} payload is corrupt or truncated: {e}"),
            ))
        }
        Ok(_) => {}
    }
    if sink.head.get(ARM64_MAGIC_AT..ARM64_MAGIC_AT + 4) != Some(ARM64_MAGIC) {
        return Err(CheckError::new(
            CHECK,
            off,
            format!(
                "decoded payload ({} bytes) is not an arm64 Image: no ARMd magic at 0x38",
                sink.len
            ),
        ));
    }
    let image_size = le_u64(&sink.head, ARM64_IMAGE_SIZE_AT).unwrap_or(0);
    if let Some(reason) = arm64_image_size_problem(image_size) {
        return Err(CheckError::new(
            CHECK,
            off,
            format!("decoded arm64 Image: {reason}"),
        ));
    }
    Ok(sink.len)
}

fn bzimage(len: u64, head: &[u8]) -> Result<Verdict, CheckError> {
    const CHECK: &str = "bzImage header";
    if head.len() < X86_HEADER_END {
        return Err(short(CHECK, head.len(), len));
    }
    let version = le_u16(head, X86_VERSION_AT).ok_or_else(|| short(CHECK, X86_VERSION_AT, len))?;
    if version < 0x200 {
        return Err(CheckError::new(
            CHECK,
            X86_VERSION_AT as u64,
            format!(
                "boot protocol {}.{:02} predates bzImage",
                version >> 8,
                version & 0xff
            ),
        ));
    }
    if head[X86_LOADFLAGS_AT] & 1 == 0 {
        return Err(CheckError::new(
            CHECK,
            X86_LOADFLAGS_AT as u64,
            "LOADED_HIGH is not set: a zImage, not a bzImage",
        ));
    }
    let sects = match head[X86_SETUP_SECTS_AT] {
        0 => 4,
        n => u64::from(n),
    };
    let setup = (sects + 1) * 512;
    if setup > len {
        return Err(CheckError::new(
            "bzImage setup",
            X86_SETUP_SECTS_AT as u64,
            format!(
                "{sects} setup sectors plus the boot sector need {setup} bytes, the file has \
                 {len}: truncated"
            ),
        ));
    }
    let syssize = le_u32(head, X86_SYSSIZE_AT).ok_or_else(|| short(CHECK, X86_SYSSIZE_AT, len))?;
    let protected = u64::from(syssize) * 16;
    if protected == 0 {
        return Err(CheckError::new(
            CHECK,
            X86_SYSSIZE_AT as u64,
            "syssize is 0: no protected-mode kernel",
        ));
    }
    if protected > len - setup {
        return Err(CheckError::new(
            "bzImage payload",
            setup,
            format!(
                "the protected-mode kernel needs {protected} bytes (syssize), only {} follow \
                 the setup: truncated",
                len - setup
            ),
        ));
    }
    // Since 2.08 the header also locates the compressed payload inside the protected-mode part.
    if version >= 0x208 {
        let pl_off =
            le_u32(head, X86_PAYLOAD_AT).ok_or_else(|| short(CHECK, X86_PAYLOAD_AT, len))?;
        let pl_len = le_u32(head, X86_PAYLOAD_AT + 4)
            .ok_or_else(|| short(CHECK, X86_PAYLOAD_AT + 4, len))?;
        let pl_end = u64::from(pl_off) + u64::from(pl_len);
        if pl_end > protected {
            return Err(CheckError::new(
                "bzImage payload",
                X86_PAYLOAD_AT as u64,
                format!(
                    "compressed payload [{pl_off}, {pl_end}) lies outside the {protected}-byte \
                     protected-mode kernel"
                ),
            ));
        }
    }
    Ok(Verdict {
        format: format!(
            "x86 bzImage (boot protocol {}.{:02}, {})",
            version >> 8,
            version & 0xff,
            mb(len)
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::super::testdata::{self, arm64_image, bzimage, noise, zboot, zboot_with};
    use super::*;

    fn check(bytes: &[u8]) -> Result<Verdict, CheckError> {
        check_kernel(Cursor::new(bytes), bytes.len() as u64)
    }

    #[test]
    fn zboot_zstd_accepted() {
        let k = zboot("zstd");
        let v = check(&k).unwrap();
        assert!(
            v.format.starts_with("arm64 EFI zboot (zstd payload,"),
            "{v}"
        );
        assert!(v.format.contains("decodes to a"), "{v}");
    }

    #[test]
    fn zboot_gzip_accepted() {
        let v = check(&zboot("gzip")).unwrap();
        assert!(
            v.format.starts_with("arm64 EFI zboot (gzip payload,"),
            "{v}"
        );
    }

    #[test]
    fn zboot_undecoded_compression_accepted_but_unknown_rejected() {
        let v = check(&zboot_with("lz4", b"not decoded here")).unwrap();
        assert!(v.format.contains("payload not decoded"), "{v}");
        let err = check(&zboot_with("brotli", b"x")).unwrap_err();
        assert_eq!((err.check, err.offset), ("zboot header", 24), "{err}");
    }

    #[test]
    fn zboot_payload_past_eof_rejected() {
        let mut k = zboot("zstd");
        // The size field points 1 byte past the end of the file.
        let off = u32::from_le_bytes([k[8], k[9], k[10], k[11]]);
        let size = k.len() as u32 - off + 1;
        k[12..16].copy_from_slice(&size.to_le_bytes());
        let err = check(&k).unwrap_err();
        assert_eq!(
            (err.check, err.offset),
            ("zboot payload", u64::from(off)),
            "{err}"
        );
        assert!(err.reason.contains("truncated"), "{err}");
        // The same file cut short.
        let k = zboot("gzip");
        let err = check(&k[..k.len() - 600]).unwrap_err();
        assert_eq!(err.check, "zboot payload", "{err}");
    }

    #[test]
    fn zboot_corrupt_payload_rejected() {
        for comp in ["zstd", "gzip"] {
            let mut k = zboot(comp);
            let off = u32::from_le_bytes([k[8], k[9], k[10], k[11]]) as usize;
            let size = u32::from_le_bytes([k[12], k[13], k[14], k[15]]) as usize;
            k[off + size / 2] ^= 0x04;
            let err = check(&k).unwrap_err();
            assert_eq!(
                (err.check, err.offset),
                ("zboot payload", off as u64),
                "{comp}: {err}"
            );
            assert!(err.reason.contains("corrupt"), "{comp}: {err}");
        }
        // A size field that cuts the frame short: the decoder runs out mid-frame.
        let mut k = zboot("zstd");
        let size = u32::from_le_bytes([k[12], k[13], k[14], k[15]]);
        k[12..16].copy_from_slice(&(size - 100).to_le_bytes());
        let err = check(&k).unwrap_err();
        assert_eq!(err.check, "zboot payload", "{err}");
    }

    #[test]
    fn zboot_payload_that_is_no_arm64_image_rejected() {
        let k = zboot_with("zstd", &testdata::zstd(&noise(100_000, 5)));
        let err = check(&k).unwrap_err();
        assert_eq!(err.check, "zboot payload", "{err}");
        assert!(err.reason.contains("ARMd"), "{err}");
    }

    #[test]
    fn zboot_decompression_limit() {
        let k = zboot("zstd");
        let err = check_kernel_with(
            Cursor::new(&k),
            k.len() as u64,
            &Limits {
                max_decompressed: 1000,
            },
        )
        .unwrap_err();
        assert_eq!(err.check, "decompression limit", "{err}");
    }

    #[test]
    fn raw_arm64_image_accepted() {
        let v = check(&arm64_image(300_000)).unwrap();
        assert!(v.format.starts_with("arm64 Image ("), "{v}");
        let mut zero = arm64_image(300_000);
        zero[16..24].fill(0);
        let err = check(&zero).unwrap_err();
        assert_eq!((err.check, err.offset), ("arm64 Image header", 16), "{err}");
    }

    #[test]
    fn arm64_image_with_efi_stub_checks_its_sections() {
        let k = testdata::arm64_efi_image(300_000);
        let v = check(&k).unwrap();
        assert!(v.format.starts_with("arm64 Image with EFI stub"), "{v}");
        let err = check(&k[..k.len() - 4096]).unwrap_err();
        assert_eq!(err.check, "PE section", "{err}");
    }

    #[test]
    fn bzimage_accepted_and_truncated_rejected() {
        let k = bzimage(0, 200_000);
        let v = check(&k).unwrap();
        assert!(
            v.format.starts_with("x86 bzImage (boot protocol 2.15"),
            "{v}"
        );
        let k = bzimage(30, 200_000);
        check(&k).unwrap();
        let err = check(&k[..k.len() - 1]).unwrap_err();
        assert_eq!(
            (err.check, err.offset),
            ("bzImage payload", 31 * 512),
            "{err}"
        );
        let err = check(&k[..20 * 512]).unwrap_err();
        assert_eq!((err.check, err.offset), ("bzImage setup", 0x1f1), "{err}");
    }

    #[test]
    fn generic_pe_image_accepted_and_truncated_rejected() {
        let k = testdata::pe(0x8664, &[(".text", &noise(10_000, 4)), (".data", b"data")]);
        let v = check(&k).unwrap();
        assert!(
            v.format
                .starts_with("PE/EFI application (x86_64, 2 sections"),
            "{v}"
        );
        // Cutting only .data's alignment padding leaves every section whole.
        check(&k[..k.len() - 100]).unwrap();
        let err = check(&k[..k.len() - 0x200 - 300]).unwrap_err();
        assert_eq!(err.check, "PE section", "{err}");
        assert!(err.reason.contains(".text"), "{err}");
    }

    #[test]
    fn random_and_short_files_rejected() {
        let err = check(&noise(1 << 20, 42)).unwrap_err();
        assert_eq!((err.check, err.offset), ("kernel format", 0), "{err}");
        let err = check(b"MZ").unwrap_err();
        assert_eq!(err.check, "kernel header", "{err}");
        // MZ without a PE header behind it.
        let mut mz = noise(8192, 7);
        mz[..2].copy_from_slice(b"MZ");
        mz[0x38..0x40].fill(0);
        mz[0x202..0x206].fill(0);
        let err = check(&mz).unwrap_err();
        assert_eq!(err.check, "PE header", "{err}");
    }

    #[test]
    fn stated_length_longer_than_file_rejected() {
        let k = arm64_image(1000);
        let err = check_kernel(Cursor::new(&k), 5000).unwrap_err();
        assert_eq!((err.check, err.offset), ("kernel read", 1000), "{err}");
    }

    #[test]
    fn the_stream_check_agrees_with_the_file_check() {
        let kernels = [
            zboot("zstd"),
            zboot("gzip"),
            zboot_with("lz4", b"not decoded here"),
            arm64_image(300 << 10),
            testdata::arm64_efi_image(300 << 10),
            bzimage(0, 200 << 10),
            testdata::pe(0x8664, &[(".text", &noise(100 << 10, 5))]),
            noise(70 << 10, 9),
        ];
        let mut compared = 0;
        for k in &kernels {
            // Whole, cut at a few places (the length given stays the full one), and short.
            for cut in [k.len(), k.len() - 1, k.len() / 2, 0x1000, 100, 10] {
                let bytes = &k[..cut.min(k.len())];
                for len in [bytes.len() as u64, k.len() as u64] {
                    let file = check_kernel_with(Cursor::new(bytes), len, &Limits::default());
                    let stream = check_kernel_stream(bytes, len, &Limits::default())
                        .expect("no kernel here needs random access");
                    assert_eq!(
                        format!("{file:?}"),
                        format!("{stream:?}"),
                        "cut {cut} len {len}"
                    );
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, kernels.len() * 12);
    }
}
