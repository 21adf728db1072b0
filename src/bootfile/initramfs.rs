//! Initramfs check: one streaming pass over concatenated members (zstd, xz, gzip, raw cpio), each
//! decoded to its end and its cpio newc stream parsed, following the rules of the kernel's own
//! unpacker (init/initramfs.c) so that what passes here also unpacks there.

use std::io::{self, BufRead, BufReader, Read};

use super::{mb, CheckError, Limits, Verdict};
use crate::io::{is_limit, read_full, skip_exact, skip_zeros, Budget, Capped, Source};

const SOURCE_BUF: usize = 256 * 1024;
const DECODED_BUF: usize = 64 * 1024;
const HEADER_LEN: usize = 110;
/// The kernel skips entries with longer names; in practice a longer one is a corrupt header.
const PATH_MAX: u64 = 4096;
const TRAILER: &[u8] = b"TRAILER!!!";
const FIELDS: [&str; 13] = [
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    Zstd,
    Xz,
    Gzip,
    Cpio,
}

impl Member {
    fn name(self) -> &'static str {
        match self {
            Member::Zstd => "zstd",
            Member::Xz => "xz",
            Member::Gzip => "gzip",
            Member::Cpio => "cpio",
        }
    }

    fn check(self) -> &'static str {
        match self {
            Member::Zstd => "initramfs member (zstd)",
            Member::Xz => "initramfs member (xz)",
            Member::Gzip => "initramfs member (gzip)",
            Member::Cpio => "initramfs member (cpio)",
        }
    }
}

enum Sniff {
    Member(Member),
    /// Something the kernel may know but this checker does not decode.
    Unsupported(&'static str),
    Unknown,
}

fn sniff(head: &[u8]) -> Sniff {
    if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        Sniff::Member(Member::Zstd)
    } else if head.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0x00]) {
        Sniff::Member(Member::Xz)
    } else if head.starts_with(&[0x1F, 0x8B]) {
        Sniff::Member(Member::Gzip)
    } else if head.first() == Some(&b'0') {
        // The kernel treats any '0' as the start of a raw archive; the header check says more.
        Sniff::Member(Member::Cpio)
    } else if head.starts_with(&[0x5D, 0x00, 0x00]) {
        Sniff::Unsupported("lzma")
    } else if head.starts_with(b"BZh") {
        Sniff::Unsupported("bzip2")
    } else if head.starts_with(&[0x02, 0x21, 0x4C, 0x18])
        || head.starts_with(&[0x04, 0x22, 0x4D, 0x18])
    {
        Sniff::Unsupported("lz4")
    } else if head.starts_with(&[0x89, b'L', b'Z', b'O']) {
        Sniff::Unsupported("lzo")
    } else {
        Sniff::Unknown
    }
}

/// Whether a file's first bytes are those of an initramfs member this checker walks (a raw
/// archive by its full cpio magic, not just the kernel's leading '0').
pub(crate) fn looks_like_initramfs(head: &[u8]) -> bool {
    match sniff(head) {
        Sniff::Member(Member::Cpio) => head.starts_with(b"07070"),
        Sniff::Member(_) => true,
        _ => false,
    }
}

#[derive(Default)]
struct Stats {
    /// cpio entries other than trailers.
    entries: u64,
    archives: u64,
    /// The last entry seen was `TRAILER!!!`: the file ends with a complete archive.
    last_was_trailer: bool,
    /// Bytes of cpio stream walked, padding included.
    cpio_bytes: u64,
}

enum WalkError {
    /// From the decoder or the file underneath (corrupt or truncated member, read error, limit).
    Io(io::Error),
    /// The cpio structure itself is wrong; `at` counts from the start of the member's stream.
    Bad {
        check: &'static str,
        at: u64,
        reason: String,
    },
}

impl From<io::Error> for WalkError {
    fn from(e: io::Error) -> Self {
        WalkError::Io(e)
    }
}

