//! The versioned store in a target's `dest`:
//!
//! ```text
//! dest/versions/<hex>/<name>...        one complete, verified version per image manifest digest
//! dest/versions/<hex>/.bootsync.json   what it holds (name, size, sha256 of every file)
//! dest/current -> versions/<hex>       switched with one rename(2)
//! dest/<name>  -> current/<name>       stable names
//! ```
//!
//! A version is written into a staging directory inside `dest` (same filesystem), every file and
//! directory fsynced, then renamed into `versions/`; only then does `current` move. A failure at
//! any point leaves the previous version serving.

pub mod fs;
mod manifest;
pub mod pins;
pub mod profile;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use self::fs::{
    apply_dir_modes, create_dirs, exchange, free_bytes, fsync_dir, fsync_tree, hash_file,
    replace_symlink, unique, TMP_PREFIX,
};
use crate::config::Modes;
use crate::digest::Digest;
pub use manifest::{names_of, now_rfc3339, BootInfo, FileRecord, Signer, VersionManifest};
use manifest::{published_time, read_manifest, write_manifest};

const STAGING_PREFIX: &str = ".staging-";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is being synced by another bootsync process", dest.display())]
    Busy { dest: PathBuf },
    #[error("{}: {reason}", path.display())]
    Conflict { path: PathBuf, reason: String },
    #[error("{}: only {free} bytes free, about {needed} needed; free some space (older versions are pruned only after a successful publish)", dest.display())]
    NoSpace {
        dest: PathBuf,
        free: u64,
        needed: u64,
    },
    #[error("version {digest} in {}: {reason}", dest.display())]
    Damaged {
        dest: PathBuf,
        digest: Digest,
        reason: String,
    },
    #[error("no retained version {wanted} in {} (retained: {available})", dest.display())]
    NoSuchVersion {
        dest: PathBuf,
        wanted: String,
        available: String,
    },
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A target's destination directory, locked for the lifetime of this value.
pub struct Store {
    dest: PathBuf,
    versions: PathBuf,
    modes: Modes,
    _lock: std::fs::File,
}

/// What startup recovery found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing published yet.
    Empty,
    /// `current` verified (links repaired where needed).
    Intact(VersionManifest),
    /// `current` was damaged or missing; an older intact version now serves.
    FellBack {
        from: Option<Digest>,
        reason: String,
        to: VersionManifest,
    },
    /// Nothing intact is left; the next sync downloads.
    NothingIntact { reason: String },
}

/// A directory being filled with a new version; removed on drop unless committed.
pub struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

impl Store {
    /// Opens (creating if needed) `dest`, takes its lock, and removes debris of interrupted runs.
    #[cfg(test)]
    pub fn open(dest: &Path, modes: &Modes) -> Result<Store, StoreError> {
        Self::open_waiting(dest, modes, Duration::ZERO)
    }

