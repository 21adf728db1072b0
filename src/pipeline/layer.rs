//! One layer blob as a stream of entries: what kind of layer it is (a container image's tar, or
//! an ORAS artifact's file or directory), and the walk that tells a visitor about every entry.

use std::io::{self, BufReader, Read};

use crate::config::normalize_image_path;
#[cfg(test)]
use crate::digest::Digest;
use crate::io::{Compression, CountingReader, RatioLimit, SniffReader};
use crate::registry::Descriptor;

use super::overlay::{join_in_root, Node};
use super::PipelineError;

const READ_BUFFER: usize = 256 * 1024;
/// Decompressed bytes a layer may produce before the compression-ratio cap applies.
const RATIO_GRACE: u64 = 16 << 20;
const BLOCK: u64 = 512;

pub(crate) const TITLE: &str = "org.opencontainers.image.title";
/// The Go ORAS CLI marks directories it packed as tar+gzip with this annotation.
pub(crate) const ORAS_UNPACK: &str = "io.deis.oras.content.unpack";

/// How a layer carries its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LayerKind {
    /// A tar archive (compressed or not), as in container images. An ORAS directory layer is
    /// one too, its entries placed under `prefix` (the parent of its title), as `oras pull`
    /// extracts them.
    Tar {
        compression: Compression,
        prefix: String,
    },
    /// One file, named by its `org.opencontainers.image.title` annotation (an ORAS artifact):
    /// the blob itself, byte for byte, whatever its media type says (as `oras pull` writes it).
    File { path: String },
}

