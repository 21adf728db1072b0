//! Caps on what a stream may hold: a blob's declared size, a decompression ratio, a check's
//! budget of decoded bytes.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

/// Counts what is read through it and refuses to read past `limit` bytes (a blob larger than
/// its descriptor says is as wrong as a corrupt one).
pub struct LimitReader<R> {
    inner: R,
    count: u64,
    limit: u64,
}

impl<R: Read> LimitReader<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        LimitReader {
            inner,
            count: 0,
            limit,
        }
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Reads the rest of the stream (a decoder may stop before the end of its input) and
    /// returns the number of bytes read in all.
    pub fn finish(mut self) -> io::Result<u64> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(self.count)
    }
}

impl<R: Read> Read for LimitReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Ask for one byte more than allowed so an overlong stream is noticed.
        let room = self.limit.saturating_add(1).saturating_sub(self.count);
        let want = buf
            .len()
            .min(usize::try_from(room).unwrap_or(usize::MAX).max(1));
        let n = self.inner.read(&mut buf[..want])?;
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "blob is longer than the {} bytes its descriptor declares",
                    self.limit
                ),
            ));
        }
        Ok(n)
    }
}

/// Counts the bytes read through it into a cell that an adapter downstream can read.
pub struct CountingReader<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> CountingReader<R> {
    pub fn new(inner: R) -> (Self, Rc<Cell<u64>>) {
        let count = Rc::new(Cell::new(0));
        (
            CountingReader {
                inner,
                count: count.clone(),
            },
            count,
        )
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Refuses to produce more than `ratio` bytes per byte counted upstream (a decompression bomb),
/// once past `grace` bytes (small, very compressible layers are fine).
pub struct RatioLimit<R> {
    inner: R,
    upstream: Rc<Cell<u64>>,
    produced: u64,
    ratio: u64,
    grace: u64,
}

impl<R: Read> RatioLimit<R> {
    pub fn new(inner: R, upstream: Rc<Cell<u64>>, ratio: u64, grace: u64) -> Self {
        RatioLimit {
            inner,
            upstream,
            produced: 0,
            ratio,
            grace,
        }
    }
}

impl<R: Read> Read for RatioLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.produced += n as u64;
        let allowed = self.upstream.get().max(1).saturating_mul(self.ratio);
        if self.produced > self.grace && self.produced > allowed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "decompresses to more than {} times its size ({} bytes from {}): a decompression bomb? (max_compression_ratio)",
                    self.ratio,
                    self.produced,
                    self.upstream.get()
                ),
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn ratio_limit_stops_bombs() {
        let zeros = vec![0u8; 4 << 20];
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&zeros).unwrap();
        let bomb = e.finish().unwrap();
        let (counted, count) = CountingReader::new(&bomb[..]);
        let decoded = super::super::Compression::Gzip
            .decoder(io::BufReader::new(counted))
            .unwrap();
        let mut limited = RatioLimit::new(decoded, count, 100, 1 << 20);
        let e = io::copy(&mut limited, &mut io::sink()).unwrap_err();
        assert!(e.to_string().contains("decompression bomb"), "{e}");

        // an ordinary stream passes
        let data = b"some text that compresses a bit, but not a thousandfold".repeat(100);
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&data).unwrap();
        let gz = e.finish().unwrap();
        let (counted, count) = CountingReader::new(&gz[..]);
        let decoded = super::super::Compression::Gzip
            .decoder(io::BufReader::new(counted))
            .unwrap();
        let mut limited = RatioLimit::new(decoded, count, 100, 0);
        assert_eq!(
            io::copy(&mut limited, &mut io::sink()).unwrap(),
            data.len() as u64
        );
    }
}
