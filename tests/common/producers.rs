//! The real producers of images, driven by the tests: buildah (a container's filesystem edited
//! through `buildah mount`, committed and pushed), umoci, skopeo, podman (the reference: what
//! `podman create` + `podman cp` shows, as `docker create` + `docker cp` would), and the Python
//! ORAS client. `.ci/run` installs them (Debian packages, and oras-py in a venv under
//! `$BOOTSYNC_CACHE`, default `~/.cache/bootsync`), and the Debian arm64 kernel and systemd EFI
//! stub used to build a real UKI.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Where `.ci/run` keeps what it installs outside the clone.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("BOOTSYNC_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/bootsync"),
    }
}

/// A fixture `.ci/run` downloaded (Debian's arm64 kernel, systemd's arm64 EFI stub).
pub fn fixture(name: &str) -> PathBuf {
    let p = cache_dir().join("fixtures").join(name);
    assert!(
        p.exists(),
        "fixture {p:?} is missing: run .ci/run, which downloads it (Debian arm64 kernel and \
         systemd-boot-efi:arm64), or set BOOTSYNC_CACHE"
    );
    p
}

/// Runs a command to success; panics with its output otherwise.
#[track_caller]
pub fn run(mut cmd: Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e} (does .ci/run install it?)"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs a command; its stdout on success, its stderr on failure.
pub fn try_run(mut cmd: Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// buildah and podman over one private containers-storage (vfs driver, as root).
pub struct Containers {
    dir: tempfile::TempDir,
}

static MTIME: AtomicU64 = AtomicU64::new(0);

impl Containers {
    pub fn new() -> Containers {
        Containers {
            dir: tempfile::Builder::new()
                .prefix("bootsync-containers-")
                .tempdir()
                .unwrap(),
        }
    }

    /// `buildah` or `podman` with this storage.
    pub fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(name);
        c.arg("--root")
            .arg(self.dir.path().join("storage"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .arg("--storage-driver")
            .arg("vfs");
        c
    }

    pub fn buildah(&self, args: &[&str]) -> String {
        let mut c = self.tool("buildah");
        c.args(args);
        run(c)
    }

    /// A working container from `scratch` or an image, with its filesystem mounted.
    pub fn from(&self, base: &str) -> Ctr<'_> {
        let id = self.buildah(&["from", "--quiet", "--pull-never", base]);
        let root = PathBuf::from(self.buildah(&["mount", &id]));
        Ctr { c: self, id, root }
    }

    /// Pushes a local image to `dest` (`docker://...`) over plain HTTP.
    pub fn push(&self, image: &str, dest: &str, extra: &[&str]) {
        let mut args = vec!["push", "--quiet", "--tls-verify=false"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[image, dest]);
        self.buildah(&args);
    }

    /// What a container of `reference` (pulled from the registry into this storage) holds at
    /// `path`: `podman create` + `podman cp`, the workflow bootsync replaces. `Err` carries
    /// podman's message (no such file, not a file).
    pub fn container_file(&self, reference: &str, path: &str) -> Result<Vec<u8>, String> {
        let mut pull = self.tool("podman");
        pull.args(["pull", "--quiet", "--tls-verify=false", reference]);
        let image = run(pull);
        let mut create = self.tool("podman");
        create.args(["create", &image, "true"]);
        let ctr = run(create);
        let out = self
            .dir
            .path()
            .join(format!("cp-{}", MTIME.fetch_add(1, Ordering::Relaxed)));
        let mut cp = self.tool("podman");
        cp.arg("cp").arg(format!("{ctr}:{path}")).arg(&out);
        let copied = try_run(cp);
        let mut rm = self.tool("podman");
        rm.args(["rm", &ctr]);
        let _ = try_run(rm);
        copied?;
        if !out.is_file() {
            return Err(format!("{path} is not a regular file in the container"));
        }
        fs::read(&out).map_err(|e| e.to_string())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A buildah working container, edited through its mounted filesystem.
pub struct Ctr<'a> {
    c: &'a Containers,
    id: String,
    root: PathBuf,
}

impl Ctr<'_> {
    fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn parent(&self, path: &str) {
        if let Some(p) = self.at(path).parent() {
            fs::create_dir_all(p).unwrap();
        }
    }

    /// Writes a file. Every file gets an mtime of its own: buildah's vfs diff may miss a
    /// same-size replacement written within the same second.
    pub fn write(&self, path: &str, data: &[u8]) -> &Self {
        self.parent(path);
        let p = self.at(path);
        if fs::symlink_metadata(&p).is_ok_and(|m| !m.is_dir()) {
            fs::remove_file(&p).unwrap();
        }
        fs::write(&p, data).unwrap();
        let n = MTIME.fetch_add(1, Ordering::Relaxed);
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + n * 7);
        fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(when)
            .unwrap();
        self
    }

    pub fn mkdir(&self, path: &str) -> &Self {
        fs::create_dir_all(self.at(path)).unwrap();
        self
    }

    pub fn symlink(&self, path: &str, target: &str) -> &Self {
        self.parent(path);
        symlink(target, self.at(path)).unwrap();
        self
    }

    /// `ln TARGET PATH`, both inside the container.
    pub fn hardlink(&self, path: &str, target: &str) -> &Self {
        self.parent(path);
        fs::hard_link(self.at(target), self.at(path)).unwrap();
        self
    }

    /// `rm -rf PATH`.
    pub fn remove(&self, path: &str) -> &Self {
        let p = self.at(path);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p).unwrap(),
            Ok(_) => fs::remove_file(&p).unwrap(),
            Err(_) => {}
        }
        self
    }

    /// Commits the container as image `name` (one new layer) and removes it.
    pub fn commit(self, name: &str) -> String {
        self.c.buildah(&["commit", "--quiet", &self.id, name]);
        let _ = self.c.buildah(&["rm", &self.id]);
        name.to_string()
    }
}

