//! Naming a stream's real format by its first bytes (names and media types lie).

use std::io::{self, Read};

/// Keeps the first bytes read through it, so that when a parser chokes the real format of the
/// data can be named.
pub struct SniffReader<R> {
    inner: R,
    head: [u8; 8],
    len: usize,
}

impl<R: Read> SniffReader<R> {
    pub fn new(inner: R) -> Self {
        SniffReader {
            inner,
            head: [0; 8],
            len: 0,
        }
    }

    pub fn head(&self) -> &[u8] {
        &self.head[..self.len]
    }
}

impl<R: Read> Read for SniffReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let take = n.min(self.head.len() - self.len);
        self.head[self.len..self.len + take].copy_from_slice(&buf[..take]);
        self.len += take;
        Ok(n)
    }
}

/// Names a compressed format from its magic bytes.
pub fn sniff_format(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some("gzip-compressed")
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd-compressed")
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some("xz-compressed")
    } else if head.starts_with(b"BZh") {
        Some("bzip2-compressed")
    } else {
        None
    }
}