    /// Like `open`, but waits up to `wait` for another process to release the lock.
    pub fn open_waiting(dest: &Path, modes: &Modes, wait: Duration) -> Result<Store, StoreError> {
        let versions = dest.join("versions");
        create_dirs(&versions, modes).map_err(at(&versions))?;
        // flock(2) on the directory itself: nothing extra on disk for matchbox to serve.
        let lock = std::fs::File::open(dest).map_err(at(dest))?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::Busy {
                        dest: dest.to_path_buf(),
                    })
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(at(dest)(e)),
            }
        }
        let store = Store {
            dest: dest.to_path_buf(),
            versions,
            modes: *modes,
            _lock: lock,
        };
        store.remove_debris()?;
        Ok(store)
    }

    fn remove_debris(&self) -> Result<(), StoreError> {
        // Manifest rewrites happen inside version directories too.
        let mut dirs = vec![self.dest.clone(), self.versions.clone()];
        for entry in std::fs::read_dir(&self.versions).map_err(at(&self.versions))? {
            let entry = entry.map_err(at(&self.versions))?;
            if entry.file_type().is_ok_and(|t| t.is_dir())
                && !entry.file_name().to_string_lossy().starts_with('.')
            {
                dirs.push(entry.path());
            }
        }
        for dir in &dirs {
            for entry in std::fs::read_dir(dir).map_err(at(dir))? {
                let entry = entry.map_err(at(dir))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(STAGING_PREFIX) || name.starts_with(TMP_PREFIX) {
                    let path = entry.path();
                    tracing::info!(path = %path.display(), "removing debris of an interrupted sync");
                    let removed = if entry.file_type().map_err(at(&path))?.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed.map_err(at(&path))?;
                }
            }
        }
        Ok(())
    }

    /// The version `current` points at, if it and its manifest are readable.
    pub fn current(&self) -> Option<VersionManifest> {
        current_of(&self.dest)
    }

    /// The manifest of `versions/<hex>`, if present and readable.
    pub fn version(&self, hex: &str) -> Option<VersionManifest> {
        read_version(&self.versions, hex)
    }

    /// See [`is_intact`].
    pub fn is_intact(&self, m: &VersionManifest, accepted: &[Vec<String>]) -> bool {
        is_intact(&self.versions, m, accepted)
    }

    /// A fresh staging directory for version `hex`.
    pub fn stage(&self, hex: &str) -> Result<Staging, StoreError> {
        let path = self.dest.join(unique(STAGING_PREFIX, hex));
        std::fs::create_dir(&path).map_err(at(&path))?;
        apply_dir_modes(&path, &self.modes).map_err(at(&path))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    /// Records `manifest` in the staging directory, makes it durable and moves it to
    /// `versions/<hex>`. An existing version dir of the same id (made for another file set) is
    /// swapped out atomically, so `current` never points at a missing or half-made directory.
    pub fn commit(
        &self,
        mut staging: Staging,
        manifest: &VersionManifest,
    ) -> Result<(), StoreError> {
        write_manifest(&staging.path, manifest, &self.modes).map_err(at(&staging.path))?;
        crate::testhook::pause("staged");
        fsync_tree(&staging.path).map_err(at(&staging.path))?;
        let final_path = self.versions.join(manifest.hex());
        if final_path.exists() {
            exchange(&staging.path, &final_path).map_err(at(&final_path))?;
            // `staging` now holds the replaced version; its Drop removes it.
        } else {
            std::fs::rename(&staging.path, &final_path).map_err(at(&final_path))?;
            staging.committed = true;
        }
        fsync_dir(&self.versions).map_err(at(&self.versions))?;
        crate::testhook::pause("committed");
        Ok(())
    }

    /// Makes version `m` current (recording when, for retention) and points the stable names at
    /// it. Stable links for names no longer published are removed.
    pub fn activate(
        &self,
        m: &VersionManifest,
        names: &[String],
    ) -> Result<VersionManifest, StoreError> {
        let version_dir = self.versions.join(m.hex());
        if !version_dir.is_dir() {
            return Err(StoreError::Conflict {
                path: version_dir,
                reason: "version to activate does not exist".into(),
            });
        }
        // Note when it became current, durably, before the switch.
        let mut stamped = m.clone();
        stamped.published_at = now_rfc3339();
        write_manifest(&version_dir, &stamped, &self.modes).map_err(at(&version_dir))?;
        self.switch(&stamped, names)?;
        Ok(stamped)
    }

    fn switch(&self, m: &VersionManifest, names: &[String]) -> Result<(), StoreError> {
        replace_symlink(&self.dest, "current", &Path::new("versions").join(m.hex()))
            .map_err(at(&self.dest))?;
        crate::testhook::pause("switched");
        for name in names {
            let link = self.dest.join(name);
            let want = Path::new("current").join(name);
            if std::fs::read_link(&link).ok().as_deref() == Some(want.as_path()) {
                continue;
            }
            if let Ok(md) = std::fs::symlink_metadata(&link) {
                if md.is_dir() {
                    return Err(StoreError::Conflict {
                        path: link,
                        reason: "a directory is in the way of a stable link; move it away".into(),
                    });
                }
            }
            replace_symlink(&self.dest, name, &want).map_err(at(&link))?;
        }
        self.remove_stale_links(names)?;
        fsync_dir(&self.dest).map_err(at(&self.dest))?;
        Ok(())
    }

    fn remove_stale_links(&self, names: &[String]) -> Result<(), StoreError> {
        for entry in std::fs::read_dir(&self.dest).map_err(at(&self.dest))? {
            let entry = entry.map_err(at(&self.dest))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "current" || names.contains(&name) {
                continue;
            }
            if let Ok(target) = std::fs::read_link(entry.path()) {
                if target.starts_with("current") {
                    std::fs::remove_file(entry.path()).map_err(at(&entry.path()))?;
                }
            }
        }
        Ok(())
    }

    /// Every readable version, most recently published first.
    pub fn versions(&self) -> Result<Vec<VersionManifest>, StoreError> {
        let mut list = Vec::new();
        for entry in std::fs::read_dir(&self.versions).map_err(at(&self.versions))? {
            let entry = entry.map_err(at(&self.versions))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            match self.version(&name) {
                Some(m) => list.push(m),
                None => {
                    tracing::warn!(version = %name, dest = %self.dest.display(), "version without a readable manifest")
                }
            }
        }
        list.sort_by_key(|m| std::cmp::Reverse(published_time(m)));
        Ok(list)
    }

    /// Deletes all but the `retain` most recently published versions. Never deletes the current
    /// one, nor one that stopped being current less than `grace` ago (a node may have fetched a
    /// boot script pointing at it and not yet its files), nor those in `keep` (the one a
    /// matchbox profile still names: it is rewritten after the switch, and a failed or
    /// interrupted rewrite must not leave it naming a deleted version). Directories without a
    /// readable manifest are removed too (they cannot be verified, so they can never serve).
    pub fn prune(
        &self,
        retain: usize,
        grace: Duration,
        keep: &[String],
    ) -> Result<Vec<String>, StoreError> {
        crate::testhook::pause("pruning");
        let current = self.current().map(|m| m.hex().to_string());
        let versions = self.versions()?;
        let known: Vec<&str> = versions.iter().map(|m| m.hex()).collect();
        let now = SystemTime::now();
        let mut doomed = Vec::new();
        for (i, m) in versions.iter().enumerate() {
            if i < retain || Some(m.hex()) == current.as_deref() {
                continue;
            }
            if keep.iter().any(|k| k == m.hex()) {
                tracing::debug!(version = %m.hex(), "kept: the matchbox profile still names it");
                continue;
            }
            // It stopped being current when the next newer version was published.
            let retired = published_time(&versions[i - 1]);
            if now.duration_since(retired).unwrap_or_default() < grace {
                tracing::debug!(version = %m.hex(), "kept: retired less than the grace period ago");
                continue;
            }
            doomed.push(m.hex().to_string());
        }
        for entry in std::fs::read_dir(&self.versions).map_err(at(&self.versions))? {
            let entry = entry.map_err(at(&self.versions))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.')
                && !known.contains(&name.as_str())
                && Some(&name) != current.as_ref()
                && !keep.contains(&name)
            {
                doomed.push(name);
            }
        }
        for name in &doomed {
            let path = self.versions.join(name);
            std::fs::remove_dir_all(&path).map_err(at(&path))?;
            tracing::info!(version = %name, dest = %self.dest.display(), "removed old version");
        }
        if !doomed.is_empty() {
            fsync_dir(&self.versions).map_err(at(&self.versions))?;
        }
        Ok(doomed)
    }

    /// Re-hashes every file of version `m` against its manifest.
    pub fn verify(&self, m: &VersionManifest) -> Result<(), StoreError> {
        verify_at(&self.versions, &self.dest, m)
    }

    /// True when `current` and every stable link point where they should.
    pub fn links_ok(&self, m: &VersionManifest, names: &[String]) -> bool {
        std::fs::read_link(self.dest.join("current"))
            .ok()
            .as_deref()
            == Some(Path::new("versions").join(m.hex()).as_path())
            && names.iter().all(|n| {
                std::fs::read_link(self.dest.join(n)).ok().as_deref()
                    == Some(Path::new("current").join(n).as_path())
            })
    }

    /// Points `current` and the stable links at `m` as it is (a fresh commit is stamped
    /// already; a repair must not change when a version became current).
    pub fn make_current(&self, m: &VersionManifest, names: &[String]) -> Result<(), StoreError> {
        self.switch(m, names)
    }

    /// Startup recovery: verify `current` by content; when it is damaged or gone, fall back to
    /// the newest retained version that verifies; repair links either way.
    pub fn recover(
        &self,
        accepted: &[Vec<String>],
        trusted: &dyn Fn(&VersionManifest) -> bool,
    ) -> Result<Recovery, StoreError> {
        let link = std::fs::read_link(self.dest.join("current")).ok();
        let current = self.current();
        let reason = match &current {
            Some(m) => match (self.verify(m), names_of(m, accepted)) {
                (Ok(()), Some(names)) if self.is_intact(m, accepted) => {
                    if !self.links_ok(m, names) {
                        tracing::warn!(dest = %self.dest.display(), "repairing links");
                        self.make_current(m, names)?;
                    }
                    return Ok(Recovery::Intact(m.clone()));
                }
                (Ok(()), _) => "it does not hold the configured files".to_string(),
                (Err(e), _) => e.to_string(),
            },
            None if link.is_none() && self.versions()?.is_empty() => return Ok(Recovery::Empty),
            None => "current is missing or points at nothing readable".to_string(),
        };
        let from = current.as_ref().map(|m| m.digest.clone());
        for candidate in self.versions()? {
            let Some(names) = names_of(&candidate, accepted) else {
                continue;
            };
            if Some(&candidate.digest) == from.as_ref() || !self.is_intact(&candidate, accepted) {
                continue;
            }
            // Under a signature policy, only a version verified as it asks may serve.
            if !trusted(&candidate) {
                tracing::warn!(digest = %candidate.digest, "retained version not signed as the policy asks: not falling back to it");
                continue;
            }
            if let Err(e) = self.verify(&candidate) {
                tracing::warn!(%e, "retained version is damaged too");
                continue;
            }
            self.activate(&candidate, names)?;
            return Ok(Recovery::FellBack {
                from,
                reason,
                to: candidate,
            });
        }
        Ok(Recovery::NothingIntact { reason })
    }

    /// Fails early when the filesystem of `dest` has less than `needed` bytes free.
    pub fn check_space(&self, needed: u64) -> Result<(), StoreError> {
        let free = free_bytes(&self.dest).map_err(at(&self.dest))?;
        if free < needed {
            return Err(StoreError::NoSpace {
                dest: self.dest.clone(),
                free,
                needed,
            });
        }
        Ok(())
    }
}

