//! From an async download to a blocking reader.

use std::io::{self, Read};

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;

/// Reads chunks that an async task sends through a channel. Lets a blocking thread decompress
/// and unpack while the download runs on the runtime (two cores: one each).
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
    /// A failed download stays failed: later reads must not look like a clean end of stream.
    failed: Option<(io::ErrorKind, String)>,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        ChannelReader {
            rx,
            chunk: Bytes::new(),
            failed: None,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            if let Some((kind, msg)) = &self.failed {
                return Err(io::Error::new(*kind, msg.clone()));
            }
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => self.failed = Some((e.kind(), e.to_string())),
                Some(Ok(chunk)) => self.chunk = chunk,
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_reader_joins_chunks() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(Bytes::from_static(b"hello "))).unwrap();
        tx.try_send(Ok(Bytes::new())).unwrap();
        tx.try_send(Ok(Bytes::from_static(b"world"))).unwrap();
        drop(tx);
        let mut out = String::new();
        ChannelReader::new(rx).read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn channel_reader_passes_errors() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(Bytes::from_static(b"x"))).unwrap();
        tx.try_send(Err(io::Error::other("cut"))).unwrap();
        let mut out = Vec::new();
        let mut r = ChannelReader::new(rx);
        let e = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(e.to_string(), "cut");
        // and it stays failed
        assert!(r.read(&mut [0u8; 4]).is_err());
    }
}
