//! The layer pipeline: walk an image's layers from the top down and write the wanted files into
//! a staging directory.
//!
//! Each layer streams `HTTP -> sha256 -> decompress -> tar entries -> wanted regular files`; the
//! download runs on the async runtime and the rest on a blocking thread, joined by a small
//! channel, so memory stays flat whatever the layer size. Every blob is read to its end through
//! the hasher and checked against its descriptor before its files count.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::assets::Kind;
use crate::config::FileSpec;
use crate::config::{Limits, Modes};
use crate::io::{
    ChannelReader, Compression, CountingReader, HashReader, HashWriter, LimitReader, RatioLimit,
    SniffReader,
};
use crate::registry::{Descriptor, Registry};
use crate::store::FileRecord;

/// Chunks in flight between the download and the unpacker (reqwest chunks are ~8-16 KiB).
const CHANNEL_DEPTH: usize = 8;
const READ_BUFFER: usize = 256 * 1024;
/// Decompressed bytes a layer may produce before the compression-ratio cap applies.
const RATIO_GRACE: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("layer {digest}: unsupported media type {media_type:?}")]
    MediaType { digest: String, media_type: String },
    #[error("layer {digest}: digest mismatch: content hashes to {actual} ({size} bytes); the blob is corrupt or was altered")]
    DigestMismatch {
        digest: String,
        actual: String,
        size: u64,
    },
    #[error("layer {digest}: size mismatch: descriptor says {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("layer {digest}: {source}")]
    Read {
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {digest}: {path}: {reason}")]
    Entry {
        digest: String,
        path: String,
        reason: String,
    },
    #[error("{path} was deleted by a whiteout in layer {digest}")]
    Whiteout { path: String, digest: String },
    #[error("{path} not found in the image (searched {layers} layers)")]
    NotFound { path: String, layers: usize },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("internal: unpacking thread failed: {0}")]
    Join(String),
    #[error("{what} is larger than the configured {limit} ({max} bytes): {size} bytes")]
    Limit {
        what: String,
        limit: &'static str,
        max: u64,
        size: u64,
    },
    #[error("{file} ({kind}): {source}; not published")]
    Check {
        file: String,
        kind: crate::assets::Kind,
        #[source]
        source: crate::assets::CheckError,
    },
}

/// What the layers above have decided so far.
#[derive(Default)]
struct Overlay {
    /// Image paths already taken from an upper layer.
    taken: HashSet<String>,
    /// Paths hidden (with everything below them) by whiteouts in upper layers.
    deleted: Vec<String>,
    /// Directories whose lower-layer contents are hidden by opaque whiteouts.
    opaque: Vec<String>,
}

impl Overlay {
    fn hidden(&self, path: &str) -> bool {
        self.deleted.iter().any(|d| is_at_or_below(path, d))
            || self.opaque.iter().any(|d| is_below(path, d))
    }
}

