//! Small composable `Read` adapters for the streaming pipeline (after coreos-installer's `io`).

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

use bytes::{Buf, Bytes};
use sha2::{Digest, Sha256};
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

    /// Reads the rest of the stream through the hasher and returns `(bytes read,
    /// "sha256:<hex>")`.
    pub fn finish(mut self) -> io::Result<(u64, String)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            self.inner.count,
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
        ))
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

    /// Returns the writer, the byte count and the lowercase hex sha256.
    pub fn finish(self) -> (W, u64, String) {
        (self.inner, self.count, hex::encode(self.hasher.finalize()))
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

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Recognises OCI and Docker layer media types; `None` for anything else.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// Wraps `inner` in the matching decoder.
    pub fn decoder<'a, R: io::BufRead + 'a>(self, inner: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(inner),
            // A gzip blob may hold several members; GzDecoder would stop after the first.
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(inner)),
            Compression::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(inner)?;
                // Layers made with `zstd --long` need a window above the default 2^27.
                d.window_log_max(31)?;
                Box::new(d)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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

    #[test]
    fn hash_reader_hashes_all_and_enforces_limit() {
        let data = b"abcdefgh".repeat(1000);
        let mut r = HashReader::new(&data[..], data.len() as u64);
        let mut first = [0u8; 10];
        r.read_exact(&mut first).unwrap();
        let (n, digest) = r.finish().unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(
            digest,
            format!("sha256:{}", hex::encode(Sha256::digest(&data)))
        );

        let r = HashReader::new(&data[..], data.len() as u64 - 1);
        let e = r.finish().unwrap_err();
        assert!(e.to_string().contains("longer"), "{e}");
    }

    #[test]
    fn multi_member_gzip_is_read_to_the_end() {
        let mut blob = Vec::new();
        for part in [&b"first "[..], &b"second"[..]] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).unwrap();
            blob.extend(e.finish().unwrap());
        }
        let mut out = String::new();
        Compression::Gzip
            .decoder(&blob[..])
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "first second");
    }

    #[test]
    fn ratio_limit_stops_bombs() {
        let zeros = vec![0u8; 4 << 20];
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&zeros).unwrap();
        let bomb = e.finish().unwrap();
        let (counted, count) = CountingReader::new(&bomb[..]);
        let decoded = Compression::Gzip
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
        let decoded = Compression::Gzip
            .decoder(io::BufReader::new(counted))
            .unwrap();
        let mut limited = RatioLimit::new(decoded, count, 100, 0);
        assert_eq!(
            io::copy(&mut limited, &mut io::sink()).unwrap(),
            data.len() as u64
        );
    }

    #[test]
    fn media_types_map_to_decoders() {
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::from_media_type("application/json"), None);
    }
}
