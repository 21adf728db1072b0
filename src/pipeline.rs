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

use crate::config::FileSpec;
use crate::io::{ChannelReader, Compression, HashReader, HashWriter};
use crate::registry::{Descriptor, Registry};
use crate::store::{FileRecord, FILE_MODE};

/// Chunks in flight between the download and the unpacker (reqwest chunks are ~8-16 KiB).
const CHANNEL_DEPTH: usize = 64;
const READ_BUFFER: usize = 256 * 1024;

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

/// Where a wanted image path goes in the staging directory.
fn destination(files: &[FileSpec], path: &str) -> Option<PathBuf> {
    files.iter().find_map(|f| {
        if !f.is_dir && f.source == path {
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
) -> Result<Vec<FileRecord>, PipelineError> {
    let mut overlay = Overlay::default();
    let mut records: HashMap<PathBuf, FileRecord> = HashMap::new();
    let exact: Vec<&FileSpec> = files.iter().filter(|f| !f.is_dir).collect();
    let has_dirs = files.iter().any(|f| f.is_dir);
    let mut searched = 0;

    for layer in layers.iter().rev() {
        if !has_dirs && exact.iter().all(|f| overlay.taken.contains(&f.source)) {
            break;
        }
        searched += 1;
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
            let staging = staging.to_path_buf();
            let overlay = std::mem::take(&mut overlay);
            tokio::task::spawn_blocking(move || {
                let result = unpack_layer(
                    ChannelReader::new(rx),
                    &layer,
                    compression,
                    &files,
                    &staging,
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
    let mut out: Vec<FileRecord> = records.into_values().collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
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
    staging: &Path,
    overlay: &Overlay,
) -> Result<LayerFound, PipelineError> {
    let mut hashed = HashReader::new(blob, layer.size);
    let walked = walk_tar(&mut hashed, layer, compression, files, staging, overlay);
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
    staging: &Path,
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
    let mut decoded = compression
        .decoder(BufReader::with_capacity(READ_BUFFER, blob))
        .map_err(read_err)?;
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
            let target = staging.join(&rel);
            let record = write_file(&mut entry, &target, &rel, &path)?;
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
) -> Result<FileRecord, PipelineError> {
    let werr = |source: io::Error| PipelineError::Write {
        path: target.to_path_buf(),
        source,
    };
    if let Some(parent) = target.parent() {
        crate::store::create_dirs(parent).map_err(werr)?;
    }
    // Truncates: a later entry for the same path in one layer replaces an earlier one.
    let file = fs::File::create(target).map_err(werr)?;
    let mut out = HashWriter::new(io::BufWriter::with_capacity(READ_BUFFER, file));
    io::copy(entry, &mut out).map_err(werr)?;
    let (buffered, size, sha256) = out.finish();
    let file = buffered.into_inner().map_err(|e| werr(e.into_error()))?;
    crate::store::set_mode(&file, FILE_MODE).map_err(werr)?;
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