fn is_below(path: &str, dir: &str) -> bool {
    dir.is_empty()
        || (path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/')
}

fn is_at_or_below(path: &str, p: &str) -> bool {
    path == p || is_below(path, p)
}

/// Where a UKI waits in staging until it is split (a dot name: never published).
fn uki_staging_name(spec: &FileSpec) -> String {
    format!(".uki-{}", spec.name)
}

/// Where a wanted image path goes in the staging directory.
fn destination(files: &[FileSpec], path: &str) -> Option<PathBuf> {
    files.iter().find_map(|f| {
        if !f.is_dir && f.source == path && f.kind == Kind::Uki {
            Some(PathBuf::from(uki_staging_name(f)))
        } else if !f.is_dir && f.source == path {
            Some(PathBuf::from(&f.name))
        } else if f.is_dir && is_below(path, &f.source) {
            Some(Path::new(&f.name).join(&path[f.source.len() + 1..]))
        } else {
            None
        }
    })
}

/// Extracts `files` from the image `layers` (bottom first, as in the manifest) into `staging`,
/// downloading only the layers it needs, and returns a record of each file written.
pub async fn extract(
    registry: &Registry,
    layers: &[Descriptor],
    files: &[FileSpec],
    staging: &Path,
    modes: &Modes,
    limits: &Limits,
) -> Result<Vec<FileRecord>, PipelineError> {
    let mut overlay = Overlay::default();
    let mut records: HashMap<PathBuf, FileRecord> = HashMap::new();
    let exact: Vec<&FileSpec> = files.iter().filter(|f| !f.is_dir).collect();
    let has_dirs = files.iter().any(|f| f.is_dir);
    let mut searched = 0;
    let mut downloaded: u64 = 0;

    for layer in layers.iter().rev() {
        if !has_dirs && exact.iter().all(|f| overlay.taken.contains(&f.source)) {
            break;
        }
        searched += 1;
        downloaded = downloaded.saturating_add(layer.size);
        if downloaded > limits.max_download {
            return Err(PipelineError::Limit {
                what: format!("the layers needed so far (up to {})", layer.digest),
                limit: "max_download_size",
                max: limits.max_download,
                size: downloaded,
            });
        }
        let kind = layer_kind(layer)?;
        if let LayerKind::File { path, .. } = &kind {
            // An artifact layer says which file it holds: fetch it only when wanted.
            let wanted = destination(files, path).is_some()
                && !overlay.taken.contains(path)
                && !overlay.hidden(path);
            if !wanted {
                downloaded -= layer.size;
                continue;
            }
        }
        tracing::info!(layer = %layer.digest, size = layer.size, "reading layer");

        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        // The blob is hashed on the download task as chunks arrive, so hashing overlaps
        // decompression on the other core.
        let mut hasher = Sha256::new();
        let download = registry.stream_blob(layer, tx, &mut hasher);
        let unpack = {
            let layer = layer.clone();
            let files = files.to_vec();
            let out = Output {
                dir: staging.to_path_buf(),
                modes: *modes,
                limits: *limits,
            };
            let overlay = std::mem::take(&mut overlay);
            tokio::task::spawn_blocking(move || {
                let mut blob = LimitReader::new(ChannelReader::new(rx), layer.size);
                let walked = walk_layer(&mut blob, &layer, &kind, &files, &out, &overlay);
                // Read the blob to its end even after an error: it is judged by its digest.
                let drained = blob.finish();
                (overlay, walked, drained)
            })
        };
        let ((), joined) = tokio::join!(download, unpack);
        let (returned, walked, drained) = joined.map_err(|e| PipelineError::Join(e.to_string()))?;
        overlay = returned;
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        let found = judge(layer, drained.map(|n| (n, digest)), walked)?;

        // Whiteouts in this layer hide only what lies below it.
        for (path, record) in found.files {
            overlay.taken.insert(path);
            records.insert(PathBuf::from(&record.name), record);
        }
        overlay.deleted.extend(found.deleted);
        overlay.opaque.extend(found.opaque);
        for f in &exact {
            if !overlay.taken.contains(&f.source) && overlay.hidden(&f.source) {
                return Err(PipelineError::Whiteout {
                    path: f.source.clone(),
                    digest: layer.digest.clone(),
                });
            }
        }
    }

    for f in files {
        let present = if f.is_dir {
            records.keys().any(|p| p.starts_with(&f.name))
        } else {
            overlay.taken.contains(&f.source)
        };
        if !present {
            return Err(PipelineError::NotFound {
                path: if f.is_dir {
                    format!("{}/ (no files)", f.source)
                } else {
                    f.source.clone()
                },
                layers: searched,
            });
        }
    }
    let records: Vec<FileRecord> = records.into_values().collect();
    let (files, staging, modes, limits) = (files.to_vec(), staging.to_path_buf(), *modes, *limits);
    let mut out = tokio::task::spawn_blocking(move || {
        check_and_split(&files, &staging, records, &modes, &limits)
    })
    .await
    .map_err(|e| PipelineError::Join(e.to_string()))??;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Checks one kernel or initramfs in staging by its real format.
fn check_file(
    spec: &FileSpec,
    staging: &Path,
    limits: &crate::assets::Limits,
) -> Result<(), PipelineError> {
    let path = staging.join(&spec.name);
    let open_err = |source| PipelineError::Write {
        path: path.clone(),
        source,
    };
    let failed = |source| PipelineError::Check {
        file: spec.name.clone(),
        kind: spec.kind,
        source,
    };
    let file = fs::File::open(&path).map_err(open_err)?;
    let verdict = if spec.kind == Kind::Kernel {
        let len = file.metadata().map_err(open_err)?.len();
        crate::assets::check_kernel_with(BufReader::new(file), len, limits).map_err(failed)?
    } else {
        crate::assets::check_initramfs_with(BufReader::with_capacity(READ_BUFFER, file), limits)
            .map_err(failed)?
    };
    tracing::info!(file = %spec.name, "{}: {verdict}", spec.kind);
    Ok(())
}

/// Checks every kernel and initramfs by its real format and splits UKIs into their parts, so
/// nothing that would not boot is published.
fn check_and_split(
    files: &[FileSpec],
    staging: &Path,
    mut records: Vec<FileRecord>,
    modes: &Modes,
    limits: &Limits,
) -> Result<Vec<FileRecord>, PipelineError> {
    // An initramfs unpacks to a few times its size; more is a bomb.
    let check_limits = crate::assets::Limits {
        max_decompressed: limits.max_file.saturating_mul(8),
    };
    let failed = |file: &str, kind: Kind| {
        let file = file.to_string();
        move |source| PipelineError::Check { file, kind, source }
    };
    let open_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PipelineError::Write { path, source }
    };
    // The checks read back what was just written (from the page cache); each file gets its own
    // thread, so on two cores the kernel and the initramfs are checked side by side.
    std::thread::scope(|scope| {
        let checks: Vec<_> = files
            .iter()
            .filter(|f| !f.is_dir && matches!(f.kind, Kind::Kernel | Kind::Initramfs))
            .map(|spec| scope.spawn(move || check_file(spec, staging, &check_limits)))
            .collect();
        for check in checks {
            check
                .join()
                .map_err(|_| PipelineError::Join("a format check panicked".into()))??;
        }
        Ok::<(), PipelineError>(())
    })?;
    for spec in files.iter().filter(|f| !f.is_dir) {
        match spec.kind {
            Kind::Raw | Kind::Kernel | Kind::Initramfs => {}
            Kind::Uki => {
                let uki = staging.join(uki_staging_name(spec));
                let outputs = spec.outputs();
                let [kernel, initrd, cmdline] = [0, 1, 2].map(|i| staging.join(&outputs[i]));
                let parts = crate::assets::extract_uki_with(
                    &uki,
                    &kernel,
                    &initrd,
                    &cmdline,
                    &check_limits,
                )
                .map_err(failed(&spec.name, spec.kind))?;
                tracing::info!(file = %spec.name, "UKI: kernel {}, {}, cmdline {:?}", parts.kernel, parts.initramfs, parts.cmdline);
                fs::remove_file(&uki).map_err(open_err(&uki))?;
                records.retain(|r| r.name != uki_staging_name(spec));
                for (name, section) in outputs.iter().zip([".linux", ".initrd", ".cmdline"]) {
                    let path = staging.join(name);
                    let file = fs::File::open(&path).map_err(open_err(&path))?;
                    crate::store::apply_file_modes(&file, modes).map_err(open_err(&path))?;
                    file.sync_all().map_err(open_err(&path))?;
                    let (size, sha256) = crate::store::hash_file(&path).map_err(open_err(&path))?;
                    records.push(FileRecord {
                        name: name.clone(),
                        size,
                        sha256,
                        source: format!("{}#{section}", spec.source),
                    });
                }
            }
        }
    }
    Ok(records)
}

/// Where and how files are written.
struct Output {
    dir: PathBuf,
    modes: Modes,
    limits: Limits,
}

/// What one layer contributed.
struct LayerFound {
    /// image path -> the file written for it
    files: HashMap<String, FileRecord>,
    deleted: Vec<String>,
    opaque: Vec<String>,
}

/// How a layer carries its files.
enum LayerKind {
    /// A tar archive (compressed or not), as in container images.
    Tar(Compression),
    /// One file, named by its `org.opencontainers.image.title` annotation (ORAS artifacts);
    /// compressed only when its media type ends in `+gzip`/`+zstd`.
    File {
        path: String,
        compression: Compression,
    },
}

const TITLE: &str = "org.opencontainers.image.title";
/// ORAS marks directories it packed as tar+gzip with this annotation.
const ORAS_UNPACK: &str = "io.deis.oras.content.unpack";

fn layer_kind(layer: &Descriptor) -> Result<LayerKind, PipelineError> {
    let title = layer.annotations.get(TITLE);
    let packed_dir = layer
        .annotations
        .get(ORAS_UNPACK)
        .is_some_and(|v| v == "true");
    match title {
        Some(title) if !packed_dir => {
            let path =
                crate::config::normalize_image_path(title).ok_or_else(|| PipelineError::Entry {
                    digest: layer.digest.clone(),
                    path: title.clone(),
                    reason: "the title annotation is not a plain relative path".into(),
                })?;
            let mt = layer.media_type.as_str();
            let compression = if mt.ends_with("+gzip") || mt.ends_with(".gzip") {
                Compression::Gzip
            } else if mt.ends_with("+zstd") || mt.ends_with(".zstd") {
                Compression::Zstd
            } else {
                Compression::None
            };
            Ok(LayerKind::File { path, compression })
        }
        _ => Compression::from_media_type(&layer.media_type)
            .map(LayerKind::Tar)
            .ok_or_else(|| PipelineError::MediaType {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            }),
    }
}

/// A single-file (artifact) layer: decompress if the media type says so, write the file.
fn walk_file(
    blob: &mut impl Read,
    layer: &Descriptor,
    compression: Compression,
    path: &str,
    files: &[FileSpec],
    out: &Output,
) -> Result<LayerFound, PipelineError> {
    let rel = destination(files, path).ok_or_else(|| PipelineError::NotFound {
        path: path.to_string(),
        layers: 1,
    })?;
    let (counted, compressed) = CountingReader::new(blob);
    let decoder = compression
        .decoder(BufReader::with_capacity(READ_BUFFER, counted))
        .map_err(|source| PipelineError::Read {
            digest: layer.digest.clone(),
            source,
        })?;
    let decoded = RatioLimit::new(decoder, compressed, out.limits.max_ratio, RATIO_GRACE);
    // One byte more than allowed tells an oversized file from one exactly at the cap.
    let mut capped = decoded.take(out.limits.max_file + 1);
    let record = write_file(
        &mut capped,
        &out.dir.join(&rel),
        &rel,
        path,
        &out.modes,
        &layer.digest,
    )?;
    if record.size > out.limits.max_file {
        return Err(PipelineError::Limit {
            what: format!("{path} in layer {}", layer.digest),
            limit: "max_file_size",
            max: out.limits.max_file,
            size: record.size,
        });
    }
    Ok(LayerFound {
        files: HashMap::from([(path.to_string(), record)]),
        deleted: Vec::new(),
        opaque: Vec::new(),
    })
}

/// A blob read to its end must hash to its digest and have its declared size; a corrupt blob
/// is reported as such even when the damage first showed up as a decoding error.
fn check_blob(
    layer: &Descriptor,
    finished: &io::Result<(u64, String)>,
) -> Result<(), PipelineError> {
    match finished {
        Ok((size, actual)) if actual != &layer.digest => Err(PipelineError::DigestMismatch {
            digest: layer.digest.clone(),
            actual: actual.clone(),
            size: *size,
        }),
        Ok((size, _)) if *size != layer.size => Err(PipelineError::SizeMismatch {
            digest: layer.digest.clone(),
            expected: layer.size,
            actual: *size,
        }),
        _ => Ok(()),
    }
}

/// Unpacks one layer blob read from `blob` into `staging` as the first (top) layer of an image:
/// the same checks as a sync (digest, size, decoder, tar entries, limits), without a registry.
/// Returns the files written. Used by the fuzz targets.
pub fn unpack_single_layer(
    blob: impl Read,
    layer: &Descriptor,
    files: &[FileSpec],
    staging: &Path,
    modes: &Modes,
    limits: &Limits,
) -> Result<Vec<FileRecord>, PipelineError> {
    let out = Output {
        dir: staging.to_path_buf(),
        modes: *modes,
        limits: *limits,
    };
    let kind = layer_kind(layer)?;
    let mut hashed = HashReader::new(blob, layer.size);
    let walked = walk_layer(&mut hashed, layer, &kind, files, &out, &Overlay::default());
    let found = judge(layer, hashed.finish(), walked)?;
    Ok(found.files.into_values().collect())
}

/// Walks one layer's content: the tar entries, or the single file of an artifact layer.
fn walk_layer(
    blob: &mut impl Read,
    layer: &Descriptor,
    kind: &LayerKind,
    files: &[FileSpec],
    out: &Output,
    overlay: &Overlay,
) -> Result<LayerFound, PipelineError> {
    match kind {
        LayerKind::Tar(compression) => walk_tar(blob, layer, *compression, files, out, overlay),
        LayerKind::File { path, compression } => {
            walk_file(blob, layer, *compression, path, files, out)
        }
    }
}

/// Judges a layer read to its end: a blob of the wrong size or digest is reported as such,
/// even when the damage first showed up as a decoding error; then the walk's own result.
fn judge(
    layer: &Descriptor,
    finished: io::Result<(u64, String)>,
    walked: Result<LayerFound, PipelineError>,
) -> Result<LayerFound, PipelineError> {
    check_blob(layer, &finished)?;
    let found = walked?;
    finished.map_err(|source| PipelineError::Read {
        digest: layer.digest.clone(),
        source,
    })?;
    Ok(found)
}

fn walk_tar<R: Read>(
    blob: R,
    layer: &Descriptor,
    compression: Compression,
    files: &[FileSpec],
    out: &Output,
    overlay: &Overlay,
) -> Result<LayerFound, PipelineError> {
    let read_err = |source: io::Error| PipelineError::Read {
        digest: layer.digest.clone(),
        source,
    };
    let entry_err = |path: &str, reason: String| PipelineError::Entry {
        digest: layer.digest.clone(),
        path: path.to_string(),
        reason,
    };
    let (counted, compressed) = CountingReader::new(blob);
    let decoder = compression
        .decoder(BufReader::with_capacity(READ_BUFFER, counted))
        .map_err(read_err)?;
    let mut decoded = SniffReader::new(RatioLimit::new(
        decoder,
        compressed,
        out.limits.max_ratio,
        RATIO_GRACE,
    ));
    let mut found = LayerFound {
        files: HashMap::new(),
        deleted: Vec::new(),
        opaque: Vec::new(),
    };
    let mut entries_read = 0u64;
    let walked = (|| {
        let mut archive = tar::Archive::new(&mut decoded);
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            entries_read += 1;
            let raw_path = entry.path_bytes();
            let raw_path = String::from_utf8_lossy(&raw_path).into_owned();
            // Paths with `..` or nothing left after normalising are never wanted: skip them.
            let Some(path) = crate::config::normalize_image_path(&raw_path) else {
                continue;
            };
            let (parent, base) = match path.rsplit_once('/') {
                Some((p, b)) => (p, b),
                None => ("", path.as_str()),
            };
            if base == ".wh..wh..opq" {
                found.opaque.push(parent.to_string());
                continue;
            }
            if let Some(name) = base.strip_prefix(".wh.") {
                found.deleted.push(if parent.is_empty() {
                    name.to_string()
                } else {
                    format!("{parent}/{name}")
                });
                continue;
            }
            if overlay.hidden(&path) || overlay.taken.contains(&path) {
                continue;
            }
            let Some(rel) = destination(files, &path) else {
                continue;
            };
            let kind = entry.header().entry_type();
            if kind.is_dir() {
                continue;
            }
            if !(kind.is_file() || kind.is_contiguous()) {
                return Err(entry_err(
                    &path,
                    format!(
                        "is a {kind:?} entry, not a regular file; only regular files are published"
                    ),
                ));
            }
            let size = entry.size();
            if size > out.limits.max_file {
                return Err(PipelineError::Limit {
                    what: format!("{path} in layer {}", layer.digest),
                    limit: "max_file_size",
                    max: out.limits.max_file,
                    size,
                });
            }
            let target = out.dir.join(&rel);
            let record = write_file(&mut entry, &target, &rel, &path, &out.modes, &layer.digest)?;
            found.files.insert(path, record);
        }
        Ok(())
    })();
    if let Err(e) = walked {
        // A first header that does not parse is most often a layer whose media type lies:
        // say what the bytes are instead of quoting the tar parser.
        if entries_read == 0 {
            if let Some(actual) = crate::io::sniff_format(decoded.head()) {
                return Err(PipelineError::Entry {
                    digest: layer.digest.clone(),
                    path: "(first entry)".into(),
                    reason: format!(
                        "not a tar archive: the media type says {:?}, but the content is {actual}",
                        layer.media_type
                    ),
                });
            }
        }
        return Err(e);
    }
    // The tar reader stops at the end-of-archive marker; read the rest so the decoder checks its
    // own framing (and trailing checksums) to the end.
    io::copy(&mut decoded, &mut io::sink()).map_err(read_err)?;
    Ok(found)
}