fn bad(check: &'static str, at: u64, reason: impl Into<String>) -> WalkError {
    WalkError::Bad {
        check,
        at,
        reason: reason.into(),
    }
}

#[cfg(test)]
/// Checks an initramfs with the default [`Limits`].
pub fn check_initramfs<R: Read>(r: R) -> Result<Verdict, CheckError> {
    check_initramfs_with(r, &Limits::default())
}

/// Checks an initramfs in one pass over `r` (no seeking; memory stays flat): every member is
/// decoded to its end and every cpio archive in it parsed up to its trailer.
pub fn check_initramfs_with<R: Read>(r: R, limits: &Limits) -> Result<Verdict, CheckError> {
    let mut src = Source::new(r, SOURCE_BUF);
    let mut budget = Budget::new(limits.max_decompressed);
    let mut members: Vec<Member> = Vec::new();
    let mut stats = Stats::default();
    let mut last_start = 0;
    loop {
        skip_zeros(&mut src).map_err(|e| read_error(&src, e))?;
        let start = src.pos();
        let head = match src.peek(6) {
            Ok(head) => head,
            Err(e) => return Err(read_error(&src, e)),
        };
        if head.is_empty() {
            break;
        }
        let n = members.len() + 1;
        let member = match sniff(head) {
            Sniff::Member(m) => m,
            Sniff::Unsupported(name) => {
                return Err(CheckError::new(
                    "initramfs magic",
                    start,
                    format!(
                        "member {n} is {name}-compressed; only zstd, xz, gzip and raw cpio are \
                         checked"
                    ),
                ))
            }
            Sniff::Unknown => {
                let hex = hex::encode(head);
                let reason = if members.is_empty() {
                    format!("unknown magic {hex}: not an initramfs (zstd, xz, gzip or cpio)")
                } else {
                    format!(
                        "unknown magic {hex} after member {}: garbage after the last member",
                        n - 1
                    )
                };
                return Err(CheckError::new("initramfs magic", start, reason));
            }
        };
        members.push(member);
        last_start = start;
        let walked = match member {
            Member::Cpio => {
                // The kernel only takes a raw archive at a 4-byte aligned file offset.
                if !start.is_multiple_of(4) {
                    return Err(CheckError::new(
                        member.check(),
                        start,
                        format!(
                            "member {n}: raw cpio starts at offset {start}, not 4-byte aligned \
                             (the kernel rejects it)"
                        ),
                    ));
                }
                walk_cpio(&mut src, true, &mut stats)
            }
            // One frame per member, as the kernel does; a following frame is sniffed anew.
            Member::Zstd => match crate::io::zstd_frame(&mut src) {
                Ok(dec) => walk_decoded(dec, &mut budget, &mut stats),
                Err(e) => Err(WalkError::Io(e)),
            },
            Member::Xz => match crate::io::xz_stream(&mut src) {
                Ok(dec) => walk_decoded(dec, &mut budget, &mut stats),
                Err(e) => Err(WalkError::Io(e)),
            },
            Member::Gzip => walk_decoded(crate::io::gzip_member(&mut src), &mut budget, &mut stats),
        };
        match walked {
            Ok(bytes) => stats.cpio_bytes += bytes,
            Err(e) => return Err(member_error(e, member, n, start)),
        }
    }
    if members.is_empty() {
        return Err(CheckError::new(
            "initramfs",
            src.pos(),
            "no members: the file is empty or all zero bytes",
        ));
    }
    if !stats.last_was_trailer {
        return Err(CheckError::new(
            "cpio trailer",
            last_start,
            format!(
                "member {} ({}) ends without a TRAILER!!! entry: the archive is incomplete",
                members.len(),
                members[members.len() - 1].name()
            ),
        ));
    }
    Ok(Verdict {
        format: format!(
            "initramfs: {} member{} ({}), {} entr{}, {} of cpio",
            members.len(),
            if members.len() == 1 { "" } else { "s" },
            member_list(&members),
            stats.entries,
            if stats.entries == 1 { "y" } else { "ies" },
            mb(stats.cpio_bytes)
        ),
    })
}

