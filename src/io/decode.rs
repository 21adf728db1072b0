//! The decoders, built in one place with one set of settings: layer blobs (every member or
//! frame, as the tools that wrote them), initramfs members and zboot payloads (one member or
//! frame at a time, as the kernel reads them).

use std::io::{self, BufRead, Read};

/// zstd layers made with `--long` need a window above the default 2^27; the format's maximum.
const ZSTD_WINDOW_LOG_MAX: u32 = 31;
/// Boot files are read as the kernel reads them: its zstd decoder for the initramfs and the
/// zboot payload takes windows up to 2^27 (`ZSTD_WINDOWLOG_MAX` in lib/decompress_unzstd.c), so
/// a larger window would not boot, and a 12-byte frame header must not make us allocate 2 GiB
/// (a fuzz finding, `fuzz/seeds/initramfs/zstd-window-2g`).
const BOOT_ZSTD_WINDOW_LOG_MAX: u32 = 27;

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

    /// Wraps `inner` in the matching decoder for a whole blob.
    pub fn decoder<'a, R: BufRead + 'a>(self, inner: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(inner),
            Compression::Gzip => Box::new(gzip_members(inner)),
            Compression::Zstd => Box::new(zstd_frames(inner)?),
        })
    }
}

/// Every member of a gzip stream (GzDecoder alone stops after the first).
pub fn gzip_members<R: BufRead>(inner: R) -> impl Read {
    flate2::bufread::MultiGzDecoder::new(inner)
}

/// One gzip member, leaving what follows it unread.
pub fn gzip_member<R: BufRead>(inner: R) -> impl Read {
    flate2::bufread::GzDecoder::new(inner)
}

/// Every frame of a zstd stream (skippable frames, as zstd:chunked writes them, are skipped).
pub fn zstd_frames<'a, R: BufRead + 'a>(inner: R) -> io::Result<impl Read + 'a> {
    let mut d = zstd::stream::read::Decoder::with_buffer(inner)?;
    d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
    Ok(d)
}

/// One zstd frame of a boot file, leaving what follows it unread.
pub fn zstd_frame<'a, R: BufRead + 'a>(inner: R) -> io::Result<impl Read + 'a> {
    let mut d = zstd::stream::read::Decoder::with_buffer(inner)?.single_frame();
    d.window_log_max(BOOT_ZSTD_WINDOW_LOG_MAX)?;
    Ok(d)
}

/// Threads the xz decoder may use for a stream of several blocks (`xz -T0` writes those).
const XZ_THREADS: usize = 4;
/// Above this much memory liblzma decodes with fewer threads, down to one (each thread holds a
/// block); it never refuses a stream for it.
const XZ_THREADING_MEMLIMIT: u64 = 256 << 20;

/// One xz stream, leaving what follows it unread. A stream of several blocks is decoded by
/// liblzma's multi-threaded decoder on the idle cores (a single-block stream, as the kernel's
/// build writes, decodes on one thread as before).
pub fn xz_stream<'a, R: BufRead + 'a>(inner: R) -> io::Result<impl Read + 'a> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(XZ_THREADS);
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(u32::try_from(threads).unwrap_or(1))
        .memlimit_threading(XZ_THREADING_MEMLIMIT)
        .memlimit_stop(u64::MAX)
        // liblzma may return early while its threads work; the reader asks again.
        .timeout_ms(300)
        .decoder()
        .map_err(io::Error::other)?;
    Ok(liblzma::bufread::XzDecoder::new_stream(inner, stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
    fn a_multi_block_xz_stream_decodes_and_leaves_what_follows() {
        // Several blocks, as `xz -T0` writes them: the multi-threaded decoder takes them.
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i % 251) as u8 ^ (i >> 13) as u8)
            .collect();
        let encoder = liblzma::stream::MtStreamBuilder::new()
            .threads(2)
            .block_size(256 << 10)
            .preset(1)
            .encoder()
            .unwrap();
        let mut xz = Vec::new();
        liblzma::read::XzEncoder::new_stream(&data[..], encoder)
            .read_to_end(&mut xz)
            .unwrap();
        xz.extend_from_slice(b"TRAILER");
        let mut src = std::io::BufReader::with_capacity(64 << 10, &xz[..]);
        let mut out = Vec::new();
        xz_stream(&mut src).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out.len(), data.len());
        assert!(out == data, "decoded bytes differ");
        let mut rest = Vec::new();
        src.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"TRAILER");
    }

    #[test]
    fn boot_file_frames_are_refused_beyond_the_kernels_window() {
        // The fuzz finding: a frame header announcing a 2 GiB window (`0xa8`), no content.
        let header = [40u8, 181, 47, 253, 4, 168, 0, 205, 2, 3, 142, 210];
        let mut out = Vec::new();
        let e = zstd_frame(&header[..])
            .and_then(|mut d| d.read_to_end(&mut out))
            .unwrap_err();
        assert!(e.to_string().contains("too much memory"), "{e}");
        // A frame within 2^27 decodes.
        let small = zstd::encode_all(&b"initramfs"[..], 3).unwrap();
        let mut out = Vec::new();
        zstd_frame(&small[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"initramfs");
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
