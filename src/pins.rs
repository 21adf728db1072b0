//! Pins: a target rolled back stays on the chosen version until it is unpinned or its config
//! changes. Kept in the state directory, outside the served tree, so the CLI and the daemon
//! see the same pins.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Target;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub digest: String,
    pub pinned_at: String,
    /// Fingerprint of the target's config when pinned: a config change lifts the pin.
    pub config: String,
}

fn path(state_dir: &Path, target: &str) -> PathBuf {
    state_dir.join("pins").join(format!("{target}.json"))
}

/// A stable fingerprint of everything that decides what a target publishes.
pub fn fingerprint(t: &Target) -> String {
    hex::encode(Sha256::digest(format!(
        "{:?}|{:?}|{:?}|{:?}",
        t.reference, t.platform, t.dest, t.layouts
    )))
}

/// The pin in force for `target`, if any. A pin made under another config is removed.
pub fn active(state_dir: &Path, target: &Target) -> Option<Pin> {
    let file = path(state_dir, &target.name);
    let pin: Pin = serde_json::from_slice(&fs::read(&file).ok()?).ok()?;
    if pin.config != fingerprint(target) {
        tracing::info!(target = %target.name, "config changed since the pin was set: unpinning");
        let _ = fs::remove_file(&file);
        return None;
    }
    Some(pin)
}

pub fn set(state_dir: &Path, target: &Target, digest: &str) -> io::Result<Pin> {
    let pin = Pin {
        digest: digest.to_string(),
        pinned_at: crate::store::now_rfc3339(),
        config: fingerprint(target),
    };
    let file = path(state_dir, &target.name);
    let dir = state_dir.join("pins");
    fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{}.tmp", target.name));
    fs::write(
        &tmp,
        serde_json::to_vec_pretty(&pin).map_err(io::Error::other)?,
    )?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, &file)?;
    fs::File::open(&dir)?.sync_all()?;
    Ok(pin)
}

/// Removes the pin; returns whether there was one.
pub fn clear(state_dir: &Path, target: &str) -> io::Result<bool> {
    match fs::remove_file(path(state_dir, target)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}