fn read_error<R: Read>(src: &Source<R>, e: io::Error) -> CheckError {
    CheckError::new("initramfs read", src.pos(), e.to_string())
}

fn member_error(e: WalkError, member: Member, n: usize, start: u64) -> CheckError {
    match e {
        WalkError::Io(e) if is_limit(&e) => CheckError::new(
            "decompression limit",
            start,
            format!("member {n} ({}): {e}", member.name()),
        ),
        WalkError::Io(e) => CheckError::new(
            member.check(),
            start,
            format!("member {n} is corrupt or truncated: {e}"),
        ),
        WalkError::Bad { check, at, reason } => {
            let reason = match member {
                Member::Cpio => format!(
                    "member {n} (raw cpio), file offset {}: {reason}",
                    start + at
                ),
                _ => format!(
                    "member {n} ({}), byte {at} of its decoded cpio stream: {reason}",
                    member.name()
                ),
            };
            CheckError::new(check, start, reason)
        }
    }
}

/// "zstd, xz" for a few members; counts per kind for many (one zstd frame each, say).
fn member_list(members: &[Member]) -> String {
    if members.len() <= 6 {
        return members
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ");
    }
    let mut counts: Vec<(Member, usize)> = Vec::new();
    for &m in members {
        match counts.iter_mut().find(|(k, _)| *k == m) {
            Some((_, c)) => *c += 1,
            None => counts.push((m, 1)),
        }
    }
    counts
        .iter()
        .map(|(m, c)| format!("{c} {}", m.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn walk_decoded<D: Read>(dec: D, budget: &mut Budget, stats: &mut Stats) -> Result<u64, WalkError> {
    let mut decoded = BufReader::with_capacity(DECODED_BUF, Capped::new(dec, budget));
    walk_cpio(&mut decoded, false, stats)
}

/// Walks a cpio newc stream entry by entry. `raw`: the stream is the file itself, so the archive
/// ends where a non-'0' byte (the next member's magic) follows; otherwise it is a decoded member,
/// which must end cleanly between entries (the kernel's "junk at the end of compressed archive").
/// Returns the bytes walked.
fn walk_cpio<R: BufRead>(r: &mut R, raw: bool, stats: &mut Stats) -> Result<u64, WalkError> {
    let mut pos = 0u64;
    let mut header = [0u8; HEADER_LEN];
    loop {
        pos += skip_zeros(r)?;
        let next = match r.fill_buf()?.first() {
            None => return Ok(pos),
            Some(&b) => b,
        };
        if !pos.is_multiple_of(4) {
            return Err(bad(
                "cpio padding",
                pos,
                format!("data resumes at byte {pos}, not 4-byte aligned (broken padding)"),
            ));
        }
        if next != b'0' {
            if raw {
                return Ok(pos);
            }
            return Err(bad(
                "cpio header",
                pos,
                format!(
                    "byte {next:#04x} where a cpio header or the end of the member should be \
                     (junk after the archive)"
                ),
            ));
        }
        entry(r, &mut pos, &mut header, stats)?;
    }
}

/// Parses one entry (header, name, data, padding) starting at `*pos`.
fn entry<R: BufRead>(
    r: &mut R,
    pos: &mut u64,
    header: &mut [u8; HEADER_LEN],
    stats: &mut Stats,
) -> Result<(), WalkError> {
    let at = *pos;
    let got = read_full(r, header)?;
    if got < HEADER_LEN {
        return Err(bad(
            "cpio header",
            at,
            format!("truncated: stream ends {got} bytes into a {HEADER_LEN}-byte header"),
        ));
    }
    *pos += HEADER_LEN as u64;
    let with_checksum = match &header[..6] {
        b"070701" => false,
        b"070702" => true,
        b"070707" => {
            return Err(bad(
                "cpio header",
                at,
                "old portable (odc) cpio format; the kernel needs newc (070701)",
            ))
        }
        magic => {
            return Err(bad(
                "cpio header",
                at,
                format!("bad magic \"{}\" (want 070701)", magic.escape_ascii()),
            ))
        }
    };
    let mut fields = [0u64; 13];
    for (i, field) in fields.iter_mut().enumerate() {
        let text = &header[6 + i * 8..14 + i * 8];
        *field = parse_hex(text).ok_or_else(|| {
            bad(
                "cpio header",
                at,
                format!(
                    "field {} is \"{}\", not 8 hex digits",
                    FIELDS[i],
                    text.escape_ascii()
                ),
            )
        })?;
    }
    let (mode, filesize, namesize, check) = (fields[1], fields[6], fields[11], fields[12]);
    if namesize == 0 || namesize > PATH_MAX {
        return Err(bad(
            "cpio header",
            at,
            format!("name size {namesize} is outside 1..={PATH_MAX}"),
        ));
    }
    // Bounded by PATH_MAX above.
    let mut name = vec![0u8; namesize as usize];
    let got = read_full(r, &mut name)?;
    if got < name.len() {
        return Err(bad(
            "cpio name",
            *pos,
            format!("truncated: stream ends {got} bytes into a {namesize}-byte name"),
        ));
    }
    *pos += namesize;
    if name.pop() != Some(0) {
        return Err(bad(
            "cpio name",
            *pos - namesize,
            format!("name \"{}\" is not NUL-terminated", name.escape_ascii()),
        ));
    }
    skip_padding(r, pos)?;
    let shown = String::from_utf8_lossy(&name).into_owned();
    let is_trailer = name == TRAILER;
    let data_at = *pos;
    let mut sum = 0u32;
    let got = skip_exact(r, filesize, with_checksum.then_some(&mut sum))?;
    if got < filesize {
        return Err(bad(
            "cpio data",
            data_at,
            format!("entry {shown:?}: truncated, {got} of {filesize} data bytes present"),
        ));
    }
    *pos += filesize;
    // The kernel verifies 070702 checksums of regular files ("bad data checksum").
    if with_checksum && mode & 0o170000 == 0o100000 && u64::from(sum) != check {
        return Err(bad(
            "cpio checksum",
            data_at,
            format!("entry {shown:?}: data sums to {sum:#010x}, header says {check:#010x}"),
        ));
    }
    skip_padding(r, pos)?;
    if is_trailer {
        stats.archives += 1;
    } else {
        stats.entries += 1;
    }
    stats.last_was_trailer = is_trailer;
    Ok(())
}

/// Skips to the next 4-byte boundary; the padding must be there even at the end of a stream.
fn skip_padding<R: BufRead>(r: &mut R, pos: &mut u64) -> Result<(), WalkError> {
    let pad = (4 - *pos % 4) % 4;
    let got = skip_exact(r, pad, None)?;
    if got < pad {
        return Err(bad(
            "cpio padding",
            *pos,
            format!("truncated: stream ends inside {pad} bytes of alignment padding"),
        ));
    }
    *pos += pad;
    Ok(())
}

fn parse_hex(text: &[u8]) -> Option<u64> {
    text.iter().try_fold(0u64, |acc, &c| {
        let digit = (c as char).to_digit(16)?;
        Some(acc << 4 | u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::super::testdata::{self, cpio, cpio_crc, gzip, noise, xz, zstd};
    use super::*;

    fn files() -> Vec<(String, Vec<u8>)> {
        vec![
            ("init".to_string(), b"#!/bin/sh\nexec /sbin/init\n".to_vec()),
            ("etc/os-release".to_string(), b"ID=talos\n".to_vec()),
            // Incompressible, so a bit flip lands in stored data only a checksum can catch.
            ("usr/lib/blob".to_string(), noise(64 * 1024, 1)),
        ]
    }

    fn archive() -> Vec<u8> {
        let f = files();
        let refs: Vec<(&str, &[u8])> = f.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        cpio(&refs)
    }

    fn ext_archive() -> Vec<u8> {
        cpio(&[
            ("usr/local/lib/containers/ext/bin", b"\x7fELF extension"),
            ("usr/local/etc/ext.conf", b"x=1\n"),
        ])
    }

    fn check(bytes: &[u8]) -> Result<Verdict, CheckError> {
        check_initramfs(bytes)
    }

    #[test]
    fn single_zstd_member_accepted() {
        let v = check(&zstd(&archive())).unwrap();
        assert!(
            v.format
                .starts_with("initramfs: 1 member (zstd), 3 entries"),
            "{v}"
        );
    }

    #[test]
    fn mixed_zstd_and_xz_accepted() {
        let mut file = zstd(&archive());
        file.extend(xz(&ext_archive()));
        let v = check(&file).unwrap();
        assert!(
            v.format
                .starts_with("initramfs: 2 members (zstd, xz), 5 entries"),
            "{v}"
        );
    }

    #[test]
    fn zstd_gzip_and_raw_cpio_accepted() {
        let mut file = zstd(&archive());
        file.extend(gzip(&ext_archive()));
        // A raw archive must start 4-byte aligned; zero padding gets it there.
        testdata::pad_to(&mut file, 4);
        file.extend(cpio(&[("raw.txt", b"raw member")]));
        let v = check(&file).unwrap();
        assert!(
            v.format
                .starts_with("initramfs: 3 members (zstd, gzip, cpio), 6 entries"),
            "{v}"
        );
    }

    #[test]
    fn raw_cpio_only_and_several_archives_in_one_member_accepted() {
        let mut inner = archive();
        inner.extend(ext_archive());
        let v = check(&inner).unwrap();
        assert!(
            v.format
                .starts_with("initramfs: 1 member (cpio), 5 entries"),
            "{v}"
        );
        let v = check(&zstd(&inner)).unwrap();
        assert!(
            v.format
                .starts_with("initramfs: 1 member (zstd), 5 entries"),
            "{v}"
        );
    }

    #[test]
    fn zero_padding_between_and_after_members_skipped() {
        let mut file = zstd(&archive());
        file.extend([0u8; 13]);
        file.extend(xz(&ext_archive()));
        file.extend([0u8; 4096]);
        let v = check(&file).unwrap();
        assert!(
            v.format.starts_with("initramfs: 2 members (zstd, xz)"),
            "{v}"
        );
    }

    #[test]
    fn several_zstd_frames_are_sniffed_one_by_one() {
        let mut file = zstd(&archive());
        file.extend(zstd(&ext_archive()));
        file.extend(gzip(&cpio(&[("late", b"1")])));
        let v = check(&file).unwrap();
        assert!(
            v.format
                .starts_with("initramfs: 3 members (zstd, zstd, gzip), 6 entries"),
            "{v}"
        );
    }

    #[test]
    fn many_members_summarised_by_kind() {
        let mut file = Vec::new();
        for i in 0..8 {
            let name = format!("f{i}");
            let a = cpio(&[(name.as_str(), b"x")]);
            file.extend(if i % 2 == 0 { zstd(&a) } else { xz(&a) });
        }
        let v = check(&file).unwrap();
        assert!(
            v.format
                .starts_with("initramfs: 8 members (4 zstd, 4 xz), 8 entries"),
            "{v}"
        );
    }

    #[test]
    fn xz_named_file_holding_zstd_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initramfs.xz");
        std::fs::write(&path, zstd(&archive())).unwrap();
        let v = check_initramfs(std::fs::File::open(&path).unwrap()).unwrap();
        assert!(v.format.starts_with("initramfs: 1 member (zstd)"), "{v}");
    }

    #[test]
    fn truncated_zstd_member_rejected_with_its_offset() {
        let first = zstd(&archive());
        let second = zstd(&ext_archive());
        let mut file = first.clone();
        file.extend(&second[..second.len() / 2]);
        let err = check(&file).unwrap_err();
        assert_eq!(err.check, "initramfs member (zstd)", "{err}");
        assert_eq!(err.offset, first.len() as u64, "{err}");
        assert!(err.reason.starts_with("member 2 "), "{err}");
    }

    #[test]
    fn truncated_xz_gzip_and_raw_members_rejected() {
        for (data, check_name) in [
            (xz(&archive()), "initramfs member (xz)"),
            (gzip(&archive()), "initramfs member (gzip)"),
        ] {
            let mut file = zstd(&ext_archive());
            let start = file.len() as u64;
            file.extend(&data[..data.len() - 10]);
            let err = check(&file).unwrap_err();
            assert_eq!((err.check, err.offset), (check_name, start), "{err}");
        }
        // A raw archive cut inside the data of its last file.
        let raw = archive();
        let err = check(&raw[..raw.len() - 700]).unwrap_err();
        assert_eq!((err.check, err.offset), ("cpio data", 0), "{err}");
        // Cut right after a complete entry: only the missing trailer tells.
        let one = cpio(&[("a", b"1234")]);
        let cut = HEADER_LEN + 2 + 4; // header, "a\0", data
        let err = check(&one[..cut]).unwrap_err();
        assert_eq!((err.check, err.offset), ("cpio trailer", 0), "{err}");
    }

    #[test]
    fn bit_flipped_members_rejected() {
        for (member, check_name) in [
            (zstd(&archive()), "initramfs member (zstd)"),
            (xz(&archive()), "initramfs member (xz)"),
            (gzip(&archive()), "initramfs member (gzip)"),
        ] {
            let mut file = zstd(&ext_archive());
            let start = file.len();
            file.extend(&member);
            file[start + member.len() / 2] ^= 0x10;
            let err = check(&file).unwrap_err();
            assert_eq!((err.check, err.offset), (check_name, start as u64), "{err}");
        }
    }

    #[test]
    fn cpio_checksum_catches_a_flip_in_raw_newc_crc() {
        let good = cpio_crc(&[("init", b"#!/bin/sh\n"), ("data", &noise(5000, 9))]);
        check(&good).unwrap();
        let mut bad = good.clone();
        // "init": header + name padded to 116, 10 data bytes padded to 128; "data": header +
        // name padded to 244, where its body starts.
        bad[244 + 100] ^= 1;
        let err = check(&bad).unwrap_err();
        assert_eq!((err.check, err.offset), ("cpio checksum", 0), "{err}");
        assert!(err.reason.contains("\"data\""), "{err}");
    }

    #[test]
    fn corrupt_cpio_inside_a_valid_member_rejected() {
        let mut a = archive();
        a[3] = b'9'; // magic 070701 -> 070901
        let mut file = zstd(&ext_archive());
        let start = file.len() as u64;
        file.extend(zstd(&a));
        let err = check(&file).unwrap_err();
        assert_eq!((err.check, err.offset), ("cpio header", start), "{err}");
        assert!(err.reason.contains("member 2 (zstd)"), "{err}");

        let mut a = archive();
        a[6 + 6 * 8] = b'g'; // filesize field
        let err = check(&zstd(&a)).unwrap_err();
        assert_eq!(err.check, "cpio header", "{err}");
        assert!(err.reason.contains("filesize"), "{err}");

        // A decoded member must end between entries.
        let mut a = archive();
        a.extend(b"junk");
        let err = check(&zstd(&a)).unwrap_err();
        assert_eq!(err.check, "cpio header", "{err}");

        // A member whose cpio is cut short although the compression is intact.
        let a = archive();
        let err = check(&xz(&a[..a.len() - 700])).unwrap_err();
        assert_eq!(err.check, "cpio data", "{err}");
        let err = check(&xz(&a[..a.len() - 600])).unwrap_err();
        assert_eq!(err.check, "cpio header", "{err}");
        assert!(err.reason.contains("truncated"), "{err}");
    }

    #[test]
    fn garbage_tail_rejected() {
        let mut file = zstd(&archive());
        let start = file.len() as u64;
        file.extend(b"\0\0garbage!");
        let err = check(&file).unwrap_err();
        assert_eq!(
            (err.check, err.offset),
            ("initramfs magic", start + 2),
            "{err}"
        );
        assert!(
            err.reason.contains("garbage after the last member"),
            "{err}"
        );
    }

    #[test]
    fn unknown_unsupported_and_empty_files_rejected() {
        let err = check(&noise(4096, 3)).unwrap_err();
        assert_eq!((err.check, err.offset), ("initramfs magic", 0), "{err}");
        let err = check(b"\x02\x21\x4c\x18rest").unwrap_err();
        assert!(err.reason.contains("lz4"), "{err}");
        let err = check(&[0u8; 1024]).unwrap_err();
        assert_eq!(err.check, "initramfs", "{err}");
        let err = check(b"").unwrap_err();
        assert_eq!(err.check, "initramfs", "{err}");
    }

    #[test]
    fn unaligned_raw_cpio_rejected() {
        let mut file = zstd(&archive());
        while file.len() % 4 != 1 {
            file.push(0);
        }
        let start = file.len() as u64;
        file.extend(cpio(&[("raw.txt", b"x")]));
        let err = check(&file).unwrap_err();
        assert_eq!(
            (err.check, err.offset),
            ("initramfs member (cpio)", start),
            "{err}"
        );
    }

    #[test]
    fn odc_cpio_rejected() {
        let mut odc = b"070707".to_vec();
        odc.resize(HEADER_LEN + 16, b'0');
        let err = check(&odc).unwrap_err();
        assert_eq!(err.check, "cpio header", "{err}");
        assert!(err.reason.contains("newc"), "{err}");
    }

    #[test]
    fn decompression_limit_stops_a_bomb() {
        let big = cpio(&[("zeros", &vec![0u8; 4 << 20])]);
        let bomb = zstd(&big);
        assert!(bomb.len() < 4096, "fixture should compress well");
        let err = check_initramfs_with(
            &bomb[..],
            &Limits {
                max_decompressed: 1 << 20,
            },
        )
        .unwrap_err();
        assert_eq!((err.check, err.offset), ("decompression limit", 0), "{err}");
        check_initramfs_with(
            &bomb[..],
            &Limits {
                max_decompressed: 8 << 20,
            },
        )
        .unwrap();
    }

    /// 160 MB of cpio through a generator reader: the check streams it (the test never holds it).
    #[test]
    fn large_raw_initramfs_streams() {
        let size = 160u64 << 20;
        let mut head = Vec::new();
        testdata::cpio_header(&mut head, b"070701", 1, 0o100644, "big", size);
        let mut tail = vec![0u8; testdata::pad_len(head.len() as u64 + size, 4)];
        let trailer_at = head.len() as u64 + size + tail.len() as u64;
        let mut trailer = Vec::new();
        testdata::cpio_header(&mut trailer, b"070701", 0, 0, "TRAILER!!!", 0);
        assert_eq!(trailer_at % 4, 0);
        tail.extend(trailer);
        let stream = head
            .as_slice()
            .chain(io::repeat(0x5a).take(size))
            .chain(tail.as_slice());
        let v = check_initramfs(stream).unwrap();
        assert!(
            v.format.starts_with("initramfs: 1 member (cpio), 1 entry,"),
            "{v}"
        );
        assert!(v.format.contains("167.8 MB"), "{v}");
    }
}
