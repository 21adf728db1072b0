//! Unified kernel images (Talos installer >= v1.10 ships only `vmlinuz.efi`): split out `.linux`,
//! `.initrd` and `.cmdline` for netboot, checking the kernel and initramfs like any others as
//! they are split out.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::pe::{self, Section};
use super::{check_as, check_stream, CheckError, Kind, Limits, Verdict};
use crate::io::Beside;

/// A command line, os-release or uname is a few KB at most; more means a wrong section.
const MAX_CMDLINE: u64 = 1 << 20;

/// What came out of a UKI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UkiParts {
    pub kernel: Verdict,
    pub initramfs: Verdict,
    /// The `.cmdline` section as text, trailing NULs trimmed; empty when the UKI has none.
    pub cmdline: String,
    /// The `.osrel` section (os-release format), when there is one.
    pub osrel: Option<String>,
    /// The `.uname` section (the kernel release), when there is one.
    pub uname: Option<String>,
}

impl UkiParts {
    /// What `.osrel` names the system: `PRETTY_NAME`, else `NAME VERSION_ID`.
    pub fn os_release(&self) -> Option<String> {
        let text = self.osrel.as_deref()?;
        let field = |key: &str| {
            text.lines().find_map(|l| {
                let v = l.strip_prefix(key)?.strip_prefix('=')?;
                let v = v.trim().trim_matches('"').trim_matches('\'').trim();
                (!v.is_empty()).then(|| v.to_string())
            })
        };
        field("PRETTY_NAME").or_else(|| match (field("NAME"), field("VERSION_ID")) {
            (Some(n), Some(v)) => Some(format!("{n} {v}")),
            (n, v) => n.or(v),
        })
    }
}

#[cfg(test)]
/// Extracts with the default [`Limits`].
pub fn extract_uki(
    uki: &Path,
    kernel_out: &Path,
    initrd_out: &Path,
    cmdline_out: &Path,
) -> Result<UkiParts, CheckError> {
    extract_uki_with(uki, kernel_out, initrd_out, cmdline_out, &Limits::default())
}

