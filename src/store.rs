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

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub const FILE_MODE: u32 = 0o644;
pub const DIR_MODE: u32 = 0o755;
const MANIFEST: &str = ".bootsync.json";
const STAGING_PREFIX: &str = ".staging-";
const TMP_PREFIX: &str = ".tmp-";

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
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

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
    pub digest: String,
    /// What the reference resolved to (an index digest for multi-arch tags).
    pub tag_digest: String,
    /// When this version last became current (RFC 3339).
    pub published_at: String,
    pub files: Vec<FileRecord>,
}

impl VersionManifest {
    pub fn hex(&self) -> &str {
        digest_hex(&self.digest)
    }
}

pub fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// Creates `path` and its missing parents with mode 0755, whatever the umask.
pub fn create_dirs(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        create_dirs(parent)?;
    }
    match fs::create_dir(path) {
        Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn set_mode(file: &fs::File, mode: u32) -> io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(mode))
}

fn fsync_dir(path: &Path) -> io::Result<()> {
    fs::File::open(path)?.sync_all()
}

fn unique(prefix: &str, name: &str) -> String {
    format!(
        "{prefix}{name}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

/// A target's destination directory, locked for the lifetime of this value.
pub struct Store {
    dest: PathBuf,
    versions: PathBuf,
    _lock: fs::File,
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
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

impl Store {
    /// Opens (creating if needed) `dest`, takes its lock, and removes debris of interrupted runs.
    pub fn open(dest: &Path) -> Result<Store, StoreError> {
        let versions = dest.join("versions");
        create_dirs(&versions).map_err(at(&versions))?;
        // flock(2) on the directory itself: nothing extra on disk for matchbox to serve.
        let lock = fs::File::open(dest).map_err(at(dest))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Busy {
                    dest: dest.to_path_buf(),
                })
            }
            Err(fs::TryLockError::Error(e)) => return Err(at(dest)(e)),
        }
        let store = Store {
            dest: dest.to_path_buf(),
            versions,
            _lock: lock,
        };
        store.remove_debris()?;
        Ok(store)
    }

    fn remove_debris(&self) -> Result<(), StoreError> {
        for dir in [&self.dest, &self.versions] {
            for entry in fs::read_dir(dir).map_err(at(dir))? {
                let entry = entry.map_err(at(dir))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(STAGING_PREFIX) || name.starts_with(TMP_PREFIX) {
                    let path = entry.path();
                    tracing::info!(path = %path.display(), "removing debris of an interrupted sync");
                    let removed = if entry.file_type().map_err(at(&path))?.is_dir() {
                        fs::remove_dir_all(&path)
                    } else {
                        fs::remove_file(&path)
                    };
                    removed.map_err(at(&path))?;
                }
            }
        }
        Ok(())
    }

    /// The version `current` points at, if it and its manifest are readable.
    pub fn current(&self) -> Option<VersionManifest> {
        let link = fs::read_link(self.dest.join("current")).ok()?;
        let hex = link.strip_prefix("versions").ok()?.to_str()?.to_string();
        self.version(&hex)
    }

    /// The manifest of `versions/<hex>`, if present and readable.
    pub fn version(&self, hex: &str) -> Option<VersionManifest> {
        let text = fs::read(self.versions.join(hex).join(MANIFEST)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// A cheap check that every recorded file is there with its recorded size and that the
    /// version holds exactly the files `names` asks for.
    pub fn is_intact(&self, m: &VersionManifest, names: &[String]) -> bool {
        let dir = self.versions.join(m.hex());
        let covers = names.iter().all(|n| {
            m.files
                .iter()
                .any(|f| f.name == *n || Path::new(&f.name).starts_with(n))
        }) && m
            .files
            .iter()
            .all(|f| names.iter().any(|n| Path::new(&f.name).starts_with(n)));
        covers
            && m.files.iter().all(|f| {
                fs::symlink_metadata(dir.join(&f.name))
                    .is_ok_and(|md| md.is_file() && md.len() == f.size)
            })
    }

    /// A fresh staging directory for version `hex`.
    pub fn stage(&self, hex: &str) -> Result<Staging, StoreError> {
        let path = self.dest.join(unique(STAGING_PREFIX, hex));
        fs::create_dir(&path).map_err(at(&path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(DIR_MODE)).map_err(at(&path))?;
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
        write_manifest(&staging.path, manifest)?;
        fsync_tree(&staging.path).map_err(at(&staging.path))?;
        let final_path = self.versions.join(manifest.hex());
        if final_path.exists() {
            exchange(&staging.path, &final_path).map_err(at(&final_path))?;
            // `staging` now holds the replaced version; its Drop removes it.
        } else {
            fs::rename(&staging.path, &final_path).map_err(at(&final_path))?;
            staging.committed = true;
        }
        fsync_dir(&self.versions).map_err(at(&self.versions))?;
        Ok(())
    }

    /// Makes version `hex` current and points the stable names at it. Stable links for names no
    /// longer published are removed.
    pub fn activate(&self, manifest: &VersionManifest, names: &[String]) -> Result<(), StoreError> {
        let hex = manifest.hex();
        let version_dir = self.versions.join(hex);
        if !version_dir.is_dir() {
            return Err(StoreError::Conflict {
                path: version_dir,
                reason: "version to activate does not exist".into(),
            });
        }
        // Note when it became current (for retention), durably, before the switch.
        let mut stamped = manifest.clone();
        stamped.published_at = now_rfc3339();
        write_manifest(&version_dir, &stamped)?;

        replace_symlink(&self.dest, "current", &Path::new("versions").join(hex))?;
        for name in names {
            let link = self.dest.join(name);
            let want = Path::new("current").join(name);
            if fs::read_link(&link).ok().as_deref() == Some(want.as_path()) {
                continue;
            }
            if let Ok(md) = fs::symlink_metadata(&link) {
                if md.is_dir() {
                    return Err(StoreError::Conflict {
                        path: link,
                        reason: "a directory is in the way of a stable link; move it away".into(),
                    });
                }
            }
            replace_symlink(&self.dest, name, &want)?;
        }
        self.remove_stale_links(names)?;
        fsync_dir(&self.dest).map_err(at(&self.dest))?;
        Ok(())
    }

    fn remove_stale_links(&self, names: &[String]) -> Result<(), StoreError> {
        for entry in fs::read_dir(&self.dest).map_err(at(&self.dest))? {
            let entry = entry.map_err(at(&self.dest))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "current" || names.contains(&name) {
                continue;
            }
            if let Ok(target) = fs::read_link(entry.path()) {
                if target.starts_with("current") {
                    fs::remove_file(entry.path()).map_err(at(&entry.path()))?;
                }
            }
        }
        Ok(())
    }

    /// Deletes all but the `retain` most recently published versions; never the current one.
    pub fn prune(&self, retain: usize) -> Result<Vec<String>, StoreError> {
        let current = self.current().map(|m| m.hex().to_string());
        let mut versions: Vec<(SystemTime, String)> = Vec::new();
        for entry in fs::read_dir(&self.versions).map_err(at(&self.versions))? {
            let entry = entry.map_err(at(&self.versions))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let when = self
                .version(&name)
                .and_then(|m| humantime::parse_rfc3339(&m.published_at).ok())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            versions.push((when, name));
        }
        versions.sort_by(|a, b| b.cmp(a));
        let mut removed = Vec::new();
        for (_, name) in versions.into_iter().skip(retain) {
            if Some(&name) == current.as_ref() {
                continue;
            }
            let path = self.versions.join(&name);
            fs::remove_dir_all(&path).map_err(at(&path))?;
            tracing::info!(version = %name, "removed old version");
            removed.push(name);
        }
        if !removed.is_empty() {
            fsync_dir(&self.versions).map_err(at(&self.versions))?;
        }
        Ok(removed)
    }
}

/// Writes `dir/.bootsync.json` atomically (temp file, fsync, rename).
fn write_manifest(dir: &Path, manifest: &VersionManifest) -> Result<(), StoreError> {
    let tmp = dir.join(unique(TMP_PREFIX, "manifest"));
    let path = dir.join(MANIFEST);
    let json = serde_json::to_vec_pretty(manifest).map_err(|e| at(&path)(io::Error::other(e)))?;
    let write = || -> io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.write_all(b"\n")?;
        set_mode(&f, FILE_MODE)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fsync_dir(dir)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        at(&path)(e)
    })
}

/// Points `dir/name` at `target` by renaming a fresh symlink over it.
fn replace_symlink(dir: &Path, name: &str, target: &Path) -> Result<(), StoreError> {
    let tmp = dir.join(unique(TMP_PREFIX, name));
    let link = dir.join(name);
    std::os::unix::fs::symlink(target, &tmp).map_err(at(&tmp))?;
    fs::rename(&tmp, &link).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        at(&link)(e)
    })
}

