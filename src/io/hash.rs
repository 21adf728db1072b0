//! Hashing while streaming: every blob read and every file written is hashed on the way.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use super::LimitReader;
use crate::digest::Digest;

/// A [`LimitReader`] that also hashes what it reads (the daemon hashes blobs on the download
/// task instead, as chunks arrive; this serves readers without one).
pub struct HashReader<R> {
    inner: LimitReader<R>,
    hasher: Sha256,
}

impl<R: Read> HashReader<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        HashReader {
            inner: LimitReader::new(inner, limit),
            hasher: Sha256::new(),
        }
    }

    /// Reads the rest of the stream through the hasher and returns the bytes read and their
    /// digest.
    pub fn finish(mut self) -> io::Result<(u64, Digest)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((self.inner.count(), Digest::from_hasher(self.hasher)))
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Hashes and counts what is written through it (for the files we publish).
pub struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: io::Write> HashWriter<W> {
    pub fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Returns the writer, the byte count and the digest of what was written.
    pub fn finish(self) -> (W, u64, Digest) {
        (self.inner, self.count, Digest::from_hasher(self.hasher))
    }
}

impl<W: io::Write> io::Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_reader_hashes_all_and_enforces_limit() {
        let data = b"abcdefgh".repeat(1000);
        let mut r = HashReader::new(&data[..], data.len() as u64);
        let mut first = [0u8; 10];
        r.read_exact(&mut first).unwrap();
        let (n, digest) = r.finish().unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(digest, Digest::of(&data));

        let r = HashReader::new(&data[..], data.len() as u64 - 1);
        let e = r.finish().unwrap_err();
        assert!(e.to_string().contains("longer"), "{e}");
    }
}
