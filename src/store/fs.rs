//! File-system utilities of the store (and of everything else that writes where matchbox or
//! bootsync reads): the one atomic write, fsyncs, modes and groups, free space.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::Modes;
use crate::digest::Digest;

/// Prefix of the temp files this module writes (debris when a crash interrupts it).
pub const TMP_PREFIX: &str = ".tmp-";

/// Creates `path` and its missing parents with the configured directory mode and group,
/// whatever the umask.
pub fn create_dirs(path: &Path, modes: &Modes) -> io::Result<()> {
    make_dirs(path, modes, true)
}

/// [`create_dirs`] inside a staging directory, without the fsyncs: `fsync_tree` makes the
/// whole staged tree durable before it is committed.
pub fn create_staged_dirs(path: &Path, modes: &Modes) -> io::Result<()> {
    make_dirs(path, modes, false)
}

fn make_dirs(path: &Path, modes: &Modes, durable: bool) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        make_dirs(parent, modes, durable)?;
    }
    match fs::create_dir(path) {
        Ok(()) if !durable => apply_dir_modes(path, modes),
        Ok(()) => {
            apply_dir_modes(path, modes)?;
            // Durable before anything in it can be: its mode, and its name in the parent
            // (else a power cut after the first publish can lose the whole tree; found by
            // tests/powerloss.rs).
            fsync_dir(path)?;
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            fsync_dir(parent)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn apply_dir_modes(path: &Path, modes: &Modes) -> io::Result<()> {
    if let Some(gid) = modes.gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(modes.dir))
}

/// Gives a published file its mode and group (so matchbox, another user, can read it).
pub fn apply_file_modes(file: &fs::File, modes: &Modes) -> io::Result<()> {
    if let Some(gid) = modes.gid {
        std::os::unix::fs::fchown(file, None, Some(gid))?;
    }
    file.set_permissions(fs::Permissions::from_mode(modes.file))
}

/// sha256 of a file, streamed.
pub fn hash_file(path: &Path) -> io::Result<(u64, Digest)> {
    let mut file = fs::File::open(path)?;
    let mut hasher = crate::io::HashWriter::new(io::sink());
    io::copy(&mut file, &mut hasher)?;
    let (_, size, digest) = hasher.finish();
    Ok((size, digest))
}

pub fn fsync_dir(path: &Path) -> io::Result<()> {
    fs::File::open(path)?.sync_all()
}

/// A name no other writer uses: `<prefix><name>-<pid>-<random>`.
pub fn unique(prefix: &str, name: &str) -> String {
    format!(
        "{prefix}{name}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

/// Writes `data` to `path` atomically: a temp file in the same directory (named
/// `<tmp_prefix>...`, so a reader that lists the directory can skip it), the modes, fsync,
/// rename over `path`, fsync of the directory. On failure the temp file is removed and `path`
/// is as it was.
pub fn write_atomic(path: &Path, data: &[u8], tmp_prefix: &str, modes: &Modes) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(unique(tmp_prefix, &name));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        apply_file_modes(&f, modes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes the files in `dir` whose names start with `prefix` (temp files of an earlier run
/// killed mid-write).
pub fn remove_temp_files(dir: &Path, prefix: &str) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Bytes free on the filesystem that holds (or would hold) `path`: its nearest existing
/// ancestor is asked, so nothing is created.
pub fn free_space(path: &Path) -> io::Result<u64> {
    let mut at = path;
    while !at.exists() {
        at = at.parent().unwrap_or(Path::new("/"));
    }
    free_bytes(at)
}

/// Bytes available to an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
    // right size; on success statvfs initialises it.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    // The field types differ between 32- and 64-bit targets.
    #[allow(clippy::unnecessary_cast)]
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Points `dir/name` at `target` by renaming a fresh symlink over it.
pub fn replace_symlink(dir: &Path, name: &str, target: &Path) -> io::Result<()> {
    let tmp = dir.join(unique(TMP_PREFIX, name));
    let link = dir.join(name);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, &link).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// fsyncs every file and directory below `root`, children before parents.
pub fn fsync_tree(root: &Path) -> io::Result<()> {
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
pub fn exchange(a: &Path, b: &Path) -> io::Result<()> {
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
