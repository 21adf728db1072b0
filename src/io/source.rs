//! Small reading helpers shared by the checks: a buffered reader that knows its file offset and
//! can peek a magic across refills, and a cap on decompressed bytes.

use std::io::{self, BufRead, Read};

/// A `BufRead` over the file that counts consumed bytes (error offsets) and can peek a few bytes
/// even when they straddle a refill (sniffing a member's magic must not depend on where the
/// previous read happened to end).
pub(crate) struct Source<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    pos: u64,
}

impl<R: Read> Source<R> {
    pub(crate) fn new(inner: R, capacity: usize) -> Self {
        Source {
            inner,
            buf: vec![0; capacity.max(16)].into_boxed_slice(),
            start: 0,
            end: 0,
            pos: 0,
        }
    }

    /// Offset of the next unconsumed byte.
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    /// Up to `n` bytes without consuming them; fewer only at end of file.
    pub(crate) fn peek(&mut self, n: usize) -> io::Result<&[u8]> {
        let n = n.min(self.buf.len());
        if self.end - self.start < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            while self.end < n {
                let got = match self.inner.read(&mut self.buf[self.end..]) {
                    Ok(got) => got,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                if got == 0 {
                    break;
                }
                self.end += got;
            }
        }
        let have = n.min(self.end - self.start);
        Ok(&self.buf[self.start..self.start + have])
    }
}

impl<R: Read> BufRead for Source<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            loop {
                match self.inner.read(&mut self.buf) {
                    Ok(got) => {
                        self.end = got;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(&self.buf[self.start..self.end])
    }

    fn consume(&mut self, amt: usize) {
        let amt = amt.min(self.end - self.start);
        self.start += amt;
        self.pos += amt as u64;
    }
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Consumes zero bytes (padding between members and after cpio archives); returns how many.
pub(crate) fn skip_zeros<R: BufRead + ?Sized>(r: &mut R) -> io::Result<u64> {
    let mut skipped = 0u64;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(skipped);
        }
        let zeros = buf.iter().take_while(|&&b| b == 0).count();
        let all = zeros == buf.len();
        r.consume(zeros);
        skipped += zeros as u64;
        if !all {
            return Ok(skipped);
        }
    }
}

/// Fills `buf` as far as the stream allows. Unlike `read_exact`, a short stream is a count, not
/// an error, so a clean end of decoded data can be told apart from a decoder's own error.
pub(crate) fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(got) => n += got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Consumes up to `n` bytes, adding them to `sum` (cpio 070702 checksum) when given; returns how
/// many were there.
pub(crate) fn skip_exact<R: BufRead + ?Sized>(
    r: &mut R,
    n: u64,
    mut sum: Option<&mut u32>,
) -> io::Result<u64> {
    let mut left = n;
    while left > 0 {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if let Some(sum) = sum.as_deref_mut() {
            *sum = buf[..take]
                .iter()
                .fold(*sum, |acc, &b| acc.wrapping_add(u32::from(b)));
        }
        r.consume(take);
        left -= take as u64;
    }
    Ok(n - left)
}

/// Decompressed bytes left for one file check.
pub(crate) struct Budget {
    used: u64,
    max: u64,
}

impl Budget {
    pub(crate) fn new(max: u64) -> Self {
        Budget { used: 0, max }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("more than {0} bytes decompressed (limit reached: decompression bomb or wrong limit)")]
pub(crate) struct LimitExceeded(u64);

/// Whether an I/O error came from [`Capped`] running out of budget.
pub(crate) fn is_limit(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<LimitExceeded>())
}

/// Counts a decoder's output against the budget and fails once it is spent, so a bomb errors
/// instead of spinning for hours.
pub(crate) struct Capped<'a, R> {
    inner: R,
    budget: &'a mut Budget,
}

impl<'a, R: Read> Capped<'a, R> {
    pub(crate) fn new(inner: R, budget: &'a mut Budget) -> Self {
        Capped { inner, budget }
    }
}

impl<R: Read> Read for Capped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.budget.used += n as u64;
        if self.budget.used > self.budget.max {
            return Err(io::Error::other(LimitExceeded(self.budget.max)));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out one byte per read, to force every refill boundary.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((&b, rest)), Some(out)) => {
                    *out = b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn source_peeks_across_refills_and_counts_offsets() {
        let data = b"\0\0\0abcdefgh";
        let mut src = Source::new(Trickle(data), 16);
        assert_eq!(skip_zeros(&mut src).unwrap(), 3);
        assert_eq!(src.pos(), 3);
        assert_eq!(src.peek(6).unwrap(), b"abcdef");
        let mut two = [0; 2];
        assert_eq!(read_full(&mut src, &mut two).unwrap(), 2);
        assert_eq!(&two, b"ab");
        assert_eq!(src.pos(), 5);
        assert_eq!(src.peek(10).unwrap(), b"cdefgh");
        assert_eq!(skip_exact(&mut src, 100, None).unwrap(), 6);
        assert_eq!(src.pos(), 11);
        assert!(src.peek(4).unwrap().is_empty());
    }

    #[test]
    fn capped_reader_stops_at_budget() {
        let data = vec![7u8; 1000];
        let mut budget = Budget::new(999);
        let mut capped = Capped::new(&data[..], &mut budget);
        let err = std::io::copy(&mut capped, &mut std::io::sink()).unwrap_err();
        assert!(is_limit(&err), "{err}");
        let mut budget = Budget::new(1000);
        let mut capped = Capped::new(&data[..], &mut budget);
        assert_eq!(
            std::io::copy(&mut capped, &mut std::io::sink()).unwrap(),
            1000
        );
        assert_eq!(budget.used, 1000);
    }
}
