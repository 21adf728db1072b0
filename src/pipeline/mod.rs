//! The layer pipeline: read an image's layers from the top down, build the merged view a
//! container runtime would show, and write the wanted files into a staging directory.
//!
//! Each layer streams `HTTP -> sha256 -> decompress -> tar entries`; the download runs on the
//! async runtime and the rest on a blocking thread, joined by a small channel, so memory stays
//! flat whatever the layer size. Every blob is read to its end through the hasher and checked
//! against its descriptor before anything it holds counts.
//!
//! While a layer streams, every entry is indexed (path and kind, not content: `overlay`) and
//! the files that the wanted paths resolve to so far are captured into `.parts/`. After each
//! layer the walk asks whether one of the target's layouts is complete; lower layers are never
//! downloaded once one is. A path that resolves (through a symlink or hard link) to a file in a
//! layer already read is fetched by reading that layer once more: rare, and logged.

mod checks;
mod layer;
mod overlay;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt as _;

use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::bootfile::Kind;
use crate::config::{FileSpec, Layout, Limits, Modes};
use crate::digest::Digest;
use crate::io::{Beside, ChannelReader, HashReader, HashWriter, LimitReader, WritebackFile};
use crate::registry::{Descriptor, Registry};
use crate::store::{BootInfo, FileRecord};

use layer::{Event, LayerKind, Visitor};
use overlay::{Gone, LayerIndex, Node, Resolved, Seen, View};

/// Chunks in flight between the download and the unpacker (reqwest chunks are ~8-16 KiB).
const CHANNEL_DEPTH: usize = 8;
/// Layers read at once when several are needed and known up front (containerd's default
/// `max_concurrent_downloads`).
const PARALLEL_READS: usize = 3;
const COPY_BUFFER: usize = 64 * 1024;
const WRITE_BUFFER: usize = 256 * 1024;
/// Index entries one sync may hold (about 100 bytes each): far beyond real images.
const MAX_INDEXED: usize = 4_000_000;
/// Boot-file-like paths named in a "not found" error.
const MAX_CANDIDATES: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("layer {digest}: unsupported media type {media_type:?}")]
    MediaType { digest: Digest, media_type: String },
    #[error("layer {digest}: digest mismatch: content hashes to {actual} ({size} bytes); the blob is corrupt or was altered")]
    DigestMismatch {
        digest: Digest,
        actual: Digest,
        size: u64,
    },
    #[error("layer {digest}: size mismatch: descriptor says {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("layer {digest}: {source}")]
    Read {
        digest: Digest,
        #[source]
        source: io::Error,
    },
    #[error("layer {digest}: {path}: {reason}")]
    Entry {
        digest: Digest,
        path: String,
        reason: String,
    },
    /// No layout of the target is complete in the image; says what is missing and why, and
    /// what boot-file-like paths the image does hold.
    #[error("{missing}{candidates}")]
    NotFound { missing: String, candidates: String },
    /// A wanted path leads to something that is not published (a device, a link loop, a
    /// directory where a file is wanted).
    #[error("{path}: {reason}; only regular files are published")]
    Refused { path: String, reason: String },
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
        kind: crate::bootfile::Kind,
        #[source]
        source: crate::bootfile::CheckError,
    },
}

/// What a pipeline run wrote into staging.
#[derive(Debug)]
pub struct Extracted {
    /// Every published file, sorted by name.
    pub files: Vec<FileRecord>,
    /// What a UKI said about itself, when the layout had one.
    pub boot: Option<BootInfo>,
    /// Which of the target's layouts the image holds.
    pub layout: usize,
}

/// Where layer blobs come from: the registry, or (fuzzing) bytes in memory.
pub(crate) trait Fetch: Sync {
    /// Streams `layer` through `visitor` and judges the blob by its digest; returns the visitor.
    fn read<V: Visitor + Send + 'static>(
        &self,
        layer: &Descriptor,
        kind: &LayerKind,
        max_ratio: u64,
        visitor: V,
    ) -> impl Future<Output = Result<V, PipelineError>> + Send;
}

impl Fetch for Registry {
    async fn read<V: Visitor + Send + 'static>(
        &self,
        layer: &Descriptor,
        kind: &LayerKind,
        max_ratio: u64,
        mut visitor: V,
    ) -> Result<V, PipelineError> {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        // The blob is hashed on the download task as chunks arrive, so hashing overlaps
        // decompression on the other core.
        let mut hasher = Sha256::new();
        let started = std::time::Instant::now();
        let download = async {
            self.stream_blob(layer, tx, &mut hasher).await;
            std::time::Instant::now()
        };
        let unpack = {
            let (layer, kind) = (layer.clone(), kind.clone());
            tokio::task::spawn_blocking(move || {
                let mut blob = LimitReader::new(ChannelReader::new(rx), layer.size);
                let walked = layer::walk(&mut blob, &layer, &kind, max_ratio, &mut visitor);
                // Read the blob to its end even after an error: it is judged by its digest.
                let drained = blob.finish();
                (visitor, walked, drained)
            })
        };
        let (last_byte, joined) = tokio::join!(download, unpack);
        let (visitor, walked, drained) = joined.map_err(|e| PipelineError::Join(e.to_string()))?;
        let digest = Digest::from_hasher(hasher);
        judge(layer, drained.map(|n| (n, digest)), walked)?;
        let secs = last_byte.duration_since(started).as_secs_f64();
        let after_last_byte_ms = last_byte.elapsed().as_millis() as u64;
        tracing::info!(
            layer = %layer.digest,
            secs,
            after_last_byte_ms,
            "layer read: {} in {secs:.2} s ({:.1} MB/s); unpacked, checked and fsynced {after_last_byte_ms} ms after its last byte",
            crate::bootfile::mb(layer.size),
            layer.size as f64 / 1e6 / secs.max(1e-6),
        );
        Ok(visitor)
    }
}

