//! A file system that forgets what was not made durable, for power-loss tests (the idea of
//! LazyFS, which Jepsen uses): an in-memory FUSE file system keeping two trees, the one
//! processes see (`live`) and the one a power cut would leave (`durable`).
//!
//! The durability rules are the strictest POSIX allows:
//! - `fsync` of a file makes its data and mode durable (not its name);
//! - `fsync` of a directory makes its entries durable: names created, renamed or removed in it.
//!   A file that gets a durable name this way but was never fsynced is durable as an empty file
//!   (delayed allocation); a new directory, with no entries; a symlink, with its target;
//! - nothing else is durable: writes, renames, unlinks, mode changes are lost at a power cut
//!   unless the fsyncs above followed.
//!
//! A power cut: `cut_after(n)` freezes the file system at its n-th change (every call that
//! would change a tree, fsyncs included; the call itself does not happen): from then on every
//! call fails with EIO. The test then kills the process, unmounts, and mounts `durable` again
//! as the new `live` tree (the reboot). Data goes through the kernel with `direct_io` and
//! zero cache timeouts, so no page or dentry cache outlives a cut.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

const ROOT: u64 = 1;
const TTL: Duration = Duration::ZERO;
const FOPEN_DIRECT_IO: u32 = 1;
const MAX_WRITE: u32 = 8192;

#[derive(Debug, Clone)]
enum Body {
    File(Vec<u8>),
    Dir(BTreeMap<OsString, u64>),
    Link(PathBuf),
}

impl Body {
    fn kind(&self) -> FileType {
        match self {
            Body::File(_) => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
            Body::Link(_) => FileType::Symlink,
        }
    }
}

#[derive(Debug, Clone)]
struct Node {
    body: Body,
    mode: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
}

impl Node {
    fn dir(mode: u16) -> Node {
        Node {
            body: Body::Dir(BTreeMap::new()),
            mode,
            uid: 0,
            gid: 0,
            mtime: SystemTime::now(),
        }
    }
}

type Tree = HashMap<u64, Node>;

/// The shared state: both trees, the change counter and the cut.
#[derive(Debug)]
pub struct Disk {
    live: Tree,
    durable: Tree,
    next_ino: u64,
    /// Changes so far (calls that would change a tree).
    pub changes: u64,
    /// fsyncs (files and directories) and renames so far: the durability boundaries.
    pub boundaries: u64,
    /// The change numbers that were boundaries.
    boundary_at: Vec<u64>,
    cut_at: Option<u64>,
    pub frozen: bool,
}

impl Disk {
    fn new() -> Disk {
        let mut t = Tree::new();
        t.insert(ROOT, Node::dir(0o755));
        Disk {
            live: t.clone(),
            durable: t,
            next_ino: ROOT + 1,
            changes: 0,
            boundaries: 0,
            boundary_at: Vec::new(),
            cut_at: None,
            frozen: false,
        }
    }

    /// Counts a change; false when the file system is (now) frozen.
    fn change(&mut self, boundary: bool) -> bool {
        if self.frozen {
            return false;
        }
        if self.cut_at.is_some_and(|n| self.changes >= n) {
            self.frozen = true;
            return false;
        }
        if boundary {
            self.boundaries += 1;
            self.boundary_at.push(self.changes);
        }
        self.changes += 1;
        true
    }

    fn entries(&self, ino: u64) -> Option<&BTreeMap<OsString, u64>> {
        match &self.live.get(&ino)?.body {
            Body::Dir(e) => Some(e),
            _ => None,
        }
    }

