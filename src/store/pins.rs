//! Pins: a target rolled back stays on the chosen version until it is unpinned or its config
//! changes. Kept in the state directory, outside the served tree, so the CLI and the daemon
//! see the same pins. Reading a pin changes nothing: a pin made under another config is
//! reported stale, and only a sync removes it.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::fs::{create_dirs, remove_temp_files, write_atomic};
use crate::config::{Modes, Target};
use crate::digest::Digest;

const TMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub digest: Digest,
    pub pinned_at: String,
    /// Fingerprint of the target's config when pinned: a config change lifts the pin.
    pub config: String,
}

/// A target's pin as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinState {
    None,
    Active(Pin),
    /// Made under another config of the target: void.
    Stale(Pin),
}

fn path(state_dir: &Path, target: &str) -> PathBuf {
    state_dir.join("pins").join(format!("{target}.json"))
}

/// A stable fingerprint of everything that decides what a target publishes: its reference,
/// platform, destination and every file of every layout, written out field by field (not a
/// `Debug` rendering, which may change between releases).
pub fn fingerprint(t: &Target) -> String {
    let mut text = format!(
        "reference={}\nplatform={}\ndest={}\n",
        t.reference,
        t.platform,
        t.dest.display()
    );
    for (i, layout) in t.layouts.iter().enumerate() {
        for f in &layout.files {
            text.push_str(&format!(
                "layout={i} source={} dir={} name={} kind={} outputs={}\n",
                f.source,
                f.is_dir,
                f.name,
                f.kind,
                f.outputs().join(",")
            ));
        }
    }
    Digest::of(text.as_bytes()).hex().to_string()
}

/// The pin of `target`, read and judged against its config; nothing is changed.
pub fn read(state_dir: &Path, target: &Target) -> PinState {
    let Ok(bytes) = std::fs::read(path(state_dir, &target.name)) else {
        return PinState::None;
    };
    match serde_json::from_slice::<Pin>(&bytes) {
        Ok(pin) if pin.config == fingerprint(target) => PinState::Active(pin),
        Ok(pin) => PinState::Stale(pin),
        Err(e) => {
            tracing::warn!(target = %target.name, "unreadable pin file ignored: {e}");
            PinState::None
        }
    }
}

/// Pins `target` to `digest` (atomically: temp file, fsync, rename, fsync of the directory).
pub fn set(state_dir: &Path, target: &Target, digest: &Digest, modes: &Modes) -> io::Result<Pin> {
    let pin = Pin {
        digest: digest.clone(),
        pinned_at: super::now_rfc3339(),
        config: fingerprint(target),
    };
    let dir = state_dir.join("pins");
    create_dirs(&dir, modes)?;
    remove_temp_files(&dir, TMP_PREFIX);
    let json = serde_json::to_vec_pretty(&pin).map_err(io::Error::other)?;
    write_atomic(&path(state_dir, &target.name), &json, TMP_PREFIX, modes)?;
    Ok(pin)
}

/// Removes the pin; returns whether there was one.
pub fn clear(state_dir: &Path, target: &str) -> io::Result<bool> {
    let p = path(state_dir, target);
    match std::fs::remove_file(&p) {
        Ok(()) => {
            if let Some(dir) = p.parent() {
                super::fs::fsync_dir(dir)?;
            }
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(reference: &str) -> Target {
        let text = format!(
            "[[target]]\nname = \"t\"\nreference = \"{reference}\"\ndest = \"/srv/t\"\npreset = \"demo\"\n"
        );
        crate::config::Settings::parse(Path::new("t.toml"), &text)
            .unwrap()
            .targets
            .remove(0)
    }

    #[test]
    fn reading_a_stale_pin_leaves_it_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let t = target("r.example/a:1");
        let d = Digest::of(b"v1");
        assert_eq!(read(dir.path(), &t), PinState::None);
        set(dir.path(), &t, &d, &Modes::default()).unwrap();
        assert!(matches!(read(dir.path(), &t), PinState::Active(p) if p.digest == d));
        let other = target("r.example/a:2");
        assert!(matches!(read(dir.path(), &other), PinState::Stale(_)));
        assert!(path(dir.path(), "t").exists(), "reading removed the pin");
        assert!(clear(dir.path(), "t").unwrap());
        assert!(!clear(dir.path(), "t").unwrap());
        // the fingerprint is a stable text, not a Debug rendering
        assert_eq!(fingerprint(&t), fingerprint(&target("r.example/a:1")));
        assert_ne!(fingerprint(&t), fingerprint(&other));
        assert_eq!(fingerprint(&t).len(), 64);
    }
}