/// Extracts a UKI's `.linux`, `.initrd` and `.cmdline` sections into three files and checks the
/// kernel and initramfs. Sections are bounded by min(VirtualSize, SizeOfRawData) (a VirtualSize
/// of 0 means SizeOfRawData, as firmware reads it). The first section of each name counts; the
/// two are split and checked side by side. The
/// output files are created or truncated, not synced; on error they may hold partial data, so
/// point them into a staging directory.
pub fn extract_uki_with(
    uki: &Path,
    kernel_out: &Path,
    initrd_out: &Path,
    cmdline_out: &Path,
    limits: &Limits,
) -> Result<UkiParts, CheckError> {
    let mut file =
        File::open(uki).map_err(|e| CheckError::new("uki read", 0, format!("cannot open: {e}")))?;
    let len = file
        .metadata()
        .map_err(|e| CheckError::new("uki read", 0, format!("cannot stat: {e}")))?
        .len();
    let info = pe::parse(&mut file)?;
    let find = |name: &str| {
        info.section(name).cloned().ok_or_else(|| {
            CheckError::new(
                "uki sections",
                info.table_at,
                format!("no {name} section: not a UKI, or an incomplete one"),
            )
        })
    };
    let linux = find(".linux")?;
    let initrd = find(".initrd")?;
    let cmdline = info.section(".cmdline").cloned();
    for (s, check) in [
        (&linux, "uki .linux section"),
        (&initrd, "uki .initrd section"),
    ] {
        pe::check_in_file(s, len, check)?;
        if s.file_range().1 == 0 {
            return Err(CheckError::new(
                check,
                s.header_at,
                format!("section {} is empty", s.name),
            ));
        }
    }

    // The two sections are copied side by side, each checked as it is copied (on a thread
    // beside the copy), so nothing is read back.
    let (kernel, initramfs) = std::thread::scope(|scope| {
        let k = scope.spawn(|| {
            split_section(
                uki,
                &linux,
                kernel_out,
                Kind::Kernel,
                "uki .linux section",
                limits,
            )
        });
        let i = scope.spawn(|| {
            split_section(
                uki,
                &initrd,
                initrd_out,
                Kind::Initramfs,
                "uki .initrd section",
                limits,
            )
        });
        let joined = |h: std::thread::ScopedJoinHandle<'_, Result<Verdict, CheckError>>| {
            h.join().unwrap_or_else(|_| {
                Err(CheckError::new("uki split", 0, "a section check panicked"))
            })
        };
        (joined(k), joined(i))
    });
    let (kernel, initramfs) = (kernel?, initramfs?);
    let osrel = info.section(".osrel").cloned();
    let uname = info.section(".uname").cloned();
    let cmdline = match cmdline {
        Some(s) => read_text(&mut file, &s, len, "uki .cmdline section")?,
        None => String::new(),
    };
    let osrel = match osrel {
        Some(s) => Some(read_text(&mut file, &s, len, "uki .osrel section")?),
        None => None,
    };
    let uname = match uname {
        Some(s) => Some(
            read_text(&mut file, &s, len, "uki .uname section")?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    std::fs::write(cmdline_out, cmdline.as_bytes())
        .map_err(|e| write_error("uki .cmdline section", cmdline_out, e))?;

    Ok(UkiParts {
        kernel,
        initramfs,
        cmdline,
        osrel,
        uname,
    })
}

fn write_error(check: &'static str, path: &Path, e: io::Error) -> CheckError {
    CheckError::new(check, 0, format!("{}: {e}", path.display()))
}

/// Offsets of a check on an extracted section, moved to where they are in the UKI.
fn in_section(e: CheckError, s: &Section) -> CheckError {
    let (at, _) = s.file_range();
    CheckError::new(
        e.check,
        at + e.offset,
        format!(
            "in UKI section {} (at offset {at}), offset {} of it: {}",
            s.name, e.offset, e.reason
        ),
    )
}

/// Chunks in flight between a section's copy and its check.
const CHECK_DEPTH: usize = 8;
const COPY_BUF: usize = 64 * 1024;

/// Copies exactly the section's bytes into `out`, checked as `kind` while they are copied (a
/// kernel that needs random access is checked from `out` afterwards); a file that shrank
/// underneath us is an error. Offsets in errors are the UKI's.
fn split_section(
    uki: &Path,
    s: &Section,
    out: &Path,
    kind: Kind,
    check: &'static str,
    limits: &Limits,
) -> Result<Verdict, CheckError> {
    let (at, size) = s.file_range();
    let mut file =
        File::open(uki).map_err(|e| CheckError::new(check, at, format!("cannot open: {e}")))?;
    file.seek(SeekFrom::Start(at))
        .map_err(|e| CheckError::new(check, at, format!("seek: {e}")))?;
    let mut dest = File::create(out).map_err(|e| write_error(check, out, e))?;
    let lim = *limits;
    let mut beside = Beside::spawn(&format!("uki-{kind}-check"), CHECK_DEPTH, move |r| {
        check_stream(kind, r, size, &lim)
    });
    let mut section = (&mut file).take(size);
    let mut buf = vec![0u8; COPY_BUF];
    let mut copied = 0u64;
    loop {
        let n = match section.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CheckError::new(check, at + copied, format!("read: {e}"))),
        };
        dest.write_all(&buf[..n])
            .map_err(|e| CheckError::new(check, at, format!("copy to {}: {e}", out.display())))?;
        if let Some(b) = &mut beside {
            b.feed(&buf[..n]);
        }
        copied += n as u64;
    }
    if copied != size {
        return Err(CheckError::new(
            check,
            at + copied,
            format!("section {} ends after {copied} of {size} bytes", s.name),
        ));
    }
    dest.flush().map_err(|e| write_error(check, out, e))?;
    let verdict = match beside.and_then(Beside::finish).flatten() {
        Some(v) => v,
        None => {
            let f = File::open(out).map_err(|e| write_error(check, out, e))?;
            check_as(kind, f, size, limits)
        }
    };
    verdict.map_err(|e| in_section(e, s))
}