    fn entries_mut(&mut self, ino: u64) -> Option<&mut BTreeMap<OsString, u64>> {
        match &mut self.live.get_mut(&ino)?.body {
            Body::Dir(e) => Some(e),
            _ => None,
        }
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.entries(parent)?.get(name).copied()
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.live.get(&ino)?;
        let kind = n.body.kind();
        let (size, nlink) = match &n.body {
            Body::File(d) => (d.len() as u64, 1),
            Body::Dir(e) => (e.len() as u64, 2),
            Body::Link(t) => (t.as_os_str().len() as u64, 1),
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind,
            perm: n.mode,
            nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn add(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<u64, i32> {
        if self.entries(parent).is_none() {
            return Err(libc::ENOTDIR);
        }
        if self.lookup(parent, name).is_some() {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.live.insert(ino, node);
        if let Some(e) = self.entries_mut(parent) {
            e.insert(name.to_os_string(), ino);
        }
        Ok(ino)
    }

    /// `fsync` of a file: its data and mode become durable.
    fn sync_file(&mut self, ino: u64) {
        if let Some(n) = self.live.get(&ino) {
            match (&n.body, self.durable.get_mut(&ino)) {
                // A directory's entries are synced by fsyncdir only.
                (Body::Dir(_), Some(d)) => d.mode = n.mode,
                (Body::Dir(_), None) => {
                    let mut d = n.clone();
                    d.body = Body::Dir(BTreeMap::new());
                    self.durable.insert(ino, d);
                }
                _ => {
                    self.durable.insert(ino, n.clone());
                }
            }
        }
    }

    /// `fsync` of a directory: its entries become durable; children new to the durable tree
    /// come in as an empty file, an empty directory, or the symlink.
    fn sync_dir(&mut self, ino: u64) {
        let Some(entries) = self.entries(ino).cloned() else {
            return self.sync_file(ino);
        };
        for child in entries.values() {
            if self.durable.contains_key(child) {
                continue;
            }
            if let Some(n) = self.live.get(child) {
                let mut d = n.clone();
                match &mut d.body {
                    Body::File(data) => data.clear(),
                    Body::Dir(e) => e.clear(),
                    Body::Link(_) => {}
                }
                self.durable.insert(*child, d);
            }
        }
        let mode = self.live.get(&ino).map(|n| n.mode);
        let node = self.durable.entry(ino).or_insert_with(|| Node::dir(0o755));
        node.body = Body::Dir(entries);
        if let Some(m) = mode {
            node.mode = m;
        }
    }

    /// The reboot after a cut: what was durable is all there is.
    fn power_cut(&mut self) {
        self.live = self.durable.clone();
        // Durable children of durable directories only: a node that no durable entry names
        // is gone, and an entry naming a node the durable tree lacks cannot exist (sync_dir
        // adds every child it names).
        self.frozen = false;
        self.cut_at = None;
    }
}

/// The FUSE side: every call locks the shared disk.
struct LazyFs {
    disk: Arc<Mutex<Disk>>,
}

fn lock(d: &Mutex<Disk>) -> MutexGuard<'_, Disk> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl LazyFs {
    fn disk(&self) -> MutexGuard<'_, Disk> {
        lock(&self.disk)
    }
}

macro_rules! frozen {
    ($disk:expr, $reply:expr) => {
        if $disk.frozen {
            $reply.error(libc::EIO);
            return;
        }
    };
}

macro_rules! change {
    ($disk:expr, $boundary:expr, $reply:expr) => {
        if !$disk.change($boundary) {
            $reply.error(libc::EIO);
            return;
        }
    };
}

impl Filesystem for LazyFs {
    fn init(
        &mut self,
        _req: &Request<'_>,
        config: &mut fuser::KernelConfig,
    ) -> Result<(), libc::c_int> {
        // Small writes: every 8 KiB of a file is a change, so cuts land inside files too.
        let _ = config.set_max_write(MAX_WRITE);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let d = self.disk();
        frozen!(d, reply);
        match d.lookup(parent, name).and_then(|i| d.attr(i)) {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let d = self.disk();
        frozen!(d, reply);
        match d.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut d = self.disk();
        change!(d, false, reply);
        let Some(n) = d.live.get_mut(&ino) else {
            return reply.error(libc::ENOENT);
        };
        if let Some(m) = mode {
            n.mode = (m & 0o7777) as u16;
        }
        if let Some(u) = uid {
            n.uid = u;
        }
        if let Some(g) = gid {
            n.gid = g;
        }
        if let (Some(len), Body::File(data)) = (size, &mut n.body) {
            data.resize(len as usize, 0);
        }
        if let Some(t) = mtime {
            n.mtime = match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            };
        }
        match d.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        let d = self.disk();
        frozen!(d, reply);
        match d.live.get(&ino).map(|n| &n.body) {
            Some(Body::Link(t)) => reply.data(t.as_os_str().as_encoded_bytes()),
            _ => reply.error(libc::EINVAL),
        }
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut d = self.disk();
        change!(d, false, reply);
        let mut node = Node::dir((mode & !umask & 0o7777) as u16);
        (node.uid, node.gid) = (req.uid(), req.gid());
        match d.add(parent, name, node) {
            Ok(ino) => reply.entry(&TTL, &d.attr(ino).unwrap(), 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut d = self.disk();
        change!(d, false, reply);
        match d.lookup(parent, name).and_then(|i| d.live.get(&i)) {
            None => reply.error(libc::ENOENT),
            Some(Node {
                body: Body::Dir(_), ..
            }) => reply.error(libc::EISDIR),
            Some(_) => {
                d.entries_mut(parent).map(|e| e.remove(name));
                reply.ok()
            }
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut d = self.disk();
        change!(d, false, reply);
        match d.lookup(parent, name).and_then(|i| d.live.get(&i)) {
            None => reply.error(libc::ENOENT),
            Some(Node {
                body: Body::Dir(e), ..
            }) if !e.is_empty() => reply.error(libc::ENOTEMPTY),
            Some(Node {
                body: Body::Dir(_), ..
            }) => {
                d.entries_mut(parent).map(|e| e.remove(name));
                reply.ok()
            }
            Some(_) => reply.error(libc::ENOTDIR),
        }
    }

    fn symlink(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut d = self.disk();
        change!(d, false, reply);
        let node = Node {
            body: Body::Link(target.to_path_buf()),
            mode: 0o777,
            uid: req.uid(),
            gid: req.gid(),
            mtime: SystemTime::now(),
        };
        match d.add(parent, link_name, node) {
            Ok(ino) => reply.entry(&TTL, &d.attr(ino).unwrap(), 0),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut d = self.disk();
        change!(d, true, reply);
        let Some(src) = d.lookup(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        let dst = d.lookup(newparent, newname);
        if flags & libc::RENAME_EXCHANGE != 0 {
            let Some(dst) = dst else {
                return reply.error(libc::ENOENT);
            };
            d.entries_mut(parent)
                .map(|e| e.insert(name.to_os_string(), dst));
            d.entries_mut(newparent)
                .map(|e| e.insert(newname.to_os_string(), src));
            return reply.ok();
        }
        if dst.is_some() && flags & libc::RENAME_NOREPLACE != 0 {
            return reply.error(libc::EEXIST);
        }
        if let Some(dst) = dst {
            let src_dir = matches!(d.live.get(&src).map(|n| &n.body), Some(Body::Dir(_)));
            match d.live.get(&dst).map(|n| &n.body) {
                Some(Body::Dir(e)) if !e.is_empty() => return reply.error(libc::ENOTEMPTY),
                Some(Body::Dir(_)) if !src_dir => return reply.error(libc::EISDIR),
                Some(Body::File(_) | Body::Link(_)) if src_dir => {
                    return reply.error(libc::ENOTDIR)
                }
                _ => {}
            }
        }
        d.entries_mut(parent).map(|e| e.remove(name));
        d.entries_mut(newparent)
            .map(|e| e.insert(newname.to_os_string(), src));
        reply.ok()
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let mut d = self.disk();
        frozen!(d, reply);
        if flags & libc::O_TRUNC != 0 {
            change!(d, false, reply);
            if let Some(Node {
                body: Body::File(data),
                ..
            }) = d.live.get_mut(&ino)
            {
                data.clear();
            }
        }
        match d.live.get(&ino) {
            Some(_) => reply.opened(0, FOPEN_DIRECT_IO),
            None => reply.error(libc::ENOENT),
        }
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut d = self.disk();
        change!(d, false, reply);
        if let Some(ino) = d.lookup(parent, name) {
            if flags & libc::O_EXCL != 0 {
                return reply.error(libc::EEXIST);
            }
            if flags & libc::O_TRUNC != 0 {
                if let Some(Node {
                    body: Body::File(data),
                    ..
                }) = d.live.get_mut(&ino)
                {
                    data.clear();
                }
            }
            let a = d.attr(ino).unwrap();
            return reply.created(&TTL, &a, 0, 0, FOPEN_DIRECT_IO);
        }
        let node = Node {
            body: Body::File(Vec::new()),
            mode: (mode & !umask & 0o7777) as u16,
            uid: req.uid(),
            gid: req.gid(),
            mtime: SystemTime::now(),
        };
        match d.add(parent, name, node) {
            Ok(ino) => reply.created(&TTL, &d.attr(ino).unwrap(), 0, 0, FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let d = self.disk();
        frozen!(d, reply);
        match d.live.get(&ino).map(|n| &n.body) {
            Some(Body::File(data)) => {
                let start = (offset.max(0) as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                reply.data(&data[start..end])
            }
            Some(_) => reply.error(libc::EISDIR),
            None => reply.error(libc::ENOENT),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut d = self.disk();
        change!(d, false, reply);
        match d.live.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::File(file)) => {
                let start = offset.max(0) as usize;
                if file.len() < start + data.len() {
                    file.resize(start + data.len(), 0);
                }
                file[start..start + data.len()].copy_from_slice(data);
                reply.written(data.len() as u32)
            }
            Some(_) => reply.error(libc::EISDIR),
            None => reply.error(libc::ENOENT),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lo: u64, reply: ReplyEmpty) {
        reply.ok()
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _ds: bool, reply: ReplyEmpty) {
        let mut d = self.disk();
        change!(d, true, reply);
        d.sync_file(ino);
        reply.ok()
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let d = self.disk();
        frozen!(d, reply);
        match d.entries(ino) {
            Some(_) => reply.opened(0, 0),
            None => reply.error(libc::ENOTDIR),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let d = self.disk();
        frozen!(d, reply);
        let Some(entries) = d.entries(ino) else {
            return reply.error(libc::ENOTDIR);
        };
        let mut all: Vec<(u64, FileType, OsString)> = vec![
            (ino, FileType::Directory, ".".into()),
            (ino, FileType::Directory, "..".into()),
        ];
        for (name, child) in entries {
            let kind = d
                .live
                .get(child)
                .map_or(FileType::RegularFile, |n| n.body.kind());
            all.push((*child, kind, name.clone()));
        }
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(child, (i + 1) as i64, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _ds: bool, reply: ReplyEmpty) {
        let mut d = self.disk();
        change!(d, true, reply);
        d.sync_dir(ino);
        reply.ok()
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        // Plenty of room: space is not what these tests are about.
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096)
    }

    fn access(&mut self, _req: &Request<'_>, ino: u64, _mask: i32, reply: ReplyEmpty) {
        let d = self.disk();
        frozen!(d, reply);
        match d.live.get(&ino) {
            Some(_) => reply.ok(),
            None => reply.error(libc::ENOENT),
        }
    }
}

/// A mounted lazy file system.
pub struct Mounted {
    pub disk: Arc<Mutex<Disk>>,
    pub mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl Mounted {
    /// An empty file system at `mountpoint` (an existing empty directory).
    pub fn mount(mountpoint: &Path) -> Mounted {
        let disk = Arc::new(Mutex::new(Disk::new()));
        let mut m = Mounted {
            disk,
            mountpoint: mountpoint.to_path_buf(),
            session: None,
        };
        m.session = Some(m.spawn());
        m
    }

    fn spawn(&self) -> fuser::BackgroundSession {
        let fs = LazyFs {
            disk: self.disk.clone(),
        };
        let options = [
            MountOption::FSName("bootsync-lazyfs".into()),
            MountOption::RW,
            MountOption::DefaultPermissions,
        ];
        fuser::spawn_mount2(fs, &self.mountpoint, &options).unwrap_or_else(|e| {
            panic!(
                "cannot mount the test FUSE file system at {:?}: {e}. The power-loss test needs \
                 /dev/fuse and fusermount3 (Debian `fuse3`)",
                self.mountpoint
            )
        })
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        lock(&self.disk)
    }

    /// Changes so far and durability boundaries so far.
    pub fn counts(&self) -> (u64, u64) {
        let d = self.disk();
        (d.changes, d.boundaries)
    }

    /// The numbers of the changes (since the last restore) that were fsyncs or renames.
    pub fn boundary_changes(&self) -> Vec<u64> {
        self.disk().boundary_at.clone()
    }

    /// Freezes the file system after `n` more changes.
    pub fn cut_after(&self, n: u64) {
        let mut d = self.disk();
        d.cut_at = Some(d.changes + n);
    }

    pub fn is_frozen(&self) -> bool {
        self.disk().frozen
    }

    /// The power cut and the reboot: unmounts, keeps only what was durable, mounts again.
    pub fn power_cut(&mut self) {
        {
            // Nothing more may change while the kernel lets go.
            let mut d = self.disk();
            d.frozen = true;
        }
        drop(self.session.take());
        self.disk().power_cut();
        self.session = Some(self.spawn());
    }

    /// Both trees and counters as they are now.
    pub fn snapshot(&self) -> Snapshot {
        let d = self.disk();
        Snapshot {
            live: d.live.clone(),
            durable: d.durable.clone(),
            next_ino: d.next_ino,
        }
    }

    /// Unmounts, puts `s` back (counters from zero, no cut), mounts again.
    pub fn restore(&mut self, s: &Snapshot) {
        drop(self.session.take());
        {
            let mut d = self.disk();
            d.live = s.live.clone();
            d.durable = s.durable.clone();
            d.next_ino = s.next_ino;
            d.changes = 0;
            d.boundaries = 0;
            d.boundary_at.clear();
            d.cut_at = None;
            d.frozen = false;
        }
        self.session = Some(self.spawn());
    }
}

/// A saved state of the file system (see [`Mounted::snapshot`]).
#[derive(Clone)]
pub struct Snapshot {
    live: Tree,
    durable: Tree,
    next_ino: u64,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        drop(self.session.take());
    }
}