/// Layer blobs held in memory (the fuzz targets and unit tests).
struct InMemory<'a> {
    blobs: HashMap<Digest, &'a [u8]>,
}

impl Fetch for InMemory<'_> {
    async fn read<V: Visitor + Send + 'static>(
        &self,
        layer: &Descriptor,
        kind: &LayerKind,
        max_ratio: u64,
        mut visitor: V,
    ) -> Result<V, PipelineError> {
        let bytes = self.blobs.get(&layer.digest).copied().unwrap_or_default();
        let mut hashed = HashReader::new(bytes, layer.size);
        let walked = layer::walk(&mut hashed, layer, kind, max_ratio, &mut visitor);
        judge(layer, hashed.finish(), walked)?;
        Ok(visitor)
    }
}

/// Judges a layer read to its end: a blob of the wrong size or digest is reported as such,
/// even when the damage first showed up as a decoding error; then the walk's own result.
fn judge(
    layer: &Descriptor,
    finished: io::Result<(u64, Digest)>,
    walked: Result<(), PipelineError>,
) -> Result<(), PipelineError> {
    match &finished {
        Ok((size, actual)) if actual != &layer.digest => {
            return Err(PipelineError::DigestMismatch {
                digest: layer.digest.clone(),
                actual: actual.clone(),
                size: *size,
            })
        }
        Ok((size, _)) if *size != layer.size => {
            return Err(PipelineError::SizeMismatch {
                digest: layer.digest.clone(),
                expected: layer.size,
                actual: *size,
            })
        }
        _ => {}
    }
    walked?;
    finished.map_err(|source| PipelineError::Read {
        digest: layer.digest.clone(),
        source,
    })?;
    Ok(())
}

/// Extracts one of the target's `layouts` from the image `layers` (bottom first, as in the
/// manifest) into `staging`, downloading only the layers it needs.
pub async fn extract(
    registry: &Registry,
    layers: &[Descriptor],
    layouts: &[Layout],
    staging: &Path,
    modes: &Modes,
    limits: &Limits,
) -> Result<Extracted, PipelineError> {
    loop {
        let run = Run::new(layers, layouts, staging, modes, limits)?
            .extract(registry)
            .await;
        // A blob that failed its digest after a mirror sent (some of) it is read again, with
        // that mirror skipped for it; one the registry itself sent fails the sync.
        let bad = match &run {
            Err(PipelineError::DigestMismatch { digest, .. })
            | Err(PipelineError::SizeMismatch { digest, .. }) => digest.clone(),
            _ => return run,
        };
        let mirrors = registry.distrust(&bad);
        if mirrors.is_empty() {
            return run;
        }
        if let Err(e) = &run {
            tracing::warn!(
                layer = %bad,
                mirrors = %mirrors.join(", "),
                "{e}; skipping the mirror for this blob and starting the image again"
            );
        }
        let dir = staging.to_path_buf();
        tokio::task::spawn_blocking(move || empty_dir(&dir))
            .await
            .map_err(|e| PipelineError::Join(e.to_string()))?
            .map_err(|source| PipelineError::Write {
                path: staging.to_path_buf(),
                source,
            })?;
    }
}

