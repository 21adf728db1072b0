//! Boot-file checks by real format: refuse a kernel, initramfs or UKI that would not boot.
//!
//! Names lie (Talos's `initramfs.xz` has been zstd since v1.8), so every check sniffs magic bytes
//! and walks the file to its end: a truncated download or a bit flip must fail here, not on a
//! node halfway through PXE boot.

mod initramfs;
mod kernel;
mod pe;
#[cfg(test)]
pub(crate) mod testdata;
mod uki;

use std::fmt;
use std::io::{BufReader, Read, Seek};
use std::str::FromStr;

pub use initramfs::check_initramfs_with;
pub use kernel::{check_kernel_stream, check_kernel_with};
pub use uki::extract_uki_with;

/// What a file's first bytes say it may be, for a check that runs while it is written: a
/// kernel (PE, arm64 Image, bzImage) or an initramfs member (xz, zstd, gzip, cpio). A guess
/// only: the check itself decides, and only for a file published as that kind.
pub fn looks_like(head: &[u8]) -> Option<Kind> {
    if kernel::looks_like_kernel(head) {
        Some(Kind::Kernel)
    } else if initramfs::looks_like_initramfs(head) {
        Some(Kind::Initramfs)
    } else {
        None
    }
}

/// Checks `len` bytes read once front to back as `kind` (a kernel or an initramfs): the bytes
/// of a file as it is written. `None` when a kernel needs random access (then [`check_as`] the
/// written file).
pub fn check_stream<R: Read>(
    kind: Kind,
    r: R,
    len: u64,
    limits: &Limits,
) -> Option<Result<Verdict, CheckError>> {
    match kind {
        Kind::Kernel => check_kernel_stream(r, len, limits),
        _ => Some(check_initramfs_with(r, limits)),
    }
}

/// Checks a file of `len` bytes as `kind` (a kernel or an initramfs), buffered.
pub fn check_as<R: Read + Seek>(
    kind: Kind,
    r: R,
    len: u64,
    limits: &Limits,
) -> Result<Verdict, CheckError> {
    const READ_BUFFER: usize = 256 * 1024;
    let r = BufReader::with_capacity(READ_BUFFER, r);
    match kind {
        Kind::Kernel => check_kernel_with(r, len, limits),
        _ => check_initramfs_with(r, limits),
    }
}

/// Which check a file gets (config key `kind`; presets set kernel/initramfs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Kernel,
    Initramfs,
    Uki,
    /// Copied as is, no format check.
    Raw,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Kernel => "kernel",
            Kind::Initramfs => "initramfs",
            Kind::Uki => "uki",
            Kind::Raw => "raw",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind {0:?} (expected \"kernel\", \"initramfs\", \"uki\" or \"raw\")")]
pub struct ParseKindError(pub String);

impl FromStr for Kind {
    type Err = ParseKindError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kernel" => Ok(Kind::Kernel),
            "initramfs" => Ok(Kind::Initramfs),
            "uki" => Ok(Kind::Uki),
            "raw" => Ok(Kind::Raw),
            other => Err(ParseKindError(other.to_string())),
        }
    }
}

/// A failed check names the check and the byte offset where it failed (the caller adds the file
/// name).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{check} failed at offset {offset}: {reason}")]
pub struct CheckError {
    pub check: &'static str,
    pub offset: u64,
    pub reason: String,
}

impl CheckError {
    pub(crate) fn new(check: &'static str, offset: u64, reason: impl Into<String>) -> Self {
        CheckError {
            check,
            offset,
            reason: reason.into(),
        }
    }
}

/// What was recognised (for logs and /status), e.g. "arm64 EFI zboot (zstd payload, 21.0 MB)".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub format: String,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.format)
    }
}

/// Default cap on the bytes one file check may decompress: real initramfs images unpack to a few
/// hundred MB, so 4 GiB only stops decompression bombs.
pub const DEFAULT_MAX_DECOMPRESSED: u64 = 4 << 30;

/// Guard limits for a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total decompressed bytes per file check (all members together).
    pub max_decompressed: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_decompressed: DEFAULT_MAX_DECOMPRESSED,
        }
    }
}

/// Sizes for verdicts and reasons, in decimal MB like `ls -h --si`.
pub(crate) fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_parses_known_names_only() {
        assert_eq!("kernel".parse::<Kind>(), Ok(Kind::Kernel));
        assert_eq!("initramfs".parse::<Kind>(), Ok(Kind::Initramfs));
        assert_eq!("uki".parse::<Kind>(), Ok(Kind::Uki));
        assert_eq!("raw".parse::<Kind>(), Ok(Kind::Raw));
        let err = "vmlinuz".parse::<Kind>().unwrap_err();
        assert!(err.to_string().contains("\"vmlinuz\""), "{err}");
        for k in [Kind::Kernel, Kind::Initramfs, Kind::Uki, Kind::Raw] {
            assert_eq!(k.to_string().parse::<Kind>(), Ok(k));
        }
    }

    #[test]
    fn check_error_display_names_check_and_offset() {
        let e = CheckError::new("cpio header", 1234, "bad magic");
        assert_eq!(
            e.to_string(),
            "cpio header failed at offset 1234: bad magic"
        );
    }
}