/// fsyncs every file and directory below `root`, children before parents.
fn fsync_tree(root: &Path) -> io::Result<()> {
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            fsync_tree(&entry.path())?;
        } else if kind.is_file() {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    fsync_dir(root)
}

/// Atomically swaps two directory entries (Linux `renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(hex: &str, files: &[(&str, &[u8])]) -> VersionManifest {
        use sha2::Digest;
        VersionManifest {
            target: "t".into(),
            reference: "r/x:y".into(),
            platform: "linux/arm64".into(),
            digest: format!("sha256:{hex}"),
            tag_digest: format!("sha256:{hex}"),
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
        }
    }

    fn publish(store: &Store, hex: &str, files: &[(&str, &[u8])]) -> VersionManifest {
        let staging = store.stage(hex).unwrap();
        for (n, d) in files {
            fs::write(staging.path().join(n), d).unwrap();
        }
        let m = manifest(hex, files);
        store.commit(staging, &m).unwrap();
        let names: Vec<String> = files.iter().map(|(n, _)| n.to_string()).collect();
        store.activate(&m, &names).unwrap();
        m
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
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
        let store = Store::open(&dest).unwrap();
        assert!(store.current().is_none());

        publish(&store, "aa", &[("vmlinuz", b"k1"), ("initrd", b"i1")]);
        assert_eq!(fs::read(dest.join("vmlinuz")).unwrap(), b"k1");
        assert_eq!(
            fs::read_link(dest.join("current")).unwrap(),
            Path::new("versions/aa")
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        publish(&store, "bb", &[("vmlinuz", b"k2"), ("initrd", b"i2")]);
        std::thread::sleep(std::time::Duration::from_millis(2));
        publish(&store, "cc", &[("vmlinuz", b"k3"), ("initrd", b"i3")]);
        assert_eq!(fs::read(dest.join("initrd")).unwrap(), b"i3");
        assert_eq!(store.current().unwrap().hex(), "cc");

        let removed = store.prune(2).unwrap();
        assert_eq!(removed, vec!["aa".to_string()]);
        assert_eq!(entries(&dest.join("versions")), vec!["bb", "cc"]);
        assert_eq!(
            entries(&dest),
            vec!["current", "initrd", "versions", "vmlinuz"]
        );
        let mode = fs::metadata(dest.join("versions/cc/vmlinuz"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, FILE_MODE, "{mode:o}");
    }

    #[test]
    fn intactness_checks_sizes_and_file_set() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let m = publish(&store, "aa", &[("k", b"kernel")]);
        let names = vec!["k".to_string()];
        assert!(store.is_intact(&m, &names));
        assert!(!store.is_intact(&m, &["k".to_string(), "i".to_string()]));
        fs::write(tmp.path().join("versions/aa/k"), b"short").unwrap();
        assert!(!store.is_intact(&m, &names));
    }

    #[test]
    fn recommitting_a_version_swaps_it_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        publish(&store, "aa", &[("k", b"old")]);
        publish(&store, "aa", &[("k", b"new"), ("i", b"added")]);
        assert_eq!(fs::read(tmp.path().join("k")).unwrap(), b"new");
        assert_eq!(fs::read(tmp.path().join("i")).unwrap(), b"added");
        assert_eq!(entries(&tmp.path().join("versions")), vec!["aa"]);
        // no debris left: the replaced copy was removed with the staging guard
        assert!(entries(tmp.path())
            .iter()
            .all(|e| !e.starts_with(STAGING_PREFIX)));
    }

    #[test]
    fn stale_links_go_and_debris_is_cleared() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path()).unwrap();
            publish(&store, "aa", &[("k", b"1"), ("old", b"2")]);
            publish(&store, "bb", &[("k", b"3")]);
            assert!(fs::symlink_metadata(tmp.path().join("old")).is_err());
            // a crash left these behind
            fs::create_dir(tmp.path().join(".staging-bb-1-2")).unwrap();
            fs::write(tmp.path().join(".tmp-current-1-2"), b"").unwrap();
        }
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(entries(tmp.path()), vec!["current", "k", "versions"]);
        assert_eq!(store.current().unwrap().hex(), "bb");
    }

    #[test]
    fn a_second_process_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _held = Store::open(tmp.path()).unwrap();
        assert!(matches!(
            Store::open(tmp.path()),
            Err(StoreError::Busy { .. })
        ));
    }

    #[test]
    fn a_failed_staging_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        {
            let staging = store.stage("aa").unwrap();
            fs::write(staging.path().join("k"), b"partial").unwrap();
        }
        assert_eq!(entries(tmp.path()), vec!["versions"]);
    }
}