/// Removes everything inside `dir`, keeping `dir`.
fn empty_dir(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Finds the boot-file-like files of an image (`bootsync inspect`), reading layers from the top
/// down only until one holds a kernel or a UKI; their content is staged in `scratch`.
pub async fn find_candidates(
    registry: &Registry,
    layers: &[Descriptor],
    scratch: &Path,
    limits: &Limits,
) -> Result<Vec<Candidate>, PipelineError> {
    let modes = Modes::default();
    Run::new(layers, &[], scratch, &modes, limits)?
        .candidates(registry)
        .await
}

/// What a sync of these layers would do, known without reading any (the dry run).
#[derive(Debug)]
pub struct Preview {
    /// Top first: digest, size, and what the descriptor says of the layer.
    pub layers: Vec<(Digest, u64, String)>,
    /// Failures certain before a byte is read (an unreadable top layer, a cap, an artifact
    /// that does not hold the files).
    pub problems: Vec<String>,
    /// Whether the layers are all artifact files, so that what they hold is known.
    pub known: bool,
}

/// Previews a sync of `layers` (bottom first) for `layouts`.
pub fn preview(layers: &[Descriptor], layouts: &[Layout], limits: &Limits) -> Preview {
    let staging = Path::new("/nonexistent");
    let modes = Modes::default();
    let Ok(run) = Run::new(layers, layouts, staging, &modes, limits) else {
        return Preview {
            layers: Vec::new(),
            problems: vec!["internal: cannot plan".into()],
            known: false,
        };
    };
    let below = |title: &str| {
        run.queries.iter().any(|q| {
            q.source
                .strip_prefix(title)
                .is_some_and(|r| r.starts_with('/'))
        })
    };
    let mut out = Preview {
        layers: Vec::new(),
        problems: Vec::new(),
        known: true,
    };
    let mut indexes = Vec::new();
    let mut first_read = true;
    for desc in &run.layers {
        let note = match layer::layer_kind(desc, &below) {
            Ok(LayerKind::File { path }) => {
                let wanted = run.queries.iter().any(|q| q.source == path);
                let mut index = LayerIndex::default();
                index.add(&path, Node::File { size: desc.size });
                indexes.push(index);
                if wanted {
                    format!("artifact file {path}: wanted")
                } else {
                    format!("artifact file {path}: not wanted, never downloaded")
                }
            }
            Ok(LayerKind::Tar { compression, .. }) => {
                out.known = false;
                if first_read && desc.size > limits.max_download {
                    out.problems.push(format!(
                        "layer {} alone ({} bytes) is larger than max_download_size ({} bytes)",
                        desc.digest, desc.size, limits.max_download
                    ));
                }
                first_read = false;
                format!("tar ({compression:?})").to_lowercase()
            }
            Err(e) => {
                out.known = false;
                if first_read {
                    out.problems
                        .push(format!("the top layer cannot be read: {e}"));
                }
                first_read = false;
                format!("{e}: a sync that must read this layer fails")
            }
        };
        out.layers.push((desc.digest.clone(), desc.size, note));
    }
    if out.known {
        let refs: Vec<&LayerIndex> = indexes.iter().collect();
        let view = View::new(&refs, true);
        if !matches!(run.decide(&view), Decision::Chosen(_)) {
            out.problems.push(run.not_found(&view).to_string());
        }
    }
    out
}

/// Unpacks `blob` as the only layer of an image into `staging`: the same walk, resolution and
/// checks as a sync, without a registry. Returns the files written. Used by the fuzz targets.
pub fn unpack_single_layer(
    blob: &[u8],
    layer: &Descriptor,
    files: &[FileSpec],
    staging: &Path,
    modes: &Modes,
    limits: &Limits,
) -> Result<Vec<FileRecord>, PipelineError> {
    let layouts = [Layout {
        files: files.to_vec(),
    }];
    let fetch = InMemory {
        blobs: HashMap::from([(layer.digest.clone(), blob)]),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| PipelineError::Join(e.to_string()))?;
    let layers = std::slice::from_ref(layer);
    let run = Run::new(layers, &layouts, staging, modes, limits)?;
    runtime
        .block_on(run.extract(&fetch))
        .map(|extracted| extracted.files)
}

/// One wanted path: a layout's file or directory.
#[derive(Debug, Clone)]
struct Query {
    source: String,
    is_dir: bool,
}

/// Where the queries lead in the layer being read (recomputed when its links change that).
#[derive(Debug, Default)]
struct Targets {
    files: HashSet<String>,
    dirs: Vec<String>,
}

impl Targets {
    fn of(view: &View<'_>, queries: &[Query], at: usize) -> Targets {
        let mut t = Targets::default();
        for q in queries {
            match overlay::resolve(view, &q.source) {
                Resolved::Open { path } if q.is_dir => t.dirs.push(path),
                Resolved::Dir { path, .. } if q.is_dir => t.dirs.push(path),
                Resolved::Open { path } => {
                    t.files.insert(path);
                }
                Resolved::File { layer, path, .. } if layer == at => {
                    t.files.insert(path);
                }
                _ => {}
            }
        }
        t
    }

    /// Whether an entry at `path` lies on the way to a target (so it may change where it leads).
    fn on_the_way(&self, path: &str) -> bool {
        let leads = |t: &str| t == path || t.strip_prefix(path).is_some_and(|r| r.starts_with('/'));
        self.files.iter().any(|t| leads(t)) || self.dirs.iter().any(|d| leads(d))
    }

    fn wants(&self, path: &str) -> bool {
        self.files.contains(path)
            || self.dirs.iter().any(|d| {
                d.is_empty()
                    || path
                        .strip_prefix(d.as_str())
                        .is_some_and(|r| r.starts_with('/'))
            })
    }
}

/// A captured file in `.parts/`.
#[derive(Debug)]
struct Part {
    path: PathBuf,
    size: u64,
    sha256: String,
    /// The check run on the bytes as they were written, when they looked like a kernel or an
    /// initramfs (used when the file is published as that kind; otherwise it is checked as
    /// usual).
    prechecked: Option<Prechecked>,
}

/// The outcome of a format check.
pub(crate) type Checked = Result<crate::bootfile::Verdict, crate::bootfile::CheckError>;

/// A check made on a file's bytes as they were written, and the kind it checked them as.
#[derive(Debug, Clone)]
pub(crate) struct Prechecked {
    pub kind: Kind,
    pub checked: Checked,
}

/// Captured files by (layer, image path), in `staging/.parts/`, removed when dropped. Layers
/// read at the same time each capture into a [`Parts::fork`], joined back afterwards.
struct Parts {
    dir: PathBuf,
    /// Names the next part; shared with forks, so no two parts take one name.
    next: Arc<AtomicU64>,
    /// Whether dropping this removes `dir` (a fork leaves it to its parent).
    owner: bool,
    captured: HashMap<(usize, String), Part>,
    modes: Modes,
    max_file: u64,
    check: crate::bootfile::Limits,
}

impl Parts {
    fn new(staging: &Path, modes: &Modes, limits: &Limits) -> Result<Parts, PipelineError> {
        let dir = staging.join(".parts");
        fs::create_dir(&dir).map_err(|source| PipelineError::Write {
            path: dir.clone(),
            source,
        })?;
        Ok(Parts {
            dir,
            next: Arc::new(AtomicU64::new(0)),
            owner: true,
            captured: HashMap::new(),
            modes: *modes,
            max_file: limits.max_file,
            check: limits.check(),
        })
    }

    /// Copies a regular file's content into a fresh part; a later entry at the same path of the
    /// same layer replaces an earlier one.
    fn capture(
        &mut self,
        layer: usize,
        digest: &Digest,
        path: &str,
        size: u64,
        content: &mut dyn Read,
    ) -> Result<(), PipelineError> {
        if size > self.max_file {
            return Err(PipelineError::Limit {
                what: format!("{path} in layer {digest}"),
                limit: "max_file_size",
                max: self.max_file,
                size,
            });
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let file = self.dir.join(n.to_string());
        // One byte more than allowed tells an oversized file (an artifact blob) from one at the cap.
        let mut capped = content.take(self.max_file.saturating_add(1));
        let check = (size >= STREAM_CHECK_MIN).then_some((&self.check, size));
        let (written, sha256, prechecked) =
            write_file(&mut capped, &file, &self.modes, digest, check)?;
        if written > self.max_file {
            return Err(PipelineError::Limit {
                what: format!("{path} in layer {digest}"),
                limit: "max_file_size",
                max: self.max_file,
                size: written,
            });
        }
        self.captured.insert(
            (layer, path.to_string()),
            Part {
                path: file,
                size: written,
                sha256,
                prechecked,
            },
        );
        Ok(())
    }

    /// An empty set of parts in the same directory, for one of the layers read at once.
    fn fork(&self) -> Parts {
        Parts {
            dir: self.dir.clone(),
            next: Arc::clone(&self.next),
            owner: false,
            captured: HashMap::new(),
            modes: self.modes,
            max_file: self.max_file,
            check: self.check,
        }
    }

    /// Takes over what a fork captured (different layers: no key is in both).
    fn join(&mut self, mut fork: Parts) {
        self.captured.extend(std::mem::take(&mut fork.captured));
    }
}

impl Drop for Parts {
    fn drop(&mut self) {
        if self.owner {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Chunks (of up to 64 KiB) in flight between a staged file's writer and the check beside it.
const CHECK_DEPTH: usize = 8;
/// Files smaller than this are checked after the walk as before (a thread is not worth it).
const STREAM_CHECK_MIN: u64 = 256 * 1024;

/// Starts the check a file's first bytes suggest (kernel or initramfs) beside its writer.
fn check_beside(
    head: &[u8],
    size: u64,
    limits: crate::bootfile::Limits,
) -> Option<Beside<Option<Prechecked>>> {
    let kind = crate::bootfile::looks_like(head)?;
    let name = format!("{kind}-check");
    Beside::spawn(&name, CHECK_DEPTH, move |r| {
        let checked = crate::bootfile::check_stream(kind, r, size, &limits)?;
        Some(Prechecked { kind, checked })
    })
}

/// Copies one entry into a fresh file, fsynced: (size, sha256 hex, the check made as it was
/// written). Read errors (from the layer: decoding, digest, limits) are told apart from write
/// errors (the disk), so each is blamed on the right thing. With `check` (the limits and the
/// size the layer gives), a file whose first bytes look like a kernel or an initramfs is
/// checked as it is written, on another thread, so the check does not read the file back after
/// the download.
fn write_file(
    entry: &mut dyn Read,
    target: &Path,
    modes: &Modes,
    layer: &Digest,
    check: Option<(&crate::bootfile::Limits, u64)>,
) -> Result<(u64, String, Option<Prechecked>), PipelineError> {
    let werr = |source: io::Error| PipelineError::Write {
        path: target.to_path_buf(),
        source,
    };
    let rerr = |source: io::Error| PipelineError::Read {
        digest: layer.clone(),
        source,
    };
    crate::testhook::pause("writing");
    let file = fs::File::create(target).map_err(werr)?;
    let mut out = HashWriter::new(io::BufWriter::with_capacity(
        WRITE_BUFFER,
        WritebackFile::new(file),
    ));
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut beside = None;
    let mut first = true;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(rerr(e)),
        };
        if std::mem::take(&mut first) {
            if let Some((limits, size)) = check {
                beside = check_beside(&buf[..n], size, *limits);
            }
        }
        out.write_all(&buf[..n]).map_err(werr)?;
        if let Some(b) = &mut beside {
            b.feed(&buf[..n]);
        }
    }
    let (buffered, size, digest) = out.finish();
    let sha256 = digest.hex().to_string();
    let file = buffered
        .into_inner()
        .map_err(|e| werr(e.into_error()))?
        .into_inner();
    crate::store::fs::apply_file_modes(&file, modes).map_err(werr)?;
    // Durable before the version is renamed into place (fsynced here, on the unpacking thread).
    file.sync_all().map_err(werr)?;
    // A check that panicked, or a kernel that needs random access, is left to the read-back; a
    // verdict on a length other than the one written (a short blob) is not used.
    let checked = beside
        .and_then(Beside::finish)
        .flatten()
        .filter(|_| check.is_some_and(|(_, expected)| expected == size));
    Ok((size, sha256, checked))
}

/// The first read of a layer: every entry indexed, the files the queries lead to captured.
struct Indexer {
    /// The layers above, top first (moved in and out around each read).
    upper: Vec<LayerIndex>,
    current: LayerIndex,
    at: usize,
    digest: Digest,
    queries: Vec<Query>,
    targets: Targets,
    mode: Mode,
    parts: Parts,
    indexed: usize,
}

/// What a first read captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The files the layouts' paths lead to.
    Queries,
    /// Every boot-file-like file (`inspect`).
    Candidates,
}

/// The layers read by a walk, top first.
struct Walked {
    indexes: Vec<LayerIndex>,
    /// Which were downloaded (artifact files are indexed from their descriptors).
    read: HashSet<usize>,
    parts: Parts,
}

/// A boot-file-like path `inspect` found.
#[derive(Debug)]
pub struct Candidate {
    pub path: String,
    /// Links followed to its content.
    pub via: Vec<String>,
    /// The layer its content came from.
    pub layer: Option<String>,
    pub size: u64,
    /// Its content, staged for the format check.
    pub staged: Option<PathBuf>,
    /// Why it has no content (a dangling link, a device).
    pub problem: Option<String>,
}

impl Indexer {
    fn wants(&self, path: &str) -> bool {
        match self.mode {
            Mode::Queries => self.targets.wants(path),
            Mode::Candidates => looks_like_boot_file(path),
        }
    }

    fn refresh(&mut self) {
        if self.mode == Mode::Candidates {
            return;
        }
        let mut refs: Vec<&LayerIndex> = self.upper.iter().collect();
        refs.push(&self.current);
        self.targets = Targets::of(&View::new(&refs, false), &self.queries, self.at);
    }

    fn visible_here(&self, path: &str) -> bool {
        let mut refs: Vec<&LayerIndex> = self.upper.iter().collect();
        refs.push(&self.current);
        matches!(View::new(&refs, false).seen(path), Seen::Node { layer, .. } if layer == self.at)
    }
}

impl Visitor for Indexer {
    fn visit(&mut self, event: Event<'_>, content: &mut dyn Read) -> Result<(), PipelineError> {
        self.indexed += 1;
        if self.indexed > MAX_INDEXED {
            return Err(PipelineError::Entry {
                digest: self.digest.clone(),
                path: "(index)".into(),
                reason: format!("the image has more than {MAX_INDEXED} entries"),
            });
        }
        let (path, node) = match event {
            Event::Whiteout(p) => {
                self.current.whiteout(p);
                if self.targets.on_the_way(p) {
                    self.refresh();
                }
                return Ok(());
            }
            Event::Opaque(d) => {
                self.current.opaque(d);
                self.refresh();
                return Ok(());
            }
            Event::Entry { path, node } => (path, node),
        };
        let file_size = match node {
            Node::File { size } => Some(size),
            _ => None,
        };
        let on_the_way = self.targets.on_the_way(path);
        self.current.add(path, node);
        if on_the_way {
            self.refresh();
        }
        if let Some(size) = file_size {
            if self.wants(path) && self.visible_here(path) {
                self.parts
                    .capture(self.at, &self.digest, path, size, content)?;
            }
        }
        Ok(())
    }
}

/// A later read of a layer: the files named captured, nothing indexed.
struct Capturer {
    at: usize,
    digest: Digest,
    wanted: HashSet<String>,
    parts: Parts,
}

impl Visitor for Capturer {
    fn visit(&mut self, event: Event<'_>, content: &mut dyn Read) -> Result<(), PipelineError> {
        if let Event::Entry {
            path,
            node: Node::File { size },
        } = event
        {
            if self.wanted.contains(path) {
                self.parts
                    .capture(self.at, &self.digest, path, size, content)?;
            }
        }
        Ok(())
    }
}

/// What a layout's file resolves to in the finished view.
struct Placed {
    /// Relative path in staging.
    dest: String,
    layer: usize,
    path: String,
    /// The image path as configured or listed (recorded as the file's source).
    source: String,
}

/// One pipeline run over one image.
struct Run<'a> {
    /// Top first.
    layers: Vec<&'a Descriptor>,
    layouts: &'a [Layout],
    queries: Vec<Query>,
    staging: &'a Path,
    modes: &'a Modes,
    limits: &'a Limits,
    downloaded: u64,
    /// How each layer read so far was taken (a later read must take it the same way).
    kinds: HashMap<usize, LayerKind>,
}

impl<'a> Run<'a> {
    fn new(
        layers: &'a [Descriptor],
        layouts: &'a [Layout],
        staging: &'a Path,
        modes: &'a Modes,
        limits: &'a Limits,
    ) -> Result<Run<'a>, PipelineError> {
        let mut queries: Vec<Query> = Vec::new();
        for f in layouts.iter().flat_map(|l| &l.files) {
            if !queries
                .iter()
                .any(|q| q.source == f.source && q.is_dir == f.is_dir)
            {
                queries.push(Query {
                    source: f.source.clone(),
                    is_dir: f.is_dir,
                });
            }
        }
        Ok(Run {
            layers: layers.iter().rev().collect(),
            layouts,
            queries,
            staging,
            modes,
            limits,
            downloaded: 0,
            kinds: HashMap::new(),
        })
    }

    fn digest(&self, at: usize) -> &str {
        self.layers.get(at).map_or("?", |l| l.digest.as_str())
    }

    fn layer_digest(&self, at: usize) -> Digest {
        self.layers
            .get(at)
            .map_or_else(|| Digest::of(b""), |l| l.digest.clone())
    }

    fn count_download(&mut self, layer: &Descriptor) -> Result<(), PipelineError> {
        self.downloaded = self.downloaded.saturating_add(layer.size);
        if self.downloaded > self.limits.max_download {
            return Err(PipelineError::Limit {
                what: format!("the layers needed so far (up to {})", layer.digest),
                limit: "max_download_size",
                max: self.limits.max_download,
                size: self.downloaded,
            });
        }
        Ok(())
    }

    /// Reads layers from the top down, indexing each and capturing what `mode` wants, until
    /// `stop` says the layers read so far are enough.
    async fn walk(
        &mut self,
        fetch: &impl Fetch,
        mut parts: Parts,
        mode: Mode,
        stop: impl Fn(&Run<'_>, &View<'_>) -> bool,
    ) -> Result<Walked, PipelineError> {
        let mut indexes: Vec<LayerIndex> = Vec::new();
        let mut read: HashSet<usize> = HashSet::new();
        for at in 0..self.layers.len() {
            let desc = self.layers[at];
            let targets = {
                let refs: Vec<&LayerIndex> = indexes.iter().collect();
                Targets::of(&View::new(&refs, false), &self.queries, at)
            };
            let below = |title: &str| {
                mode == Mode::Candidates
                    || self
                        .queries
                        .iter()
                        .map(|q| q.source.as_str())
                        .chain(targets.files.iter().map(String::as_str))
                        .chain(targets.dirs.iter().map(String::as_str))
                        .any(|p| p.strip_prefix(title).is_some_and(|r| r.starts_with('/')))
            };
            let kind = layer::layer_kind(desc, &below)?;
            self.kinds.insert(at, kind.clone());
            let title = desc
                .annotations
                .get(layer::TITLE)
                .and_then(|t| crate::config::normalize_image_path(t));
            let index = match (&kind, title) {
                // An artifact's file layer says what it holds: fetched only if it is wanted.
                (LayerKind::File { path }, _) => {
                    let mut index = LayerIndex::default();
                    index.add(path, Node::File { size: desc.size });
                    index
                }
                // An artifact's directory below which nothing is wanted.
                (LayerKind::Tar { .. }, Some(title)) if !below(&title) => {
                    let mut index = LayerIndex::default();
                    index.add(&title, Node::Dir);
                    index
                }
                _ => {
                    self.count_download(desc)?;
                    tracing::info!(layer = %desc.digest, size = desc.size, "reading layer");
                    let indexer = Indexer {
                        upper: std::mem::take(&mut indexes),
                        current: LayerIndex::default(),
                        at,
                        digest: desc.digest.clone(),
                        queries: self.queries.clone(),
                        targets,
                        mode,
                        parts,
                        indexed: 0,
                    };
                    let done = fetch
                        .read(desc, &kind, self.limits.max_ratio, indexer)
                        .await?;
                    read.insert(at);
                    indexes = done.upper;
                    parts = done.parts;
                    done.current
                }
            };
            indexes.push(index);
            let refs: Vec<&LayerIndex> = indexes.iter().collect();
            if stop(self, &View::new(&refs, at + 1 == self.layers.len())) {
                break;
            }
        }
        Ok(Walked {
            indexes,
            read,
            parts,
        })
    }

    /// Reads layers again (or for the first time) for files that resolve into them and were
    /// not captured: a link seen after its target had streamed past, an artifact's file.
    async fn read_again(
        &mut self,
        fetch: &impl Fetch,
        needed: impl Iterator<Item = (usize, String)>,
        read: &HashSet<usize>,
        mut parts: Parts,
    ) -> Result<Parts, PipelineError> {
        let mut again: HashMap<usize, HashSet<String>> = HashMap::new();
        for (at, path) in needed {
            if !parts.captured.contains_key(&(at, path.clone())) {
                again.entry(at).or_default().insert(path);
            }
        }
        let mut again: Vec<(usize, HashSet<String>)> = again.into_iter().collect();
        again.sort_by_key(|(at, _)| *at);
        let max_ratio = self.limits.max_ratio;
        let mut reads = Vec::new();
        for (at, wanted) in again {
            let desc = self.layers[at];
            let kind = match self.kinds.get(&at) {
                Some(k) => k.clone(),
                None => layer::layer_kind(desc, &|_| false)?,
            };
            self.count_download(desc)?;
            let mut names: Vec<&String> = wanted.iter().collect();
            names.sort();
            if read.contains(&at) {
                tracing::info!(layer = %desc.digest, files = ?names, "reading layer a second time: a link leads to files read before the link was seen");
            } else {
                tracing::info!(layer = %desc.digest, size = desc.size, files = ?names, "reading layer");
            }
            let capturer = Capturer {
                at,
                digest: desc.digest.clone(),
                wanted,
                parts: parts.fork(),
            };
            // Built here, not in a closure over a borrowed tuple: that one's future is not
            // general enough to be Send (rust-lang/rust#64552).
            reads.push(async move { fetch.read(desc, &kind, max_ratio, capturer).await });
        }
        // Each layer captures different files, so they are read at once (started top first);
        // the first failure ends the others.
        let mut done = futures_util::stream::iter(reads).buffer_unordered(PARALLEL_READS);
        while let Some(capturer) = done.next().await {
            parts.join(capturer?.parts);
        }
        Ok(parts)
    }

    async fn extract(mut self, fetch: &impl Fetch) -> Result<Extracted, PipelineError> {
        let parts = Parts::new(self.staging, self.modes, self.limits)?;
        let walked = self
            .walk(fetch, parts, Mode::Queries, |run, view| {
                !matches!(run.decide(view), Decision::Pending)
            })
            .await?;
        let refs: Vec<&LayerIndex> = walked.indexes.iter().collect();
        let view = View::new(&refs, walked.indexes.len() == self.layers.len());
        let Decision::Chosen(layout) = self.decide(&view) else {
            return Err(self.not_found(&view));
        };
        let placed = self.place(&view, &self.layouts[layout].files)?;
        let parts = self
            .read_again(
                fetch,
                placed.iter().map(|p| (p.layer, p.path.clone())),
                &walked.read,
                walked.parts,
            )
            .await?;
        let (records, prechecked) = self.assemble(&placed, &parts)?;
        drop(parts);
        let files = self.layouts[layout].files.clone();
        let (staging, modes, limits) = (self.staging.to_path_buf(), *self.modes, *self.limits);
        let (mut files, boot) = tokio::task::spawn_blocking(move || {
            checks::check_and_split(&files, &staging, records, &prechecked, &modes, &limits)
        })
        .await
        .map_err(|e| PipelineError::Join(e.to_string()))??;
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Extracted {
            files,
            boot,
            layout,
        })
    }

    /// `inspect`: every boot-file-like file down to the first layer that holds a kernel or a
    /// UKI, staged in `self.staging` for its format check.
    async fn candidates(mut self, fetch: &impl Fetch) -> Result<Vec<Candidate>, PipelineError> {
        let parts = Parts::new(self.staging, self.modes, self.limits)?;
        let kernel_like = |p: &str| {
            let base = p.rsplit('/').next().unwrap_or(p).to_ascii_lowercase();
            ["vmlinuz", "vmlinux", "kernel", "bzimage"]
                .iter()
                .any(|w| base.starts_with(w))
                || base == "image"
                || base.ends_with(".efi")
        };
        let walked = self
            .walk(fetch, parts, Mode::Candidates, |_, view| {
                candidates(view, &[]).iter().any(|p| kernel_like(p))
            })
            .await?;
        let refs: Vec<&LayerIndex> = walked.indexes.iter().collect();
        let view = View::new(&refs, walked.indexes.len() == self.layers.len());
        let found: Vec<(String, Resolved)> = candidates(&view, &[])
            .into_iter()
            .map(|p| {
                let r = overlay::resolve(&view, &p);
                (p, r)
            })
            .collect();
        let parts = self
            .read_again(
                fetch,
                found.iter().filter_map(|(_, r)| match r {
                    Resolved::File { layer, path, .. } => Some((*layer, path.clone())),
                    _ => None,
                }),
                &walked.read,
                walked.parts,
            )
            .await?;
        let mut out = Vec::new();
        for (i, (path, r)) in found.into_iter().enumerate() {
            let (staged, layer, size, via, problem) = match &r {
                Resolved::File {
                    layer,
                    path: at,
                    size,
                    via,
                } => {
                    let staged = match parts.captured.get(&(*layer, at.clone())) {
                        Some(part) => {
                            let dest = self.staging.join(format!("candidate-{i}"));
                            fs::hard_link(&part.path, &dest).map_err(|source| {
                                PipelineError::Write {
                                    path: dest.clone(),
                                    source,
                                }
                            })?;
                            Some(dest)
                        }
                        None => None,
                    };
                    (staged, Some(*layer), *size, via.clone(), None)
                }
                other => (None, None, 0, Vec::new(), Some(self.describe(other))),
            };
            out.push(Candidate {
                path,
                via,
                layer: layer.map(|l| self.digest(l).to_string()),
                size,
                staged,
                problem,
            });
        }
        Ok(out)
    }

    /// After a layer: is a layout complete, or can none be any more?
    fn decide(&self, view: &View<'_>) -> Decision {
        let mut all_failed = true;
        for (i, layout) in self.layouts.iter().enumerate() {
            let mut done = true;
            let mut failed = false;
            for f in &layout.files {
                match overlay::resolve(view, &f.source) {
                    Resolved::File { .. } if !f.is_dir => {}
                    Resolved::Dir { path, .. } if f.is_dir => {
                        // Lower layers may add to a directory unless it is opaque above them.
                        let closed =
                            view.complete || view.layers.iter().any(|l| l.is_opaque(&path));
                        done &= closed;
                    }
                    Resolved::Open { .. } => done = false,
                    _ => {
                        failed = true;
                        done = false;
                    }
                }
            }
            if done {
                return Decision::Chosen(i);
            }
            all_failed &= failed;
        }
        if all_failed {
            Decision::Failed
        } else {
            Decision::Pending
        }
    }

    /// Where each file of the chosen layout comes from.
    fn place(&self, view: &View<'_>, files: &[FileSpec]) -> Result<Vec<Placed>, PipelineError> {
        let mut placed = Vec::new();
        for f in files {
            match overlay::resolve(view, &f.source) {
                Resolved::File {
                    layer, path, via, ..
                } if !f.is_dir => {
                    if !via.is_empty() {
                        tracing::info!(file = %f.source, links = ?via, "followed links inside the image");
                    }
                    let dest = if f.uki.is_some() {
                        checks::uki_staging_name(f)
                    } else {
                        f.name.clone()
                    };
                    placed.push(Placed {
                        dest,
                        layer,
                        path,
                        source: f.source.clone(),
                    });
                }
                Resolved::Dir { path: dir, .. } if f.is_dir => {
                    let before = placed.len();
                    for (path, _, _) in overlay::listing(view, &dir) {
                        let rel = &path[dir.len() + usize::from(!dir.is_empty())..];
                        let listed = format!("{}/{rel}", f.source);
                        match overlay::resolve(view, &path) {
                            Resolved::File {
                                layer, path: at, ..
                            } => placed.push(Placed {
                                dest: format!("{}/{rel}", f.name),
                                layer,
                                path: at,
                                source: listed,
                            }),
                            other => {
                                return Err(PipelineError::Refused {
                                    path: listed,
                                    reason: format!(
                                        "inside the copied directory {}/, it {}",
                                        f.source,
                                        self.describe(&other)
                                    ),
                                })
                            }
                        }
                    }
                    if placed.len() == before {
                        return Err(PipelineError::NotFound {
                            missing: format!(
                                "{}/ has no files in the image (searched {} layers)",
                                f.source,
                                view.layers.len()
                            ),
                            candidates: String::new(),
                        });
                    }
                }
                other => {
                    return Err(PipelineError::Refused {
                        path: f.source.clone(),
                        reason: self.describe(&other),
                    })
                }
            }
        }
        Ok(placed)
    }

    /// Moves captured parts to their names (a part wanted twice is hard-linked). Returns their
    /// records and the checks already made on them as they were written, by name.
    fn assemble(
        &self,
        placed: &[Placed],
        parts: &Parts,
    ) -> Result<(Vec<FileRecord>, HashMap<String, Prechecked>), PipelineError> {
        let mut records = Vec::new();
        let mut prechecked = HashMap::new();
        let mut moved: HashMap<(usize, &str), PathBuf> = HashMap::new();
        for p in placed {
            let part = parts
                .captured
                .get(&(p.layer, p.path.clone()))
                .ok_or_else(|| PipelineError::Entry {
                    digest: self.layer_digest(p.layer),
                    path: p.path.clone(),
                    reason: "not found when the layer was read again".into(),
                })?;
            let target = self.staging.join(&p.dest);
            let werr = |source| PipelineError::Write {
                path: target.clone(),
                source,
            };
            if let Some(parent) = target.parent() {
                crate::store::fs::create_staged_dirs(parent, self.modes).map_err(werr)?;
            }
            match moved.get(&(p.layer, p.path.as_str())) {
                Some(first) => fs::hard_link(first, &target)
                    .or_else(|_| fs::copy(first, &target).map(drop))
                    .map_err(werr)?,
                None => {
                    fs::rename(&part.path, &target).map_err(werr)?;
                    moved.insert((p.layer, p.path.as_str()), target.clone());
                }
            }
            if let Some(checked) = &part.prechecked {
                prechecked.insert(p.dest.clone(), checked.clone());
            }
            records.push(FileRecord {
                name: p.dest.clone(),
                size: part.size,
                sha256: part.sha256.clone(),
                source: p.source.clone(),
            });
        }
        Ok((records, prechecked))
    }

    /// Says why a lookup did not end at what was wanted.
    fn describe(&self, r: &Resolved) -> String {
        let via = |via: &[String]| {
            if via.is_empty() {
                String::new()
            } else {
                format!(" (after following {})", via.join(", "))
            }
        };
        match r {
            Resolved::File { path, via: v, .. } => {
                format!(
                    "leads to the file {path}, where a directory is wanted{}",
                    via(v)
                )
            }
            Resolved::Dir { path, via: v } => {
                format!(
                    "leads to the directory {path}, where a file is wanted{}",
                    via(v)
                )
            }
            Resolved::Missing { path, gone, via: v } => {
                let why = match gone {
                    Gone::NotInImage => format!("{path} is not in the image"),
                    Gone::Whiteout { layer } => {
                        format!(
                            "{path} was deleted by a whiteout in layer {}",
                            self.digest(*layer)
                        )
                    }
                    Gone::Opaque { layer, dir } => format!(
                        "{path} is hidden by an opaque whiteout of {dir}/ in layer {}",
                        self.digest(*layer)
                    ),
                    Gone::UnderNonDir { layer, path: at } => format!(
                        "{path} is not in the image: {at} is not a directory there (layer {})",
                        self.digest(*layer)
                    ),
                };
                format!("is not found: {why}{}", via(v))
            }
            Resolved::Refused {
                path,
                reason,
                via: v,
            } => {
                format!("leads to {path}, {reason}{}", via(v))
            }
            Resolved::Open { path } => format!("is undecided at {path}"),
        }
    }

    /// The error when no layout is complete: each layout's missing files, and the boot-file-like
    /// paths the image does hold.
    fn not_found(&self, view: &View<'_>) -> PipelineError {
        let mut lines = Vec::new();
        for (i, layout) in self.layouts.iter().enumerate() {
            let missing: Vec<String> = layout
                .files
                .iter()
                .filter_map(|f| {
                    let r = overlay::resolve(view, &f.source);
                    let fine = match &r {
                        Resolved::File { .. } => !f.is_dir,
                        Resolved::Dir { .. } => f.is_dir,
                        _ => false,
                    };
                    (!fine).then(|| format!("{} {}", f.source, self.describe(&r)))
                })
                .collect();
            let head = if self.layouts.len() > 1 {
                format!("layout {} of {}: ", i + 1, self.layouts.len())
            } else {
                String::new()
            };
            lines.push(format!("{head}{}", missing.join("; ")));
        }
        let refused = lines.iter().any(|l| l.contains("leads to"));
        let missing = format!(
            "{} (searched {} of {} layers){}",
            lines.join(" | "),
            view.layers.len(),
            self.layers.len(),
            if refused {
                "; only regular files are published"
            } else {
                ""
            }
        );
        let found = candidates(view, &self.queries);
        let candidates = if found.is_empty() {
            String::new()
        } else {
            let snippet: Vec<String> = found
                .iter()
                .take(3)
                .map(|p| format!("[[target.files]] source = {p:?}{}", kind_hint(p)))
                .collect();
            format!(
                ". The image holds these boot-file-like paths: {}; a config that takes them: {}",
                found.join(", "),
                snippet.join(" / ")
            )
        };
        PipelineError::NotFound {
            missing,
            candidates,
        }
    }
}

