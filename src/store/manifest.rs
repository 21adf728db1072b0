//! `versions/<hex>/.bootsync.json`: what a version holds, written atomically.

use std::fs;
use std::io;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::fs::{write_atomic, TMP_PREFIX};
use crate::config::Modes;
use crate::digest::Digest;
pub use crate::signature::Signer;

pub const MANIFEST: &str = ".bootsync.json";

/// One published file, as recorded in the version manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Path inside the version directory.
    pub name: String,
    pub size: u64,
    /// Lowercase hex sha256 of the content.
    pub sha256: String,
    /// Path inside the image it came from.
    pub source: String,
}

/// `versions/<hex>/.bootsync.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionManifest {
    pub target: String,
    pub reference: String,
    pub platform: String,
    /// The image manifest digest (the version id).
    pub digest: Digest,
    /// What the reference resolved to (an index digest for multi-arch tags).
    pub tag_digest: Digest,
    /// When this version last became current (RFC 3339).
    pub published_at: String,
    pub files: Vec<FileRecord>,
    /// What a UKI said about itself, when the version's boot files came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootInfo>,
    /// Who signed what the reference resolved to, verified before this version was
    /// published or re-activated (absent: published without a signature policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signer>,
}

/// Read from a UKI's sections when it is split: what a profile and `/status` show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootInfo {
    /// Published name of the kernel split out of the UKI.
    pub kernel: String,
    /// The UKI's `.cmdline` (empty when it has none).
    pub cmdline: String,
    /// From its `.osrel`: `PRETTY_NAME`, else `NAME VERSION_ID` (e.g. "Talos (v1.11.5)").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_release: Option<String>,
    /// Its `.uname`: the kernel release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
}

impl VersionManifest {
    /// The version's directory name.
    pub fn hex(&self) -> &str {
        self.digest.hex()
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// The name set among `accepted` (a target's layouts) that version `m` holds exactly: every
/// name present (a file, or a directory of files) and nothing else.
pub fn names_of<'a>(m: &VersionManifest, accepted: &'a [Vec<String>]) -> Option<&'a [String]> {
    accepted
        .iter()
        .find(|names| {
            names.iter().all(|n| {
                m.files
                    .iter()
                    .any(|f| f.name == *n || Path::new(&f.name).starts_with(n))
            }) && m
                .files
                .iter()
                .all(|f| names.iter().any(|n| Path::new(&f.name).starts_with(n)))
        })
        .map(Vec::as_slice)
}

/// The manifest in `version_dir`, if present and readable.
pub fn read_manifest(version_dir: &Path) -> Option<VersionManifest> {
    serde_json::from_slice(&fs::read(version_dir.join(MANIFEST)).ok()?).ok()
}

pub fn published_time(m: &VersionManifest) -> SystemTime {
    humantime::parse_rfc3339(&m.published_at).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Writes `dir/.bootsync.json` atomically.
pub fn write_manifest(dir: &Path, manifest: &VersionManifest, modes: &Modes) -> io::Result<()> {
    let mut json = serde_json::to_vec_pretty(manifest).map_err(io::Error::other)?;
    json.push(b'\n');
    write_atomic(&dir.join(MANIFEST), &json, TMP_PREFIX, modes)
}
