//! Writeback while a file is written: the dirty pages of a staged file are handed to the disk
//! in bounded windows as more arrive, so the fsync before publishing finds little left to do,
//! and the writeback overlaps the download instead of following it. The windows follow the
//! pattern `sync_file_range(2)` describes: start writeback of the window just written, then
//! wait for the one before it, so at most two windows are dirty at a time.
//!
//! Durability is exactly as before: `sync_file_range` makes no promise about metadata or the
//! disk cache, and the file is still `fsync`ed before it is published; this only moves the
//! waiting earlier. Where the call is not supported (it fails with `EINVAL`, `ENOSYS` or
//! `ESPIPE` on some file systems), the writer stops calling it and the fsync does the work.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;

/// Bytes per writeback window.
const WINDOW: u64 = 8 << 20;

/// A file written with writeback started (and bounded) along the way.
pub struct WritebackFile {
    file: File,
    written: u64,
    /// Writeback has been started for everything before this offset.
    started: u64,
    /// Writeback has been waited for up to this offset.
    waited: u64,
    enabled: bool,
}

impl WritebackFile {
    pub fn new(file: File) -> Self {
        WritebackFile {
            file,
            written: 0,
            started: 0,
            waited: 0,
            enabled: true,
        }
    }

    /// The file, with writeback started for all of it (the caller fsyncs it).
    pub fn into_inner(mut self) -> File {
        let (from, to) = (self.started, self.written);
        self.range(from, to, libc::SYNC_FILE_RANGE_WRITE);
        self.file
    }

    fn range(&mut self, from: u64, to: u64, flags: libc::c_uint) {
        if !self.enabled || to <= from {
            return;
        }
        let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
            return;
        };
        // SAFETY: a plain system call on a descriptor this struct owns; it reads no memory of
        // ours.
        let rc = unsafe { libc::sync_file_range(self.file.as_raw_fd(), offset, len, flags) };
        if rc != 0 {
            // Only an optimisation: leave the rest to the fsync.
            tracing::debug!(
                error = %io::Error::last_os_error(),
                "sync_file_range unavailable here; writeback is left to the fsync"
            );
            self.enabled = false;
        }
    }

    fn after_write(&mut self) {
        if self.written - self.started < WINDOW {
            return;
        }
        let (from, to) = (self.started, self.written);
        self.range(from, to, libc::SYNC_FILE_RANGE_WRITE);
        // Wait for the window before this one: its writeback had a window's time to finish.
        let (wait_from, wait_to) = (self.waited, from);
        self.range(
            wait_from,
            wait_to,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        );
        self.waited = from;
        self.started = to;
    }
}

impl Write for WritebackFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        self.after_write();
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn what_is_written_is_the_file_whatever_the_windows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = WritebackFile::new(File::create(&path).unwrap());
        // 2.5 windows in uneven pieces: writeback is started and waited for on the way.
        let data: Vec<u8> = (0..(WINDOW * 5 / 2)).map(|i| (i % 251) as u8).collect();
        for chunk in data.chunks(1_000_003) {
            w.write_all(chunk).unwrap();
        }
        assert!(w.enabled, "sync_file_range works on the test's file system");
        assert!(
            w.started >= 2 * WINDOW && w.started <= w.written,
            "{}",
            w.started
        );
        assert!(
            w.waited >= WINDOW && w.waited < w.started,
            "{} {}",
            w.waited,
            w.started
        );
        let file = w.into_inner();
        file.sync_all().unwrap();
        let mut back = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }
}