/// A small text section (command line, os-release, uname), trailing NULs trimmed.
fn read_text(
    file: &mut File,
    s: &Section,
    len: u64,
    check: &'static str,
) -> Result<String, CheckError> {
    pe::check_in_file(s, len, check)?;
    let (at, size) = s.file_range();
    if size > MAX_CMDLINE {
        return Err(CheckError::new(
            check,
            at,
            format!("{size} bytes: too large for a text section"),
        ));
    }
    file.seek(SeekFrom::Start(at))
        .map_err(|e| CheckError::new(check, at, format!("seek: {e}")))?;
    let mut bytes = Vec::new();
    (&mut *file)
        .take(size)
        .read_to_end(&mut bytes)
        .map_err(|e| CheckError::new(check, at, e.to_string()))?;
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    String::from_utf8(bytes).map_err(|e| {
        CheckError::new(
            check,
            at + e.utf8_error().valid_up_to() as u64,
            "not UTF-8 text",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::check_kernel_with;
    use super::super::testdata::{self, cpio, zboot, zstd};
    use super::*;

    const CMDLINE: &str = "talos.platform=metal console=ttyAMA0 init_on_alloc=1";

    struct Fixture {
        dir: tempfile::TempDir,
        kernel: Vec<u8>,
        initrd: Vec<u8>,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                dir: tempfile::tempdir().unwrap(),
                kernel: zboot("zstd"),
                initrd: zstd(&cpio(&[
                    ("init", b"#!/bin/sh\n"),
                    ("etc/hostname", b"node\n"),
                ])),
            }
        }

        fn write(&self, uki: &[u8]) -> std::path::PathBuf {
            let path = self.dir.path().join("vmlinuz.efi");
            std::fs::write(&path, uki).unwrap();
            path
        }

        fn extract(&self, uki: &[u8]) -> Result<UkiParts, CheckError> {
            let path = self.write(uki);
            let d = self.dir.path();
            extract_uki(
                &path,
                &d.join("vmlinuz"),
                &d.join("initramfs.xz"),
                &d.join("cmdline"),
            )
        }

        fn out(&self, name: &str) -> Vec<u8> {
            std::fs::read(self.dir.path().join(name)).unwrap()
        }
    }

    #[test]
    fn uki_extracted_byte_for_byte_and_checked() {
        let f = Fixture::new();
        let uki = testdata::uki(&f.kernel, &f.initrd, CMDLINE);
        let parts = f.extract(&uki).unwrap();
        assert_eq!(f.out("vmlinuz"), f.kernel);
        assert_eq!(f.out("initramfs.xz"), f.initrd);
        assert_eq!(f.out("cmdline"), CMDLINE.as_bytes());
        assert_eq!(parts.cmdline, CMDLINE);
        assert!(
            parts
                .kernel
                .format
                .starts_with("arm64 EFI zboot (zstd payload"),
            "{}",
            parts.kernel
        );
        assert!(
            parts
                .initramfs
                .format
                .starts_with("initramfs: 1 member (zstd), 2 entries"),
            "{}",
            parts.initramfs
        );
        // The same file as a plain kernel: a PE/EFI application that is a UKI.
        let v = check_kernel_with(
            std::io::Cursor::new(&uki),
            uki.len() as u64,
            &Limits::default(),
        )
        .unwrap();
        assert!(
            v.format
                .starts_with("PE/EFI application (arm64, 4 sections, UKI"),
            "{v}"
        );
    }

    #[test]
    fn uki_without_cmdline_gives_empty_cmdline() {
        let f = Fixture::new();
        let uki = testdata::pe(0xAA64, &[(".linux", &f.kernel), (".initrd", &f.initrd)]);
        let parts = f.extract(&uki).unwrap();
        assert_eq!(parts.cmdline, "");
        assert_eq!(f.out("cmdline"), b"");
    }

    #[test]
    fn uki_missing_initrd_rejected() {
        let f = Fixture::new();
        let uki = testdata::pe(
            0xAA64,
            &[(".cmdline", CMDLINE.as_bytes()), (".linux", &f.kernel)],
        );
        let err = f.extract(&uki).unwrap_err();
        assert_eq!(err.check, "uki sections", "{err}");
        assert!(err.reason.contains(".initrd"), "{err}");
    }

    #[test]
    fn uki_section_past_eof_rejected() {
        let f = Fixture::new();
        let mut uki = testdata::uki(&f.kernel, &f.initrd, CMDLINE);
        // Point .initrd's PointerToRawData past the end of the file.
        let header = testdata::section_header_at(&uki, ".initrd").unwrap();
        let ptr = uki.len() as u32 + 0x1000;
        uki[header + 20..header + 24].copy_from_slice(&ptr.to_le_bytes());
        let err = f.extract(&uki).unwrap_err();
        assert_eq!(
            (err.check, err.offset),
            ("uki .initrd section", u64::from(ptr)),
            "{err}"
        );
        // A UKI cut short inside its last section.
        let uki = testdata::uki(&f.kernel, &f.initrd, CMDLINE);
        let err = f.extract(&uki[..uki.len() - 1000]).unwrap_err();
        assert_eq!(err.check, "uki .initrd section", "{err}");
    }

    #[test]
    fn uki_with_corrupt_initrd_rejected_at_its_uki_offset() {
        let f = Fixture::new();
        let mut initrd = f.initrd.clone();
        initrd.truncate(initrd.len() - 8);
        let uki = testdata::uki(&f.kernel, &initrd, CMDLINE);
        let header = testdata::section_header_at(&uki, ".initrd").unwrap();
        let ptr = u32::from_le_bytes(uki[header + 20..header + 24].try_into().unwrap());
        let err = f.extract(&uki).unwrap_err();
        assert_eq!(
            (err.check, err.offset),
            ("initramfs member (zstd)", u64::from(ptr)),
            "{err}"
        );
        assert!(err.reason.contains("in UKI section .initrd"), "{err}");
    }

    #[test]
    fn non_pe_file_rejected() {
        let f = Fixture::new();
        let err = f.extract(&f.initrd).unwrap_err();
        assert_eq!((err.check, err.offset), ("PE header", 0), "{err}");
    }
}