/// The kind of `layer`. A title-annotated layer is a directory to unpack when it says so (the
/// Go CLI's unpack annotation), or when its media type is a tar type and a wanted path lies
/// below its title (oras-py packs directories so, without the annotation); otherwise it is a
/// file.
pub(crate) fn layer_kind(
    layer: &Descriptor,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<LayerKind, PipelineError> {
    let tar = Compression::from_media_type(&layer.media_type);
    let Some(title) = layer.annotations.get(TITLE) else {
        return tar
            .map(|compression| LayerKind::Tar {
                compression,
                prefix: String::new(),
            })
            .ok_or_else(|| PipelineError::MediaType {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
    };
    let path = normalize_image_path(title).ok_or_else(|| PipelineError::Entry {
        digest: layer.digest.clone(),
        path: title.clone(),
        reason: "the title annotation is not a plain relative path".into(),
    })?;
    let unpack = layer
        .annotations
        .get(ORAS_UNPACK)
        .is_some_and(|v| v == "true");
    match tar {
        Some(compression) if unpack || wanted(&path) => Ok(LayerKind::Tar {
            compression,
            prefix: path.rsplit_once('/').map_or("", |(p, _)| p).to_string(),
        }),
        None if unpack => Err(PipelineError::MediaType {
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
        }),
        _ => Ok(LayerKind::File { path }),
    }
}

/// What the walk tells a visitor.
#[derive(Debug)]
pub(crate) enum Event<'a> {
    /// An entry (a regular file's bytes can be read from the content reader).
    Entry { path: &'a str, node: Node },
    /// `.wh.NAME`: this path is deleted from the layers below.
    Whiteout(&'a str),
    /// `.wh..wh..opq` in this directory (`""` for the root).
    Opaque(&'a str),
}

/// Told about every entry of a layer, in archive order.
pub(crate) trait Visitor {
    /// `content` reads a regular file's bytes (nothing for other events); the visitor may
    /// leave them unread.
    fn visit(&mut self, event: Event<'_>, content: &mut dyn Read) -> Result<(), PipelineError>;
}

/// Walks one layer blob: the tar entries, or the single file of an artifact layer. The blob is
/// not drained here: the caller reads it to its end and judges it by its digest.
pub(crate) fn walk(
    blob: &mut dyn Read,
    layer: &Descriptor,
    kind: &LayerKind,
    max_ratio: u64,
    visitor: &mut dyn Visitor,
) -> Result<(), PipelineError> {
    match kind {
        LayerKind::Tar {
            compression,
            prefix,
        } => walk_tar(blob, layer, *compression, prefix, max_ratio, visitor),
        LayerKind::File { path } => visitor.visit(
            Event::Entry {
                path,
                node: Node::File { size: layer.size },
            },
            blob,
        ),
    }
}

/// Past the end of the decoded tar stream, supplies the zero padding and end-of-archive blocks
/// that some writers leave out (umoci 0.4.7's `insert`: opencontainers/umoci#436), and notes
/// where the real data ended, so a truncated last entry is still told apart.
struct EndPad<R> {
    inner: R,
    pos: u64,
    /// Where the real stream ended, once it has.
    end: Option<u64>,
    zeros: u64,
}

impl<R: Read> Read for EndPad<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.end.is_none() {
            let n = self.inner.read(buf)?;
            if n > 0 || buf.is_empty() {
                self.pos += n as u64;
                return Ok(n);
            }
            self.end = Some(self.pos);
            // To the next block boundary, then two zero blocks.
            self.zeros = (BLOCK - self.pos % BLOCK) % BLOCK + 2 * BLOCK;
        }
        let n = buf
            .len()
            .min(usize::try_from(self.zeros).unwrap_or(usize::MAX));
        buf[..n].fill(0);
        self.zeros -= n as u64;
        Ok(n)
    }
}

/// The last entry seen: to blame a truncation on it.
struct LastEntry {
    path: String,
    data_at: u64,
    size: u64,
}

fn walk_tar(
    blob: &mut dyn Read,
    layer: &Descriptor,
    compression: Compression,
    prefix: &str,
    max_ratio: u64,
    visitor: &mut dyn Visitor,
) -> Result<(), PipelineError> {
    let read_err = |source: io::Error| PipelineError::Read {
        digest: layer.digest.clone(),
        source,
    };
    let (counted, compressed) = CountingReader::new(blob);
    let decoder = compression
        .decoder(BufReader::with_capacity(READ_BUFFER, counted))
        .map_err(read_err)?;
    let mut decoded = EndPad {
        inner: SniffReader::new(RatioLimit::new(decoder, compressed, max_ratio, RATIO_GRACE)),
        pos: 0,
        end: None,
        zeros: 0,
    };
    let mut last: Option<LastEntry> = None;
    let mut entries_read = 0u64;
    let walked = (|| {
        let mut archive = tar::Archive::new(&mut decoded);
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            entries_read += 1;
            let raw_path = entry.path_bytes();
            let raw_path = String::from_utf8_lossy(&raw_path).into_owned();
            last = Some(LastEntry {
                path: raw_path.clone(),
                data_at: entry.raw_file_position(),
                size: entry.size(),
            });
            // Paths with `..` or nothing left after normalising can never be wanted: skip them.
            let Some(path) = normalize_image_path(&raw_path) else {
                continue;
            };
            let path = if prefix.is_empty() {
                path
            } else {
                format!("{prefix}/{path}")
            };
            let (parent, base) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            if base == ".wh..wh..opq" {
                visitor.visit(Event::Opaque(parent), &mut io::empty())?;
                continue;
            }
            if let Some(name) = base.strip_prefix(".wh.") {
                let deleted = if parent.is_empty() {
                    name.to_string()
                } else {
                    format!("{parent}/{name}")
                };
                visitor.visit(Event::Whiteout(&deleted), &mut io::empty())?;
                continue;
            }
            let kind = entry.header().entry_type();
            let node = if kind.is_file() || kind.is_contiguous() {
                Node::File { size: entry.size() }
            } else if kind.is_dir() {
                Node::Dir
            } else if kind.is_symlink() {
                let target = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                Node::Symlink(target.into())
            } else if kind.is_hard_link() {
                let target = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                // Archive paths; one that climbs out of the archive names nothing in it.
                match normalize_image_path(&target) {
                    Some(t) if prefix.is_empty() => Node::Hardlink(t.into()),
                    Some(t) => Node::Hardlink(join_in_root(prefix, &t).into()),
                    None => Node::Other("hard link to a path outside the image"),
                }
            } else if kind.is_pax_global_extensions() {
                continue;
            } else if kind.is_character_special() {
                Node::Other("character device")
            } else if kind.is_block_special() {
                Node::Other("block device")
            } else if kind.is_fifo() {
                Node::Other("FIFO")
            } else {
                Node::Other("tar entry of an unsupported type")
            };
            visitor.visit(Event::Entry { path: &path, node }, &mut entry)?;
        }
        Ok(())
    })();
    let end = decoded.end;
    if let Err(e) = walked {
        // A first header that does not parse is most often a layer whose media type lies:
        // say what the bytes are instead of quoting the tar parser.
        if entries_read == 0 {
            if let Some(actual) = crate::io::sniff_format(decoded.inner.head()) {
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
        return Err(match (end, e) {
            (Some(end), PipelineError::Read { .. }) => truncated(layer, last.as_ref(), end),
            (_, e) => e,
        });
    }
    if let (Some(end), Some(l)) = (end, &last) {
        if l.data_at.saturating_add(l.size) > end {
            return Err(truncated(layer, Some(l), end));
        }
        tracing::debug!(layer = %layer.digest, "tar archive without end-of-archive blocks (accepted: its last entry is whole)");
    }
    // The tar reader stops at the end-of-archive marker; read the rest so the decoder checks its
    // own framing (and trailing checksums) to the end.
    io::copy(&mut decoded, &mut io::sink()).map_err(read_err)?;
    Ok(())
}

fn truncated(layer: &Descriptor, last: Option<&LastEntry>, end: u64) -> PipelineError {
    match last {
        Some(l) if l.data_at.saturating_add(l.size) > end => PipelineError::Entry {
            digest: layer.digest.clone(),
            path: l.path.clone(),
            reason: format!(
                "truncated: its header says {} bytes from offset {}, but the layer's tar ends at offset {end}",
                l.size, l.data_at
            ),
        },
        _ => PipelineError::Entry {
            digest: layer.digest.clone(),
            path: last.map_or_else(|| "(first entry)".to_string(), |l| format!("after {}", l.path)),
            reason: format!("the layer's tar ends at offset {end}, inside an entry's header"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_pad_supplies_the_missing_blocks_and_notes_the_end() {
        let mut p = EndPad {
            inner: &[1u8; 600][..],
            pos: 0,
            end: None,
            zeros: 0,
        };
        let mut out = Vec::new();
        p.read_to_end(&mut out).unwrap();
        assert_eq!(p.end, Some(600));
        assert_eq!(out.len(), 1024 + 1024);
        assert!(out[600..].iter().all(|&b| b == 0));
    }

    fn desc(media_type: &str, title: Option<&str>, unpack: bool) -> Descriptor {
        let mut annotations = std::collections::BTreeMap::new();
        if let Some(t) = title {
            annotations.insert(TITLE.to_string(), t.to_string());
        }
        if unpack {
            annotations.insert(ORAS_UNPACK.to_string(), "true".to_string());
        }
        Descriptor {
            media_type: media_type.into(),
            digest: Digest::of(b"a"),
            size: 1,
            annotations,
        }
    }

    #[test]
    fn artifact_layers_are_files_unless_they_are_directories() {
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        let none = |_: &str| false;
        let below = |p: &str| p == "assets";
        type Wanted<'a> = &'a dyn Fn(&str) -> bool;
        let cases: [(Descriptor, Wanted, LayerKind); 5] = [
            (
                desc(gz, None, false),
                &none,
                LayerKind::Tar {
                    compression: Compression::Gzip,
                    prefix: String::new(),
                },
            ),
            // oras-py: a directory is a title-annotated tar+gzip layer without the annotation
            (
                desc(gz, Some("assets"), false),
                &below,
                LayerKind::Tar {
                    compression: Compression::Gzip,
                    prefix: String::new(),
                },
            ),
            (
                desc(gz, Some("x/assets"), true),
                &none,
                LayerKind::Tar {
                    compression: Compression::Gzip,
                    prefix: "x".into(),
                },
            ),
            // a tar+gzip file nobody wants below: the blob itself
            (
                desc(gz, Some("assets"), false),
                &none,
                LayerKind::File {
                    path: "assets".into(),
                },
            ),
            (
                desc(
                    "application/vnd.acme.blob+gzip",
                    Some("hello.txt.gz"),
                    false,
                ),
                &none,
                LayerKind::File {
                    path: "hello.txt.gz".into(),
                },
            ),
        ];
        for (d, wanted, want) in cases {
            assert_eq!(layer_kind(&d, wanted).unwrap(), want, "{d:?}");
        }
        assert!(layer_kind(&desc("application/json", None, false), &none).is_err());
        assert!(layer_kind(&desc("x", Some("../escape"), false), &none).is_err());
    }
}