/// Copies one entry into a fresh staging file. Read errors (from the layer: decoding, digest,
/// limits) are told apart from write errors (the disk), so each is blamed on the right thing.
fn write_file(
    entry: &mut impl Read,
    target: &Path,
    rel: &Path,
    source: &str,
    modes: &Modes,
    layer: &str,
) -> Result<FileRecord, PipelineError> {
    let werr = |source: io::Error| PipelineError::Write {
        path: target.to_path_buf(),
        source,
    };
    let rerr = |source: io::Error| PipelineError::Read {
        digest: layer.to_string(),
        source,
    };
    if let Some(parent) = target.parent() {
        crate::store::create_dirs(parent, modes).map_err(werr)?;
    }
    crate::testhook::pause("writing");
    // Truncates: a later entry for the same path in one layer replaces an earlier one.
    let file = fs::File::create(target).map_err(werr)?;
    let mut out = HashWriter::new(io::BufWriter::with_capacity(READ_BUFFER, file));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(rerr(e)),
        };
        out.write_all(&buf[..n]).map_err(werr)?;
    }
    let (buffered, size, sha256) = out.finish();
    let file = buffered.into_inner().map_err(|e| werr(e.into_error()))?;
    crate::store::apply_file_modes(&file, modes).map_err(werr)?;
    // Durable before the version is renamed into place (fsynced here, on the unpacking thread).
    file.sync_all().map_err(werr)?;
    Ok(FileRecord {
        name: rel.to_string_lossy().into_owned(),
        size,
        sha256,
        source: source.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(source: &str, is_dir: bool, name: &str) -> FileSpec {
        FileSpec {
            source: source.into(),
            is_dir,
            name: name.into(),
            kind: Kind::Raw,
        }
    }

    use sha2::{Digest, Sha256};
    use std::io::Write;

    fn descriptor(media_type: &str, blob: &[u8], title: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{}", hex::encode(Sha256::digest(blob))),
            size: blob.len() as u64,
            annotations: title
                .map(|t| (TITLE.to_string(), t.to_string()))
                .into_iter()
                .collect(),
        }
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn unpack(
        blob: &[u8],
        desc: &Descriptor,
        files: &[FileSpec],
        limits: &Limits,
    ) -> (tempfile::TempDir, Result<Vec<FileRecord>, PipelineError>) {
        let dir = tempfile::tempdir().unwrap();
        let r = unpack_single_layer(blob, desc, files, dir.path(), &Modes::default(), limits);
        (dir, r)
    }

    #[test]
    fn a_tar_layer_yields_the_wanted_files_only() {
        let blob = tar_of(&[
            ("boot/vmlinuz", b"kernel"),
            ("etc/passwd", b"root"),
            ("usr/install/a/b", b"bee"),
        ]);
        let files = [
            spec("boot/vmlinuz", false, "k"),
            spec("usr/install", true, "inst"),
        ];
        let desc = descriptor("application/vnd.oci.image.layer.v1.tar", &blob, None);
        let (dir, r) = unpack(&blob, &desc, &files, &Limits::default());
        let mut names: Vec<String> = r.unwrap().into_iter().map(|f| f.name).collect();
        names.sort();
        assert_eq!(names, ["inst/a/b", "k"]);
        assert_eq!(fs::read(dir.path().join("k")).unwrap(), b"kernel");
        assert!(!dir.path().join("etc").exists());
    }

    #[test]
    fn a_corrupt_blob_is_reported_as_a_digest_mismatch() {
        let blob = tar_of(&[("boot/vmlinuz", b"kernel")]);
        let desc = descriptor("application/vnd.oci.image.layer.v1.tar", &blob, None);
        let mut bad = blob.clone();
        bad[600] ^= 0xff;
        let (_d, r) = unpack(
            &bad,
            &desc,
            &[spec("boot/vmlinuz", false, "k")],
            &Limits::default(),
        );
        assert!(
            matches!(r, Err(PipelineError::DigestMismatch { .. })),
            "{r:?}"
        );
        // and a blob longer than its descriptor says
        let mut long = blob.clone();
        long.extend_from_slice(&[0; 512]);
        let (_d, r) = unpack(
            &long,
            &desc,
            &[spec("boot/vmlinuz", false, "k")],
            &Limits::default(),
        );
        assert!(r.is_err());
    }

    #[test]
    fn artifact_layers_are_single_files_named_by_their_title() {
        let content = b"initramfs bytes ".repeat(1000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&content).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&content[..], 1).unwrap();
        for (media_type, blob) in [
            ("application/vnd.example.file", content.clone()),
            ("application/vnd.example.file+gzip", gz),
            ("application/vnd.example.file+zstd", zst),
        ] {
            let desc = descriptor(media_type, &blob, Some("initramfs.xz"));
            let (dir, r) = unpack(
                &blob,
                &desc,
                &[spec("initramfs.xz", false, "initrd")],
                &Limits::default(),
            );
            assert_eq!(r.unwrap().len(), 1, "{media_type}");
            assert_eq!(
                fs::read(dir.path().join("initrd")).unwrap(),
                content,
                "{media_type}"
            );
        }
        let desc = descriptor("application/vnd.example.file", b"x", Some("../escape"));
        assert!(matches!(
            layer_kind(&desc),
            Err(PipelineError::Entry { .. })
        ));
    }

    #[test]
    fn files_over_the_size_cap_are_refused() {
        let blob = tar_of(&[("boot/vmlinuz", &[7u8; 4096])]);
        let desc = descriptor("application/vnd.oci.image.layer.v1.tar", &blob, None);
        let limits = Limits {
            max_file: 1024,
            ..Limits::default()
        };
        let (_d, r) = unpack(&blob, &desc, &[spec("boot/vmlinuz", false, "k")], &limits);
        assert!(
            matches!(
                r,
                Err(PipelineError::Limit {
                    limit: "max_file_size",
                    ..
                })
            ),
            "{r:?}"
        );
        let raw = vec![7u8; 4096];
        let desc = descriptor("application/octet-stream", &raw, Some("vmlinuz"));
        let (_d, r) = unpack(&raw, &desc, &[spec("vmlinuz", false, "k")], &limits);
        assert!(
            matches!(
                r,
                Err(PipelineError::Limit {
                    limit: "max_file_size",
                    ..
                })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn destinations_follow_specs() {
        let files = [
            spec("a/vmlinuz", false, "k"),
            spec("usr/install", true, "inst"),
        ];
        assert_eq!(destination(&files, "a/vmlinuz"), Some(PathBuf::from("k")));
        assert_eq!(destination(&files, "a/vmlinuz2"), None);
        assert_eq!(
            destination(&files, "usr/install/arm64/x"),
            Some(PathBuf::from("inst/arm64/x"))
        );
        assert_eq!(destination(&files, "usr/installer/x"), None);
        assert_eq!(destination(&files, "usr/install"), None);
    }

    #[test]
    fn whiteouts_hide_paths_and_subtrees() {
        let o = Overlay {
            deleted: vec!["a/b".into()],
            opaque: vec!["c".into()],
            ..Default::default()
        };
        assert!(o.hidden("a/b"));
        assert!(o.hidden("a/b/c"));
        assert!(!o.hidden("a/bc"));
        assert!(o.hidden("c/x"));
        assert!(!o.hidden("c"));
        let root = Overlay {
            opaque: vec![String::new()],
            ..Default::default()
        };
        assert!(root.hidden("anything"));
    }
}
