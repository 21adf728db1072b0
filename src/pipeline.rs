//! The layer pipeline: walk an image's layers from the top down and write the wanted files into
//! a staging directory.
//!
//! Each layer streams `HTTP -> sha256 -> decompress -> tar entries -> wanted regular files`; the
//! download runs on the async runtime and the rest on a blocking thread, joined by a small
//! channel, so memory stays flat whatever the layer size. Every blob is read to its end through
//! the hasher and checked against its descriptor before its files count.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::assets::Kind;
use crate::config::FileSpec;
use crate::config::{Limits, Modes};
use crate::io::{ChannelReader, Compression, CountingReader, HashReader, HashWriter, RatioLimit};
use crate::registry::{Descriptor, Registry};
use crate::store::FileRecord;

/// Chunks in flight between the download and the unpacker (reqwest chunks are ~8-16 KiB).
const CHANNEL_DEPTH: usize = 64;
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
        downloaded += layer.size;
        if downloaded > limits.max_download {
            return Err(PipelineError::Limit {
                what: format!("the layers needed so far (up to {})", layer.digest),
                limit: "max_download_size",
                max: limits.max_download,
                size: downloaded,
            });
        }
        let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
            PipelineError::MediaType {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            }
        })?;
        tracing::info!(layer = %layer.digest, size = layer.size, "reading layer");

        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let download = registry.stream_blob(layer, tx);
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
                let result = unpack_layer(
                    ChannelReader::new(rx),
                    &layer,
                    compression,
                    &files,
                    &out,
                    &overlay,
                );
                (overlay, result)
            })
        };
        let ((), joined) = tokio::join!(download, unpack);
        let (returned, result) = joined.map_err(|e| PipelineError::Join(e.to_string()))?;
        overlay = returned;
        let found = result?;

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
    for spec in files.iter().filter(|f| !f.is_dir) {
        match spec.kind {
            Kind::Raw => {}
            Kind::Kernel => {
                let path = staging.join(&spec.name);
                let file = fs::File::open(&path).map_err(open_err(&path))?;
                let len = file.metadata().map_err(open_err(&path))?.len();
                let verdict =
                    crate::assets::check_kernel_with(BufReader::new(file), len, &check_limits)
                        .map_err(failed(&spec.name, spec.kind))?;
                tracing::info!(file = %spec.name, "kernel: {verdict}");
            }
            Kind::Initramfs => {
                let path = staging.join(&spec.name);
                let file = fs::File::open(&path).map_err(open_err(&path))?;
                let verdict = crate::assets::check_initramfs_with(
                    BufReader::with_capacity(READ_BUFFER, file),
                    &check_limits,
                )
                .map_err(failed(&spec.name, spec.kind))?;
                tracing::info!(file = %spec.name, "{verdict}");
            }
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

/// Runs on a blocking thread: hash, decompress and walk one layer, writing wanted files.
fn unpack_layer(
    blob: ChannelReader,
    layer: &Descriptor,
    compression: Compression,
    files: &[FileSpec],
    out: &Output,
    overlay: &Overlay,
) -> Result<LayerFound, PipelineError> {
    let mut hashed = HashReader::new(blob, layer.size);
    let walked = walk_tar(&mut hashed, layer, compression, files, out, overlay);
    // Always read the blob to its end through the hasher: a corrupt blob must be reported as
    // such, even when the damage first shows up as a decoding error.
    let finished = hashed.finish();
    let digest_err = match &finished {
        Ok((size, actual)) if actual != &layer.digest => Some(PipelineError::DigestMismatch {
            digest: layer.digest.clone(),
            actual: actual.clone(),
            size: *size,
        }),
        Ok((size, _)) if *size != layer.size => Some(PipelineError::SizeMismatch {
            digest: layer.digest.clone(),
            expected: layer.size,
            actual: *size,
        }),
        _ => None,
    };
    if let Some(e) = digest_err {
        return Err(e);
    }
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
    let mut decoded = RatioLimit::new(decoder, compressed, out.limits.max_ratio, RATIO_GRACE);
    let mut found = LayerFound {
        files: HashMap::new(),
        deleted: Vec::new(),
        opaque: Vec::new(),
    };
    {
        let mut archive = tar::Archive::new(&mut decoded);
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
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
            let record = write_file(&mut entry, &target, &rel, &path, &out.modes)?;
            found.files.insert(path, record);
        }
    }
    // The tar reader stops at the end-of-archive marker; read the rest so the decoder checks its
    // own framing (and trailing checksums) to the end.
    io::copy(&mut decoded, &mut io::sink()).map_err(read_err)?;
    Ok(found)
}

fn write_file(
    entry: &mut impl Read,
    target: &Path,
    rel: &Path,
    source: &str,
    modes: &Modes,
) -> Result<FileRecord, PipelineError> {
    let werr = |source: io::Error| PipelineError::Write {
        path: target.to_path_buf(),
        source,
    };
    if let Some(parent) = target.parent() {
        crate::store::create_dirs(parent, modes).map_err(werr)?;
    }
    crate::testhook::pause("writing");
    // Truncates: a later entry for the same path in one layer replaces an earlier one.
    let file = fs::File::create(target).map_err(werr)?;
    let mut out = HashWriter::new(io::BufWriter::with_capacity(READ_BUFFER, file));
    io::copy(entry, &mut out).map_err(werr)?;
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
