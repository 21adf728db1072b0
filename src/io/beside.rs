//! A check that runs beside a writer: the bytes a staged file is written with are also handed,
//! in bounded chunks, to a reader on its own thread, so nothing is read back after the download.
//! [`ForwardSeek`] lets a check that seeks (a kernel's headers, then its payload) read such a
//! stream, as long as it only looks back into the first bytes.

use std::io::{self, Read, Seek, SeekFrom};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// A check running on its own thread over the bytes [`Beside::feed`] is given.
pub struct Beside<T> {
    tx: Option<SyncSender<Vec<u8>>>,
    handle: JoinHandle<T>,
}

impl<T: Send + 'static> Beside<T> {
    /// Starts `check` on a thread named `name`, with at most `depth` chunks in flight. `None`
    /// when no thread can be started (the caller checks the file afterwards instead).
    pub fn spawn(
        name: &str,
        depth: usize,
        check: impl FnOnce(&mut ChunkReader) -> T + Send + 'static,
    ) -> Option<Beside<T>> {
        let (tx, rx) = sync_channel(depth);
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut r = ChunkReader::new(rx);
                let verdict = check(&mut r);
                // Drain what is still coming, so the writer never waits on a finished check.
                let _ = io::copy(&mut r, &mut io::sink());
                verdict
            })
            .ok()?;
        Some(Beside {
            tx: Some(tx),
            handle,
        })
    }

    /// Hands the check a copy of `bytes` (waits while `depth` chunks are in flight).
    pub fn feed(&mut self, bytes: &[u8]) {
        if let Some(tx) = &self.tx {
            if tx.send(bytes.to_vec()).is_err() {
                self.tx = None;
            }
        }
    }

    /// Ends the stream and waits for the verdict; `None` if the check panicked.
    pub fn finish(mut self) -> Option<T> {
        self.tx = None;
        self.handle.join().ok()
    }
}

/// A forward-only stream as `Read + Seek` over a stream of known length: the first `keep`
/// bytes are kept, so headers can be read in any order; a seek forward skips; a seek back to a
/// byte that was not kept fails (`Unsupported`) and is remembered in [`ForwardSeek::refused`],
/// so the caller can tell "this needs random access" from a verdict on the bytes.
pub struct ForwardSeek<R> {
    inner: R,
    head: Vec<u8>,
    keep: usize,
    /// Bytes taken from `inner` so far.
    taken: u64,
    pos: u64,
    len: u64,
    refused: bool,
}

impl<R: Read> ForwardSeek<R> {
    pub fn new(inner: R, keep: usize, len: u64) -> ForwardSeek<R> {
        ForwardSeek {
            inner,
            head: Vec::new(),
            keep,
            taken: 0,
            pos: 0,
            len,
            refused: false,
        }
    }

    /// Whether a seek went back to bytes that were not kept.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// Takes up to `buf.len()` bytes from the stream, keeping what falls inside the head.
    fn take(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let kept = self.keep.saturating_sub(self.head.len()).min(n);
        self.head.extend_from_slice(&buf[..kept]);
        self.taken += n as u64;
        Ok(n)
    }
}

impl<R: Read> Read for ForwardSeek<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos < self.taken {
            // Only kept bytes lie behind `taken` (seek refuses the others), so this is in range.
            let at = usize::try_from(self.pos).map_err(io::Error::other)?;
            let n = buf.len().min(self.head.len().saturating_sub(at));
            buf[..n].copy_from_slice(&self.head[at..at + n]);
            self.pos += n as u64;
            return Ok(n);
        }
        let mut skip = [0u8; 8192];
        while self.taken < self.pos {
            let want = (self.pos - self.taken).min(skip.len() as u64) as usize;
            if self.take(&mut skip[..want])? == 0 {
                return Ok(0);
            }
        }
        let n = self.take(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read> Seek for ForwardSeek<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        if target < self.taken && target >= self.head.len() as u64 {
            self.refused = true;
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "offset {target} streamed past (only the first {} bytes are kept)",
                    self.keep
                ),
            ));
        }
        self.pos = target;
        Ok(target)
    }
}

/// Reads byte chunks another thread sends through a bounded std channel (a tee: the writer of
/// a staged file hands its bytes to a check running beside it). A closed channel is the end.
pub struct ChunkReader {
    rx: Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl ChunkReader {
    fn new(rx: Receiver<Vec<u8>>) -> Self {
        ChunkReader {
            rx,
            chunk: Vec::new(),
            at: 0,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.recv() {
                Ok(c) => {
                    self.chunk = c;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn forward_seek_reads_the_head_in_any_order_and_skips_forward() {
        let data = stream(10_000);
        let mut r = ForwardSeek::new(&data[..], 1000, data.len() as u64);
        let mut b = [0u8; 16];
        r.seek(SeekFrom::Start(500)).unwrap();
        r.read_exact(&mut b).unwrap();
        assert_eq!(b, data[500..516]);
        r.seek(SeekFrom::Start(10)).unwrap();
        r.read_exact(&mut b).unwrap();
        assert_eq!(b, data[10..26]);
        r.seek(SeekFrom::Start(5000)).unwrap();
        r.read_exact(&mut b).unwrap();
        assert_eq!(b, data[5000..5016]);
        // Back into the head still works; back past it does not, and is remembered.
        r.seek(SeekFrom::Start(990)).unwrap();
        let mut rest = [0u8; 10];
        r.read_exact(&mut rest).unwrap();
        assert_eq!(rest, data[990..1000]);
        assert!(!r.refused());
        let e = r.seek(SeekFrom::Start(2000)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(r.refused());
        // From the end, by the length given.
        r.seek(SeekFrom::End(-4)).unwrap();
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, data[9996..]);
    }

    #[test]
    fn beside_sees_every_byte_and_a_check_that_stops_early_does_not_block_the_writer() {
        let data = stream(1 << 20);
        let mut whole = Beside::spawn("test-check", 2, |r| {
            let mut all = Vec::new();
            r.read_to_end(&mut all).map(|_| all)
        })
        .unwrap();
        let mut early = Beside::spawn("test-check", 2, |r| {
            let mut first = [0u8; 4];
            r.read_exact(&mut first).map(|_| first)
        })
        .unwrap();
        for chunk in data.chunks(4096) {
            whole.feed(chunk);
            early.feed(chunk);
        }
        assert_eq!(whole.finish().unwrap().unwrap(), data);
        assert_eq!(early.finish().unwrap().unwrap(), data[..4]);
    }
}