/// The manifest of `versions/<hex>`, if present and readable (no lock needed: versions are
/// renamed into place whole).
pub fn read_version(versions: &Path, hex: &str) -> Option<VersionManifest> {
    read_manifest(&versions.join(hex))
}

/// A cheap check that every recorded file of `m` is there with its recorded size and that the
/// version holds exactly the files of one of the `accepted` name sets (a target's layouts).
/// Reads only.
pub fn is_intact(versions: &Path, m: &VersionManifest, accepted: &[Vec<String>]) -> bool {
    let dir = versions.join(m.hex());
    names_of(m, accepted).is_some()
        && m.files.iter().all(|f| {
            std::fs::symlink_metadata(dir.join(&f.name))
                .is_ok_and(|md| md.is_file() && md.len() == f.size)
        })
}

/// Re-hashes every file of version `m` (in `versions`, of `dest`) against its record. Reads
/// only.
pub fn verify_at(versions: &Path, dest: &Path, m: &VersionManifest) -> Result<(), StoreError> {
    let dir = versions.join(m.hex());
    let damaged = |reason: String| StoreError::Damaged {
        dest: dest.to_path_buf(),
        digest: m.digest.clone(),
        reason,
    };
    for f in &m.files {
        let path = dir.join(&f.name);
        let md =
            std::fs::symlink_metadata(&path).map_err(|e| damaged(format!("{}: {e}", f.name)))?;
        if !md.is_file() {
            return Err(damaged(format!("{} is not a regular file", f.name)));
        }
        let (size, digest) = hash_file(&path).map_err(|e| damaged(format!("{}: {e}", f.name)))?;
        let sha256 = digest.hex();
        if size != f.size || sha256 != f.sha256 {
            return Err(damaged(format!(
                "{} has {size} bytes with sha256 {sha256}; recorded {} bytes with sha256 {}",
                f.name, f.size, f.sha256
            )));
        }
    }
    Ok(())
}