/// umoci over an OCI image layout: images built layer by layer with `umoci insert`.
pub struct Umoci {
    dir: tempfile::TempDir,
}

impl Umoci {
    /// A layout with one empty image, `image:t`.
    pub fn new() -> Umoci {
        let u = Umoci {
            dir: tempfile::Builder::new()
                .prefix("bootsync-umoci-")
                .tempdir()
                .unwrap(),
        };
        let layout = u.layout();
        let mut init = Command::new("umoci");
        init.args(["init", "--layout", &layout]);
        run(init);
        let mut new = Command::new("umoci");
        new.args(["new", "--image", &format!("{layout}:t")]);
        run(new);
        u
    }

    fn layout(&self) -> String {
        self.dir.path().join("layout").display().to_string()
    }

    /// A fresh path in the scratch directory.
    fn scratch(&self, what: &str) -> std::path::PathBuf {
        self.dir
            .path()
            .join(format!("{what}-{}", MTIME.fetch_add(1, Ordering::Relaxed)))
    }

    /// `umoci insert SOURCE DEST`: one new layer with `source` at `dest`.
    fn insert(&self, source: &Path, dest: &str) -> &Self {
        let mut c = Command::new("umoci");
        c.args(["insert", "--image", &format!("{}:t", self.layout())])
            .arg(source)
            .arg(dest);
        run(c);
        self
    }

    /// One new layer holding `data` (a file) at `dest`.
    pub fn insert_file(&self, dest: &str, data: &[u8]) -> &Self {
        let src = self.scratch("src");
        fs::write(&src, data).unwrap();
        self.insert(&src, dest)
    }

    /// One new layer holding the directory `files` make, at `dest`.
    pub fn insert_dir(&self, dest: &str, files: &[(&str, &[u8])]) -> &Self {
        let src = self.scratch("dir");
        for (p, d) in files {
            let f = src.join(p);
            fs::create_dir_all(f.parent().unwrap()).unwrap();
            fs::write(f, d).unwrap();
        }
        self.insert(&src, dest)
    }