enum Decision {
    Chosen(usize),
    Pending,
    Failed,
}

/// Whether a file name looks like a kernel, an initramfs or a UKI.
pub(crate) fn looks_like_boot_file(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    [
        "vmlinuz",
        "vmlinux",
        "kernel",
        "bzimage",
        "initrd",
        "initramfs",
    ]
    .iter()
    .any(|w| base.starts_with(w))
        || base == "image"
        || base.ends_with(".efi")
}

/// The `kind` a config would give `path`, when its name does not say.
fn kind_hint(path: &str) -> &'static str {
    if path.to_ascii_lowercase().ends_with(".efi") {
        " kind = \"uki\""
    } else {
        ""
    }
}

/// Visible boot-file-like regular files and links in the layers read, other than the paths
/// the config already names.
fn candidates(view: &View<'_>, named: &[Query]) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for layer in view.layers {
        for (path, node) in layer.entries() {
            if matches!(node, Node::Dir)
                || !looks_like_boot_file(path)
                || named.iter().any(|q| q.source == path)
                || found.iter().any(|f| f == path)
            {
                continue;
            }
            if matches!(view.seen(path), Seen::Node { .. }) {
                found.push(path.to_string());
            }
        }
    }
    found.sort();
    found.truncate(MAX_CANDIDATES);
    found
}

#[cfg(test)]
mod tests;