/// The version `dest/current` points at, read without taking the lock (for status readers).
pub fn current_of(dest: &Path) -> Option<VersionManifest> {
    let link = std::fs::read_link(dest.join("current")).ok()?;
    let hex = link.strip_prefix("versions").ok()?;
    read_manifest(&dest.join("versions").join(hex))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn manifest(hex: &str, files: &[(&str, &[u8])]) -> VersionManifest {
        use sha2::Digest;
        VersionManifest {
            target: "t".into(),
            reference: "r/x:y".into(),
            platform: "linux/arm64".into(),
            digest: test_digest(hex),
            tag_digest: test_digest(hex),
            published_at: now_rfc3339(),
            files: files
                .iter()
                .map(|(n, d)| FileRecord {
                    name: n.to_string(),
                    size: d.len() as u64,
                    sha256: hex::encode(sha2::Sha256::digest(d)),
                    source: format!("src/{n}"),
                })
                .collect(),
            boot: None,
            signature: None,
        }
    }

    /// A digest whose hex starts with `hex` (padded), so directory names stay readable.
    fn test_digest(hex: &str) -> Digest {
        Digest::from_hex(&format!("{hex:0<64}")).unwrap()
    }

    /// `hex` padded to a digest's 64 digits (the tests name versions aa, bb, cc).
    fn h(hex: &str) -> String {
        format!("{hex:0<64}")
    }

    fn publish(store: &Store, hex: &str, files: &[(&str, &[u8])]) -> VersionManifest {
        let staging = store.stage(&h(hex)).unwrap();
        for (n, d) in files {
            std::fs::write(staging.path().join(n), d).unwrap();
        }
        let m = manifest(hex, files);
        store.commit(staging, &m).unwrap();
        let names: Vec<String> = files.iter().map(|(n, _)| n.to_string()).collect();
        store.activate(&m, &names).unwrap()
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn publish_switch_and_prune() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("assets/talos");
        let store = Store::open(&dest, &Modes::default()).unwrap();
        assert!(store.current().is_none());

        publish(&store, "aa", &[("vmlinuz", b"k1"), ("initrd", b"i1")]);
        assert_eq!(std::fs::read(dest.join("vmlinuz")).unwrap(), b"k1");
        assert_eq!(
            std::fs::read_link(dest.join("current")).unwrap(),
            Path::new("versions").join(h("aa"))
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        publish(&store, "bb", &[("vmlinuz", b"k2"), ("initrd", b"i2")]);
        std::thread::sleep(std::time::Duration::from_millis(2));
        publish(&store, "cc", &[("vmlinuz", b"k3"), ("initrd", b"i3")]);
        assert_eq!(std::fs::read(dest.join("initrd")).unwrap(), b"i3");
        assert_eq!(store.current().unwrap().hex(), h("cc"));

        // A version the matchbox profile still names is kept, whatever `retain` says.
        let removed = store.prune(1, Duration::ZERO, &[h("aa")]).unwrap();
        assert_eq!(removed, vec![h("bb")]);
        assert_eq!(entries(&dest.join("versions")), vec![h("aa"), h("cc")]);
        publish(&store, "bb", &[("vmlinuz", b"k2"), ("initrd", b"i2")]);
        publish(&store, "cc", &[("vmlinuz", b"k3"), ("initrd", b"i3")]);
        let removed = store.prune(2, Duration::ZERO, &[]).unwrap();
        assert_eq!(removed, vec![h("aa")]);
        assert_eq!(entries(&dest.join("versions")), vec![h("bb"), h("cc")]);
        assert_eq!(
            entries(&dest),
            vec!["current", "initrd", "versions", "vmlinuz"]
        );
        let mode = std::fs::metadata(dest.join("versions").join(h("cc")).join("vmlinuz"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{mode:o}");
    }

    #[test]
    fn intactness_checks_sizes_and_file_set() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), &Modes::default()).unwrap();
        let m = publish(&store, "aa", &[("k", b"kernel")]);
        let names = vec![vec!["k".to_string()]];
        assert!(store.is_intact(&m, &names));
        assert!(!store.is_intact(&m, &[vec!["k".to_string(), "i".to_string()]]));
        // one of several layouts is enough
        assert!(store.is_intact(&m, &[vec!["x".to_string()], vec!["k".to_string()]]));
        std::fs::write(
            tmp.path().join("versions").join(h("aa")).join("k"),
            b"short",
        )
        .unwrap();
        assert!(!store.is_intact(&m, &names));
    }

    #[test]
    fn recommitting_a_version_swaps_it_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), &Modes::default()).unwrap();
        publish(&store, "aa", &[("k", b"old")]);
        publish(&store, "aa", &[("k", b"new"), ("i", b"added")]);
        assert_eq!(std::fs::read(tmp.path().join("k")).unwrap(), b"new");
        assert_eq!(std::fs::read(tmp.path().join("i")).unwrap(), b"added");
        assert_eq!(entries(&tmp.path().join("versions")), vec![h("aa")]);
        // no debris left: the replaced copy was removed with the staging guard
        assert!(entries(tmp.path())
            .iter()
            .all(|e| !e.starts_with(STAGING_PREFIX)));
    }

    #[test]
    fn stale_links_go_and_debris_is_cleared() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path(), &Modes::default()).unwrap();
            publish(&store, "aa", &[("k", b"1"), ("old", b"2")]);
            publish(&store, "bb", &[("k", b"3")]);
            assert!(std::fs::symlink_metadata(tmp.path().join("old")).is_err());
            // a crash left these behind
            std::fs::create_dir(tmp.path().join(".staging-bb-1-2")).unwrap();
            std::fs::write(tmp.path().join(".tmp-current-1-2"), b"").unwrap();
        }
        let store = Store::open(tmp.path(), &Modes::default()).unwrap();
        assert_eq!(entries(tmp.path()), vec!["current", "k", "versions"]);
        assert_eq!(store.current().unwrap().hex(), h("bb"));
    }

    #[test]
    fn temp_files_inside_version_directories_are_debris_too() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path(), &Modes::default()).unwrap();
            publish(&store, "aa", &[("k", b"1")]);
        }
        std::fs::write(
            tmp.path()
                .join("versions")
                .join(h("aa"))
                .join(".tmp-manifest-1-2"),
            b"{",
        )
        .unwrap();
        let _store = Store::open(tmp.path(), &Modes::default()).unwrap();
        assert_eq!(
            entries(&tmp.path().join("versions").join(h("aa"))),
            vec![".bootsync.json", "k"]
        );
    }

    #[test]
    fn a_second_process_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _held = Store::open(tmp.path(), &Modes::default()).unwrap();
        assert!(matches!(
            Store::open(tmp.path(), &Modes::default()),
            Err(StoreError::Busy { .. })
        ));
    }

    #[test]
    fn a_failed_staging_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), &Modes::default()).unwrap();
        {
            let staging = store.stage(&h("aa")).unwrap();
            std::fs::write(staging.path().join("k"), b"partial").unwrap();
        }
        assert_eq!(entries(tmp.path()), vec!["versions"]);
    }

    #[test]
    fn grace_keeps_recently_retired_versions() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), &Modes::default()).unwrap();
        publish(&store, "aa", &[("k", b"1")]);
        publish(&store, "bb", &[("k", b"2")]);
        publish(&store, "cc", &[("k", b"3")]);
        // aa and bb were retired moments ago: a long grace keeps them past `retain`.
        assert!(store
            .prune(1, Duration::from_secs(3600), &[])
            .unwrap()
            .is_empty());
        assert_eq!(
            entries(&tmp.path().join("versions")),
            vec![h("aa"), h("bb"), h("cc")]
        );
        // With no grace only `retain` survive.
        assert_eq!(store.prune(1, Duration::ZERO, &[]).unwrap().len(), 2);
        assert_eq!(entries(&tmp.path().join("versions")), vec![h("cc")]);
    }

    #[test]
    fn verify_catches_same_size_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), &Modes::default()).unwrap();
        let m = publish(&store, "aa", &[("k", b"kernel")]);
        store.verify(&m).unwrap();
        std::fs::write(
            tmp.path().join("versions").join(h("aa")).join("k"),
            b"KERNEL",
        )
        .unwrap();
        let e = store.verify(&m).unwrap_err().to_string();
        assert!(e.contains("k has 6 bytes"), "{e}");
        // the cheap check cannot see it; that is why recovery hashes
        assert!(store.is_intact(&m, &[vec!["k".to_string()]]));
    }

    #[test]
    fn recovery_falls_back_to_the_newest_intact_version() {
        let tmp = tempfile::tempdir().unwrap();
        let names = vec![vec!["k".to_string()]];
        {
            let store = Store::open(tmp.path(), &Modes::default()).unwrap();
            publish(&store, "aa", &[("k", b"one")]);
            std::thread::sleep(Duration::from_millis(2));
            publish(&store, "bb", &[("k", b"two")]);
            std::thread::sleep(Duration::from_millis(2));
            publish(&store, "cc", &[("k", b"three")]);
            assert!(
                matches!(store.recover(&names, &|_| true).unwrap(), Recovery::Intact(m) if m.hex() == h("cc"))
            );
        }
        std::fs::write(
            tmp.path().join("versions").join(h("cc")).join("k"),
            b"THREE",
        )
        .unwrap();
        std::fs::remove_file(tmp.path().join("k")).unwrap();
        let store = Store::open(tmp.path(), &Modes::default()).unwrap();
        match store.recover(&names, &|_| true).unwrap() {
            Recovery::FellBack { from, to, reason } => {
                assert_eq!(from, Some(test_digest("cc")));
                assert_eq!(to.hex(), h("bb"));
                assert!(reason.contains("sha256"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(tmp.path().join("k")).unwrap(), b"two");
        drop(store);
        // Under a signature policy only trusted versions are fallen back to: with cc whole
        // again and bb (current) damaged, the newest intact one is cc, but only aa is trusted.
        std::fs::write(
            tmp.path().join("versions").join(h("cc")).join("k"),
            b"three",
        )
        .unwrap();
        std::fs::write(tmp.path().join("versions").join(h("bb")).join("k"), b"TWO").unwrap();
        let store = Store::open(tmp.path(), &Modes::default()).unwrap();
        let only_aa = |m: &VersionManifest| m.hex() == h("aa");
        match store.recover(&names, &only_aa).unwrap() {
            Recovery::FellBack { to, .. } => assert_eq!(to.hex(), h("aa")),
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(tmp.path().join("k")).unwrap(), b"one");
    }

    #[test]
    fn recovery_repairs_links() {
        let tmp = tempfile::tempdir().unwrap();
        let names = vec![vec!["k".to_string()]];
        let store = Store::open(tmp.path(), &Modes::default()).unwrap();
        publish(&store, "aa", &[("k", b"one")]);
        std::fs::remove_file(tmp.path().join("k")).unwrap();
        assert!(matches!(
            store.recover(&names, &|_| true).unwrap(),
            Recovery::Intact(_)
        ));
        assert_eq!(std::fs::read(tmp.path().join("k")).unwrap(), b"one");
        let empty = tempfile::tempdir().unwrap();
        let store = Store::open(empty.path(), &Modes::default()).unwrap();
        assert_eq!(store.recover(&names, &|_| true).unwrap(), Recovery::Empty);
    }

    #[test]
    fn space_check_reports_free_and_needed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), &Modes::default()).unwrap();
        store.check_space(1).unwrap();
        let e = store.check_space(u64::MAX).unwrap_err().to_string();
        assert!(e.contains("bytes free"), "{e}");
    }
}