    /// Copies the image to `dest` (`docker://...`) with skopeo, blobs unchanged.
    pub fn push(&self, dest: &str) {
        skopeo_copy(&format!("oci:{}:t", self.layout()), dest, &[]);
    }
}

/// `skopeo copy SRC DEST` to a plain-HTTP registry.
pub fn skopeo_copy(src: &str, dest: &str, extra: &[&str]) {
    let mut c = Command::new("skopeo");
    c.args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--src-tls-verify=false",
    ])
    .args(extra)
    .args([src, dest]);
    run(c);
}

/// The Python ORAS client (oras-py) from the venv `.ci/run` made.
pub fn oras_python() -> PathBuf {
    if let Some(p) = std::env::var_os("BOOTSYNC_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let p = cache_dir().join("venv/bin/python3");
    assert!(
        p.exists(),
        "{p:?} is missing: run .ci/run, which installs oras-py (PyPI `oras`) in a venv there"
    );
    p
}

/// `oras push` (oras-py) of `files` (paths relative to `cwd`, each `path` or
/// `path:media/type`) to `target` (`host:port/repo:tag`, plain HTTP).
pub fn oras_push(cwd: &Path, target: &str, files: &[&str]) {
    let host = target.split('/').next().unwrap();
    let script = format!(
        "import oras.client\n\
         c = oras.client.OrasClient(hostname={host:?}, insecure=True)\n\
         r = c.push(target={target:?}, files={files:?}, disable_path_validation=True)\n\
         assert r.status_code in (200, 201), r.status_code\n"
    );
    let mut c = Command::new(oras_python());
    c.current_dir(cwd).arg("-c").arg(script);
    run(c);
}

/// `oras pull` (oras-py) of `target` into `outdir`.
pub fn oras_pull(target: &str, outdir: &Path) {
    let host = target.split('/').next().unwrap();
    fs::create_dir_all(outdir).unwrap();
    let script = format!(
        "import oras.client\n\
         c = oras.client.OrasClient(hostname={host:?}, insecure=True)\n\
         c.pull(target={target:?}, outdir={:?})\n",
        outdir.display().to_string()
    );
    let mut c = Command::new(oras_python());
    c.arg("-c").arg(script);
    run(c);
}

/// A cpio (newc) initramfs made by GNU cpio from `files`, compressed by the `zstd` tool.
pub fn cpio_initramfs(files: &[(&str, &[u8])]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for (p, d) in files {
        let f = root.join(p);
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(&f, d).unwrap();
    }
    let out = dir.path().join("initramfs.zst");
    let mut c = Command::new("sh");
    c.current_dir(&root).arg("-c").arg(format!(
        "find . | LC_ALL=C sort | cpio --quiet -o -H newc | zstd -q -19 -o {}",
        out.display()
    ));
    run(c);
    fs::read(out).unwrap()
}

/// A real arm64 UKI: systemd's EFI stub (Debian `systemd-boot-efi:arm64`) with a kernel, an
/// initramfs, a command line, an os-release and a uname joined by binutils' objcopy, the way
/// systemd documents building one by hand.
pub fn build_uki(kernel: &[u8], initrd: &[u8], cmdline: &str, osrel: &str, uname: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, data: &[u8]| {
        let p = dir.path().join(name);
        fs::write(&p, data).unwrap();
        p
    };
    let sections = [
        (".osrel", file("osrel", osrel.as_bytes()), "0x20000"),
        (".cmdline", file("cmdline", cmdline.as_bytes()), "0x30000"),
        (".uname", file("uname", uname.as_bytes()), "0x40000"),
        (".linux", file("linux", kernel), "0x2000000"),
        (".initrd", file("initrd", initrd), "0x6000000"),
    ];
    let out = dir.path().join("uki.efi");
    let mut c = Command::new("aarch64-linux-gnu-objcopy");
    for (name, path, vma) in &sections {
        c.arg("--add-section")
            .arg(format!("{name}={}", path.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={vma}"));
    }
    c.arg(fixture("linuxaa64.efi.stub")).arg(&out);
    run(c);
    fs::read(out).unwrap()
}
