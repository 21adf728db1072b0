//! Pull benchmark: bootsync against the best hand-written pipeline and against skopeo, on a
//! Talos-sized two-platform image in a local registry. Results and findings: docs/PERFORMANCE.md.
//!
//! ```sh
//! cargo bench --bench pull                       # 5 rounds, gzip and zstd, then the 4x image
//! BOOTSYNC_BENCH_ROUNDS=9 cargo bench --bench pull
//! BOOTSYNC_BENCH_SCALE=0.1 BOOTSYNC_BENCH_X4=0 cargo bench --bench pull   # quick smoke run
//! BOOTSYNC_BENCH_LINK=50,200 cargo bench --bench pull   # link speeds in MB/s (default; "" skips)
//! BOOTSYNC_BENCH_XZ=0 cargo bench --bench pull          # skip the real xz initramfs image
//! BOOTSYNC_BENCH_SERVE=1800 BOOTSYNC_BENCH_X4=0 cargo bench --bench pull  # keep the registry up
//!                                                # for profiling; prints configs and commands
//! ```
//!
//! Per platform (linux/arm64, linux/amd64) the image has a ~150 MB semi-compressible base layer
//! holding no wanted file, and a top layer with a ~40 MB kernel (EFI zboot) and a ~90 MB zstd
//! initramfs (incompressible), in a gzip variant (level 6) and a zstd variant (level 3). Measured,
//! each round from cold (fresh output directory; the registry's blobs stay in the page cache for
//! all methods), rounds interleaving the methods:
//!
//! - (a) `bootsync --config C sync --once` (the bench-profile binary, i.e. `target/release`, or
//!   `BOOTSYNC_BENCH_BIN`);
//! - (b) `curl -s http://REG/v2/REPO/blobs/<top> | tar -xzf - -C out <2 paths>`
//!   (zstd: `| zstd -dc | tar -xf - ...`);
//! - (c) `skopeo copy --src-tls-verify=false --override-arch arm64 docker://REG/REPO:TAG dir:X`
//!   then `tar -x` of the top layer;
//! - (b2), for reference: (b) plus a sha256 check of the blob and an fsync of the two files.
//!
//! Each command runs under `/usr/bin/time -f %M` (peak RSS; for the shell pipelines the largest
//! single process); wall time is measured here and CPU time (user + sys of the command and every
//! process it waited for) comes from `wait4(2)`'s rusage. Medians of `BOOTSYNC_BENCH_ROUNDS`
//! (default 5) rounds. Then (a) again on an image 4x as large (`BOOTSYNC_BENCH_X4=0` skips it).
//! The registry's access log tells which blobs (a) fetched. An image whose initramfs is a real
//! xz cpio (~90 MB, files from /usr; built once with `cpio` and `xz`, cached) compares (a) with
//! the download plus `xz -T0 -t` (`BOOTSYNC_BENCH_XZ=0` skips it). Results go to stdout as
//! Markdown.
//! `BOOTSYNC_BENCH_SCALE` (default 1) scales every size, for quick runs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::{fake_initramfs, fake_kernel, Config, Registry, Rng, TargetCfg};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const KERNEL_PATH: &str = "usr/install/arm64/vmlinuz";
const INITRAMFS_PATH: &str = "usr/install/arm64/initramfs.xz";
const MB: f64 = 1_000_000.0;

// ---------------------------------------------------------------------------------------------
// Building the image: layers streamed to files (tar -> hash -> compress -> hash -> file)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comp {
    Gzip,
    Zstd,
}

impl Comp {
    fn name(self) -> &'static str {
        match self {
            Comp::Gzip => "gzip",
            Comp::Zstd => "zstd",
        }
    }
    fn media_type(self) -> &'static str {
        match self {
            Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
    /// `tar` options that decompress this format.
    fn tar_flag(self) -> &'static str {
        match self {
            Comp::Gzip => "-z",
            Comp::Zstd => "--zstd",
        }
    }
}

/// Counts and hashes what passes through.
struct HashWrite<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashWrite<W> {
    fn new(inner: W) -> Self {
        HashWrite {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    fn finish(self) -> (W, u64, String) {
        (
            self.inner,
            self.count,
            format!("sha256:{}", common::hex(&self.hasher.finalize())),
        )
    }
}

impl<W: Write> Write for HashWrite<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Encoder<W: Write> {
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    fn new(comp: Comp, w: W) -> Self {
        match comp {
            // What `docker build` / buildkit use: gzip level 6, zstd level 3.
            Comp::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::new(6),
            )),
            Comp::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(w, 3).unwrap()),
        }
    }
    fn finish(self) -> W {
        match self {
            Encoder::Gzip(e) => e.finish().unwrap(),
            Encoder::Zstd(e) => e.finish().unwrap(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

type LayerWriter = HashWrite<Encoder<HashWrite<BufWriter<fs::File>>>>;

/// A layer blob on disk.
#[derive(Debug, Clone)]
struct BlobFile {
    path: PathBuf,
    digest: String,
    diff_id: String,
    size: u64,
    tar_size: u64,
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn build_layer(
    path: &Path,
    comp: Comp,
    fill: impl FnOnce(&mut tar::Builder<LayerWriter>),
) -> BlobFile {
    let file = BufWriter::with_capacity(1 << 20, fs::File::create(path).unwrap());
    let mut b = tar::Builder::new(HashWrite::new(Encoder::new(comp, HashWrite::new(file))));
    fill(&mut b);
    let (enc, tar_size, diff_id) = b.into_inner().unwrap().finish();
    let (file, size, digest) = enc.finish().finish();
    file.into_inner().unwrap().sync_all().unwrap();
    BlobFile {
        path: path.to_path_buf(),
        digest,
        diff_id,
        size,
        tar_size,
    }
}

fn add_dir(b: &mut tar::Builder<LayerWriter>, path: &str) {
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut h, format!("{path}/"), io::empty())
        .unwrap();
}

fn add_file(b: &mut tar::Builder<LayerWriter>, path: &str, data: &[u8]) {
    let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

/// Words for text-like file contents.
fn vocabulary(rng: &mut Rng) -> Vec<Vec<u8>> {
    (0..4096)
        .map(|_| {
            let r = rng.next_u64();
            let len = 2 + (r % 9) as usize;
            (0..len)
                .map(|i| b'a' + ((r >> (8 + 5 * i)) % 26) as u8)
                .collect()
        })
        .collect()
}

/// Semi-compressible content like an OS base layer: text-like files (words), binary-like files
/// (half-entropy bytes) and some incompressible ones.
fn base_file(rng: &mut Rng, vocab: &[Vec<u8>], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    match rng.next_u64() % 20 {
        // 55 %: text
        0..=10 => {
            let mut n = 0u32;
            while out.len() < len {
                let r = rng.next_u64();
                for k in 0..5 {
                    out.extend_from_slice(&vocab[((r >> (12 * k)) & 4095) as usize]);
                    n += 1;
                    out.push(if n.is_multiple_of(12) { b'\n' } else { b' ' });
                }
            }
        }
        // 30 %: binary-like (low nibbles random, high nibbles mostly zero)
        11..=16 => {
            while out.len() < len {
                let r = rng.next_u64();
                for k in 0..8 {
                    let byte = (r >> (8 * k)) as u8;
                    out.push(if byte & 0x80 == 0 { byte & 0x0f } else { byte });
                }
            }
        }
        // 15 %: incompressible (already compressed data, images, ...)
        _ => {
            out.resize(len, 0);
            rng.fill(&mut out);
        }
    }
    out.truncate(len);
    out
}

fn build_base(path: &Path, comp: Comp, seed: u64, total: usize) -> BlobFile {
    build_layer(path, comp, |b| {
        let mut rng = Rng::new(seed);
        let vocab = vocabulary(&mut rng);
        for d in [
            "etc",
            "usr",
            "usr/bin",
            "usr/lib",
            "usr/share",
            "usr/share/doc",
        ] {
            add_dir(b, d);
        }
        add_file(
            b,
            "etc/os-release",
            format!("ID=talos\nVERSION_ID=bench-{seed}\n").as_bytes(),
        );
        let dirs = ["usr/bin", "usr/lib", "usr/share", "usr/share/doc"];
        let mut written = 0;
        let mut i = 0;
        while written < total {
            let len = (64 * 1024 + (rng.next_u64() % (2 << 20)) as usize).min(total - written);
            let data = base_file(&mut rng, &vocab, len);
            add_file(b, &format!("{}/file-{i:05}", dirs[i % dirs.len()]), &data);
            written += len;
            i += 1;
        }
    })
}

/// The wanted files of one platform (kept for checking what each method extracted).
struct BootFiles {
    kernel_sha: String,
    initramfs_sha: String,
    kernel_len: usize,
    initramfs_len: usize,
}

/// The top layer's initramfs: made up (zstd frames of noise: incompressible) or given bytes.
#[derive(Clone, Copy)]
enum Initramfs<'a> {
    Fake(usize),
    Bytes(&'a [u8]),
}

fn build_top(
    path: &Path,
    comp: Comp,
    arch: &str,
    seed: u64,
    kernel: usize,
    initramfs: Initramfs<'_>,
) -> (BlobFile, BootFiles) {
    let k = fake_kernel("arm64", seed, kernel);
    let i = match initramfs {
        Initramfs::Fake(len) => fake_initramfs(seed + 1, len),
        Initramfs::Bytes(b) => b.to_vec(),
    };
    let files = BootFiles {
        kernel_sha: common::sha256_hex(&k),
        initramfs_sha: common::sha256_hex(&i),
        kernel_len: k.len(),
        initramfs_len: i.len(),
    };
    let blob = build_layer(path, comp, |b| {
        for d in ["usr", "usr/install", &format!("usr/install/{arch}")] {
            add_dir(b, d);
        }
        add_file(b, &format!("usr/install/{arch}/vmlinuz"), &k);
        add_file(b, &format!("usr/install/{arch}/initramfs.xz"), &i);
    });
    (blob, files)
}

struct Sizes<'a> {
    base: usize,
    kernel: usize,
    initramfs: Initramfs<'a>,
}

/// One pushed two-platform image.
struct Pushed {
    repo: String,
    tag: String,
    comp: Comp,
    /// arm64: base layer, top layer.
    arm_base: BlobFile,
    arm_top: BlobFile,
    amd_base: BlobFile,
    arm_files: BootFiles,
}

fn push_file(reg: &Registry, repo: &str, blob: &BlobFile) {
    let data = fs::read(&blob.path).unwrap();
    let digest = reg.push_blob(repo, &data);
    assert_eq!(digest, blob.digest);
    fs::remove_file(&blob.path).unwrap();
}

fn push_manifest(
    reg: &Registry,
    repo: &str,
    arch: &str,
    comp: Comp,
    layers: &[&BlobFile],
) -> (String, usize) {
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
    }))
    .unwrap();
    let config_digest = reg.push_blob(repo, &config);
    let manifest = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "size": config.len(),
            "digest": config_digest,
        },
        "layers": layers.iter().map(|l| json!({
            "mediaType": comp.media_type(),
            "size": l.size,
            "digest": l.digest,
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let digest = common::digest_of(&manifest);
    reg.push_manifest(
        repo,
        &digest,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
    (digest, manifest.len())
}

fn build_and_push(
    reg: &Registry,
    scratch: &Path,
    repo: &str,
    comp: Comp,
    sizes: &Sizes<'_>,
    seed: u64,
) -> Pushed {
    let t = Instant::now();
    let p = |name: &str| scratch.join(format!("{}-{}-{name}", repo.replace('/', "_"), comp.name()));
    // Two cores: one thread per platform.
    let ((arm_base, arm_top, arm_files), (amd_base, amd_top)) = std::thread::scope(|s| {
        let arm = s.spawn(|| {
            let base = build_base(&p("arm64-base"), comp, seed, sizes.base);
            let (top, files) = build_top(
                &p("arm64-top"),
                comp,
                "arm64",
                seed + 10,
                sizes.kernel,
                sizes.initramfs,
            );
            (base, top, files)
        });
        let amd = s.spawn(|| {
            let base = build_base(&p("amd64-base"), comp, seed + 100, sizes.base);
            let (top, _) = build_top(
                &p("amd64-top"),
                comp,
                "amd64",
                seed + 110,
                sizes.kernel,
                sizes.initramfs,
            );
            (base, top)
        });
        (arm.join().unwrap(), amd.join().unwrap())
    });
    let built = t.elapsed();
    let t = Instant::now();
    for b in [&arm_base, &arm_top, &amd_base, &amd_top] {
        push_file(reg, repo, b);
    }
    let arm = push_manifest(reg, repo, "arm64", comp, &[&arm_base, &arm_top]);
    let amd = push_manifest(reg, repo, "amd64", comp, &[&amd_base, &amd_top]);
    let index = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": amd.1,
             "digest": amd.0, "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": arm.1,
             "digest": arm.0, "platform": {"architecture": "arm64", "os": "linux"}},
        ],
    }))
    .unwrap();
    reg.push_manifest(
        repo,
        "v1",
        "application/vnd.oci.image.index.v1+json",
        &index,
    );
    eprintln!(
        "  {repo}: built in {:.1?} (arm64 base {:.0} MB tar -> {:.0} MB {}, top {:.0} MB tar -> {:.0} MB), pushed in {:.1?}",
        built,
        arm_base.tar_size as f64 / MB,
        arm_base.size as f64 / MB,
        comp.name(),
        arm_top.tar_size as f64 / MB,
        arm_top.size as f64 / MB,
        t.elapsed()
    );
    Pushed {
        repo: repo.to_string(),
        tag: "v1".into(),
        comp,
        arm_base,
        arm_top,
        amd_base,
        arm_files,
    }
}

// ---------------------------------------------------------------------------------------------
// A real xz initramfs (Talos <= 1.7): a newc cpio of files from /usr, `xz --check=crc32 -T2`
// ---------------------------------------------------------------------------------------------

/// Builds (once; cached in `$BOOTSYNC_CACHE/bench`, default `~/.cache/bootsync/bench`) an xz
/// initramfs: `cpio -o -H newc` of the first regular files under /usr/lib, /usr/bin and
/// /usr/share (sorted by path) adding up to `input` bytes, compressed with
/// `xz --check=crc32 -T2 -3` (several blocks, as `xz -T0` makes them; CRC32, which the kernel's
/// decoder needs). Returns its path.
fn xz_initramfs(input: u64) -> PathBuf {
    let cache = std::env::var_os("BOOTSYNC_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/bootsync")))
        .unwrap_or_else(std::env::temp_dir)
        .join("bench");
    fs::create_dir_all(&cache).unwrap();
    let out = cache.join(format!("initramfs-usr-{input}.cpio.xz"));
    if out.exists() {
        return out;
    }
    let t = Instant::now();
    let found = Command::new("find")
        .current_dir("/")
        .args([
            "usr/lib",
            "usr/bin",
            "usr/share",
            "-xdev",
            "-type",
            "f",
            "-readable",
        ])
        .args(["-printf", "%s %p\\n"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let mut files: Vec<(u64, String)> = String::from_utf8_lossy(&found.stdout)
        .lines()
        .filter_map(|l| {
            let (size, path) = l.split_once(' ')?;
            Some((size.parse().ok()?, path.to_string()))
        })
        .collect();
    files.sort_by(|a, b| a.1.cmp(&b.1));
    let (mut list, mut total) = (String::new(), 0u64);
    for (size, path) in files {
        if total >= input {
            break;
        }
        total += size;
        list.push_str(&path);
        list.push('\n');
    }
    let list_file = cache.join("initramfs-files.txt");
    fs::write(&list_file, list).unwrap();
    let partial = out.with_extension("partial");
    let script = format!(
        "set -eo pipefail; cd / && cpio -o -H newc --quiet < {} | xz --check=crc32 -T2 -3 > {}",
        list_file.display(),
        partial.display()
    );
    let ok = Command::new("bash").args(["-c", &script]).status().unwrap();
    assert!(ok.success(), "{script}");
    fs::rename(&partial, &out).unwrap();
    eprintln!(
        "  xz initramfs: {:.0} MB of /usr -> {:.0} MB xz in {:.0?} ({})",
        total as f64 / MB,
        fs::metadata(&out).unwrap().len() as f64 / MB,
        t.elapsed(),
        out.display()
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: f64,
    cpu: f64,
    /// KiB
    maxrss: u64,
    /// bootsync only: from the top layer's last byte (its own log) to the process's exit.
    tail: Option<f64>,
    /// bootsync only: the top layer's download, first request to last byte (its own log).
    download: Option<f64>,
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// Runs `program args...` to completion. CPU time (user + sys, the child and every process it
/// waited for) comes from `wait4`'s rusage; the peak RSS from GNU time's `%M`, which it sits in
/// between for this reason: a child spawned from this (large) process inherits its peak RSS in
/// `ru_maxrss` (the high-water mark is carried across `posix_spawn`/`exec`), while `time` is tiny
/// and forks its child itself.
fn measure(program: &str, args: &[&OsStr], stderr: Stdio, work: &Path, what: &str) -> Sample {
    let rss_file = work.join("time-maxrss");
    let _ = fs::remove_file(&rss_file);
    let started = Instant::now();
    let child = Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(&rss_file)
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: spawn /usr/bin/time: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain FFI; `rusage` is fully written by a successful wait4.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(r, pid, "{what}: wait4: {}", io::Error::last_os_error());
    // The child is reaped: `child` must not be waited for again (dropping it does not wait).
    drop(child);
    let time_out = fs::read_to_string(&rss_file).unwrap_or_default();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{what} failed (wait status {status:#x}): {time_out}"
    );
    let maxrss = time_out
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("{what}: no %M from /usr/bin/time: {time_out:?}"));
    Sample {
        tail: None,
        download: None,
        wall,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        maxrss,
    }
}

/// From bootsync's log: the time from the last layer's last byte to `exited`, and how long its
/// download took. The "layer read" line carries its RFC 3339 time, the download's seconds and
/// how long after the last byte it was written.
fn layer_read_times(log: &Path, exited: std::time::SystemTime) -> Option<(f64, f64)> {
    let text = fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains("layer read:"))?;
    let stamp = humantime::parse_rfc3339_weak(line.split_whitespace().next()?).ok()?;
    let after_ms: f64 = line
        .split("after_last_byte_ms=")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let secs: f64 = line
        .split(" secs=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((
        exited.duration_since(stamp).ok()?.as_secs_f64() + after_ms / 1000.0,
        secs,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Debug, Clone, Copy)]
struct Summary {
    /// Median of the samples' tails, when they have one.
    tail: Option<f64>,
    wall: f64,
    cpu: f64,
    rss_mb: f64,
    wall_min: f64,
    wall_max: f64,
}

fn summarize(s: &[Sample]) -> Summary {
    let walls: Vec<f64> = s.iter().map(|x| x.wall).collect();
    let tails: Vec<f64> = s.iter().filter_map(|x| x.tail).collect();
    Summary {
        tail: (!tails.is_empty()).then(|| median(tails)),
        wall: median(walls.clone()),
        cpu: median(s.iter().map(|x| x.cpu).collect()),
        rss_mb: median(s.iter().map(|x| x.maxrss as f64 * 1024.0 / MB).collect()),
        wall_min: walls.iter().cloned().fold(f64::INFINITY, f64::min),
        wall_max: walls.iter().cloned().fold(0.0, f64::max),
    }
}

fn sha256_file(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).unwrap();
    common::hex(&h.finalize())
}

#[track_caller]
fn check_files(kernel: &Path, initramfs: &Path, want: &BootFiles, what: &str) {
    assert_eq!(
        fs::metadata(kernel).map(|m| m.len()).ok(),
        Some(want.kernel_len as u64),
        "{what}: kernel size"
    );
    assert_eq!(
        fs::metadata(initramfs).map(|m| m.len()).ok(),
        Some(want.initramfs_len as u64),
        "{what}: initramfs size"
    );
    assert_eq!(
        sha256_file(kernel),
        want.kernel_sha,
        "{what}: kernel content"
    );
    assert_eq!(
        sha256_file(initramfs),
        want.initramfs_sha,
        "{what}: initramfs content"
    );
}

/// Blob GETs in the registry's access log (base layers of both platforms; the arm64 top layer).
#[derive(Default)]
struct BlobGets {
    base: usize,
    top: usize,
}

impl BlobGets {
    fn of(reg: &Registry, img: &Pushed) -> BlobGets {
        BlobGets {
            base: reg.blob_gets_of(&img.repo, &img.arm_base.digest)
                + reg.blob_gets_of(&img.repo, &img.amd_base.digest),
            top: reg.blob_gets_of(&img.repo, &img.arm_top.digest),
        }
    }

    /// Adds `after - before`.
    fn add(&mut self, after: &BlobGets, before: &BlobGets) {
        self.base += after.base - before.base;
        self.top += after.top - before.top;
    }
}

struct Bench {
    reg: Registry,
    work: PathBuf,
    rounds: usize,
}

impl Bench {
    fn reference(&self, img: &Pushed) -> String {
        format!("{}/{}:{}", self.reg.host(), img.repo, img.tag)
    }

    /// (a) bootsync from cold into a fresh dest.
    fn run_bootsync(&self, img: &Pushed, round: usize, check: bool) -> Sample {
        self.run_bootsync_via(&self.reg.host(), img, round, check)
    }

    /// (a) through `host` (the registry, or a rate-capped proxy in front of it).
    fn run_bootsync_via(&self, host: &str, img: &Pushed, round: usize, check: bool) -> Sample {
        let dir = self
            .work
            .join(format!("a-{}-{round}", img.repo.replace('/', "_")));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("dest");
        let reference = format!("{host}/{}:{}", img.repo, img.tag);
        let cfg = Config::new().registry(host).target(
            TargetCfg::new("talos-arm64", &reference, &dest)
                .platform("linux/arm64")
                .preset("talos-installer"),
        );
        let config = dir.join("bootsync.toml");
        fs::write(&config, cfg.render()).unwrap();
        let log_path = dir.join("bootsync.log");
        let log = fs::File::create(&log_path).unwrap();
        let mut sample = measure(
            &bootsync_bin(),
            &[
                OsStr::new("--config"),
                config.as_os_str(),
                OsStr::new("sync"),
                OsStr::new("--once"),
            ],
            log.into(),
            &self.work,
            "bootsync",
        );
        (sample.tail, sample.download) =
            layer_read_times(&log_path, std::time::SystemTime::now()).unzip();
        if check {
            check_files(
                &dest.join("vmlinuz-arm64"),
                &dest.join("initramfs-arm64.xz"),
                &img.arm_files,
                "bootsync",
            );
        }
        let _ = fs::remove_dir_all(&dir);
        sample
    }

    /// (b) curl | tar of the top layer.
    /// With `verified`: (b2), the same pipeline doing part of what bootsync guarantees.
    fn run_pipeline(&self, img: &Pushed, round: usize, check: bool, verified: bool) -> Sample {
        self.run_pipeline_via(&self.reg.host(), img, round, check, verified)
    }

    fn run_pipeline_via(
        &self,
        host: &str,
        img: &Pushed,
        round: usize,
        check: bool,
        verified: bool,
    ) -> Sample {
        let out = self
            .work
            .join(format!("b-{}-{round}", img.repo.replace('/', "_")));
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out).unwrap();
        let url = format!("http://{host}/v2/{}/blobs/{}", img.repo, img.arm_top.digest);
        let (shell, script) = if verified {
            let hex = common::hex_of(&img.arm_top.digest);
            ("bash", verified_pipeline_command(img.comp, &url, &out, hex))
        } else {
            ("sh", pipeline_command(img.comp, &url, &out))
        };
        let sample = measure(
            shell,
            &[OsStr::new("-c"), OsStr::new(&script)],
            Stdio::inherit(),
            &self.work,
            &script,
        );
        if check {
            check_files(
                &out.join(KERNEL_PATH),
                &out.join(INITRAMFS_PATH),
                &img.arm_files,
                "curl | tar",
            );
        }
        let _ = fs::remove_dir_all(&out);
        let _ = fs::remove_file(out.with_extension("sha256"));
        sample
    }

    /// The link alone: the top layer through `host` into /dev/null.
    fn run_link(&self, host: &str, img: &Pushed) -> Sample {
        let url = format!("http://{host}/v2/{}/blobs/{}", img.repo, img.arm_top.digest);
        measure(
            "curl",
            &[
                OsStr::new("-sf"),
                OsStr::new("-o"),
                OsStr::new("/dev/null"),
                OsStr::new(&url),
            ],
            Stdio::inherit(),
            &self.work,
            "curl -o /dev/null",
        )
    }

    /// (c) skopeo copy to a dir, then tar -x of the top layer.
    fn run_skopeo(&self, img: &Pushed, round: usize, check: bool) -> Sample {
        let dir = self
            .work
            .join(format!("c-{}-{round}", img.repo.replace('/', "_")));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        fs::create_dir_all(&out).unwrap();
        let script = skopeo_command(
            img.comp,
            &self.reference(img),
            &dir.join("image"),
            common::hex_of(&img.arm_top.digest),
            &out,
        );
        let sample = measure(
            "sh",
            &[OsStr::new("-c"), OsStr::new(&script)],
            Stdio::inherit(),
            &self.work,
            &script,
        );
        if check {
            check_files(
                &out.join(KERNEL_PATH),
                &out.join(INITRAMFS_PATH),
                &img.arm_files,
                "skopeo + tar",
            );
        }
        let _ = fs::remove_dir_all(&dir);
        sample
    }
}

fn pipeline_command(comp: Comp, url: &str, out: &Path) -> String {
    let out = out.display();
    match comp {
        Comp::Gzip => {
            format!("curl -sf {url} | tar -xzf - -C {out} {KERNEL_PATH} {INITRAMFS_PATH}")
        }
        Comp::Zstd => {
            format!("curl -sf {url} | zstd -dc | tar -xf - -C {out} {KERNEL_PATH} {INITRAMFS_PATH}")
        }
    }
}

/// (b2), for reference only: (b) plus a sha256 check of the blob (`openssl dgst`, SHA-NI) and an
/// fsync of the two files, i.e. part of what bootsync does (it also hashes the files it writes,
/// checks their formats, fsyncs directories and publishes atomically).
fn verified_pipeline_command(comp: Comp, url: &str, out: &Path, hex: &str) -> String {
    let out = out.display();
    let unpack = match comp {
        Comp::Gzip => format!("tar -xzf - -C {out} {KERNEL_PATH} {INITRAMFS_PATH}"),
        Comp::Zstd => format!("zstd -dc | tar -xf - -C {out} {KERNEL_PATH} {INITRAMFS_PATH}"),
    };
    format!(
        "set -eo pipefail; curl -sf {url} | tee >(openssl dgst -sha256 -r > {out}.sha256) | {unpack}; \
         wait $!; test \"$(cut -c1-64 {out}.sha256)\" = {hex}; \
         cd {out} && sync {KERNEL_PATH} {INITRAMFS_PATH}"
    )
}

fn skopeo_command(comp: Comp, reference: &str, image: &Path, top_hex: &str, out: &Path) -> String {
    format!(
        "skopeo copy -q --src-tls-verify=false --override-arch arm64 docker://{reference} dir:{image} \
         && tar {flag} -xf {image}/{top_hex} -C {out} {KERNEL_PATH} {INITRAMFS_PATH}",
        image = image.display(),
        out = out.display(),
        flag = comp.tar_flag(),
    )
}

fn first_line(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| format!("{cmd}: not found"))
}

fn git_revision() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The binary measured as (a): the bench-profile build (`target/release/bootsync`), or
/// `BOOTSYNC_BENCH_BIN` (to compare another build).
fn bootsync_bin() -> String {
    std::env::var("BOOTSYNC_BENCH_BIN").unwrap_or_else(|_| common::BIN.to_string())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench` (and maybe a filter): nothing to configure from them.
    let rounds: usize = env_or("BOOTSYNC_BENCH_ROUNDS", 5).max(1);
    let scale: f64 = env_or("BOOTSYNC_BENCH_SCALE", 1.0);
    let with_x4 = std::env::var("BOOTSYNC_BENCH_X4").map_or(true, |v| v != "0");
    let sizes = |factor: f64| Sizes {
        base: (150.0 * MB * scale * factor) as usize,
        kernel: (40.0 * MB * scale * factor) as usize,
        initramfs: Initramfs::Fake((90.0 * MB * scale * factor) as usize),
    };
    let total = Instant::now();

    let mut report = String::new();
    let _ = writeln!(report, "## Machine and tools\n");
    let _ = writeln!(
        report,
        "- date: {}",
        first_line("date", "-u").replace("  ", " ")
    );
    let _ = writeln!(
        report,
        "- cores: {}; load average at start: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    for (cmd, arg) in [
        ("curl", "--version"),
        ("skopeo", "--version"),
        ("tar", "--version"),
        ("zstd", "--version"),
        ("gzip", "--version"),
    ] {
        let _ = writeln!(report, "- {}", first_line(cmd, arg));
    }
    let _ = writeln!(
        report,
        "- bootsync: {} (source: {})",
        bootsync_bin(),
        git_revision()
    );
    let _ = writeln!(report, "- rounds: {rounds} (median), scale {scale}");
    eprintln!("{report}");

    let reg = Registry::start();
    let work = tempfile::Builder::new()
        .prefix("bootsync-bench-")
        .tempdir()
        .unwrap();
    let scratch = work.path().join("blobs");
    fs::create_dir_all(&scratch).unwrap();
    let bench = Bench {
        reg,
        work: work.path().to_path_buf(),
        rounds,
    };

    eprintln!("building and pushing the images ...");
    let images: Vec<Pushed> = [Comp::Gzip, Comp::Zstd]
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            build_and_push(
                &bench.reg,
                &scratch,
                &format!("bench/talos-{}", c.name()),
                c,
                &sizes(1.0),
                1000 * (i as u64 + 1),
            )
        })
        .collect();

    // Profiling aid: keep the registry with the 1x images up for a while and print configs.
    let serve: u64 = env_or("BOOTSYNC_BENCH_SERVE", 0);
    if serve > 0 {
        for img in &images {
            let dest = bench.work.join(format!("serve-{}", img.comp.name()));
            let cfg = Config::new().registry(&bench.reg.host()).target(
                TargetCfg::new("talos-arm64", &bench.reference(img), &dest)
                    .platform("linux/arm64")
                    .preset("talos-installer"),
            );
            let config = bench.work.join(format!("serve-{}.toml", img.comp.name()));
            fs::write(&config, cfg.render()).unwrap();
            eprintln!(
                "{} image: {} (top layer {}); rm -rf {} && {} --config {} sync --once",
                img.comp.name(),
                bench.reference(img),
                img.arm_top.digest,
                dest.display(),
                bootsync_bin(),
                config.display()
            );
        }
        eprintln!("serving for {serve} s (BOOTSYNC_BENCH_SERVE); Ctrl-C ends it");
        std::thread::sleep(std::time::Duration::from_secs(serve.min(3600)));
        return;
    }

    // Rounds interleave the methods, so background load hits all of them alike.
    let mut rows = Vec::new();
    for img in &images {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut c = Vec::new();
        let mut gets = BlobGets::default();
        // Warm-up (not counted): the page cache holds the blobs, the binaries are loaded.
        bench.run_pipeline(img, 0, true, false);
        bench.run_pipeline(img, 0, true, true);
        let mut b2 = Vec::new();
        for round in 0..bench.rounds {
            let before = BlobGets::of(&bench.reg, img);
            a.push(bench.run_bootsync(img, round, round == 0));
            gets.add(&BlobGets::of(&bench.reg, img), &before);
            b.push(bench.run_pipeline(img, round, false, false));
            b2.push(bench.run_pipeline(img, round, false, true));
            c.push(bench.run_skopeo(img, round, round == 0));
            eprintln!(
                "  {} round {round}: a {:.2}s/{:.2}s cpu/{} MB, b {:.2}s/{:.2}s cpu, c {:.2}s/{:.2}s cpu, b2 {:.2}s/{:.2}s cpu (load {})",
                img.comp.name(),
                a[round].wall,
                a[round].cpu,
                a[round].maxrss / 1024,
                b[round].wall,
                b[round].cpu,
                c[round].wall,
                c[round].cpu,
                b2[round].wall,
                b2[round].cpu,
                loadavg()
            );
        }
        rows.push((
            img,
            summarize(&a),
            summarize(&b),
            summarize(&c),
            gets,
            summarize(&b2),
        ));
    }

    let mut table = String::new();
    let _ = writeln!(table, "## Results (medians of {rounds} rounds)\n");
    let _ = writeln!(
        table,
        "| layers | method | wall s (min-max) | CPU s | peak RSS MB |\n| --- | --- | --- | --- | --- |"
    );
    for (img, a, b, c, _, b2) in &rows {
        for (name, s) in [
            ("(a) bootsync sync --once", a),
            ("(b) curl \\| tar", b),
            ("(c) skopeo copy + tar", c),
            ("(b2) = (b) + sha256 of the blob + fsync (reference)", b2),
        ] {
            let _ = writeln!(
                table,
                "| {} | {name} | {:.2} ({:.2}-{:.2}) | {:.2} | {:.1} |",
                img.comp.name(),
                s.wall,
                s.wall_min,
                s.wall_max,
                s.cpu,
                s.rss_mb
            );
        }
    }
    let _ = writeln!(
        table,
        "\n| layers | a/b wall | a/b CPU | a/c wall | a/c CPU | a/b2 wall | blob GETs by (a), {rounds} runs: base layers / top layer |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for (img, a, b, c, gets, b2) in &rows {
        let _ = writeln!(
            table,
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} / {} |",
            img.comp.name(),
            a.wall / b.wall,
            a.cpu / b.cpu,
            a.wall / c.wall,
            a.cpu / c.cpu,
            a.wall / b2.wall,
            gets.base,
            gets.top,
        );
    }
    report.push_str(&table);

    // Through a rate-capped link: a proxy in front of the registry shares one link speed
    // between all its response bodies. "After the last byte" is wall minus the link's own time
    // for the top layer (curl into /dev/null through the same proxy).
    let links: Vec<f64> = std::env::var("BOOTSYNC_BENCH_LINK")
        .unwrap_or_else(|_| "50,200".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .filter(|v: &f64| *v > 0.0)
        .collect();
    if !links.is_empty() {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\n## Through a rate-capped link (medians of {rounds} rounds)\n\n\
             | layers | link MB/s | method | wall s | CPU s | peak RSS MB | after the last byte s | bootsync's own: last byte to exit s | wall / (b)'s |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for &rate in &links {
            let proxy = common::proxy::Proxy::start(&bench.reg.host());
            proxy.set_rate(Some(rate * MB));
            let host = proxy.host();
            for img in &images {
                let (mut link, mut a, mut b, mut b2) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for round in 0..bench.rounds {
                    link.push(bench.run_link(&host, img));
                    a.push(bench.run_bootsync_via(&host, img, round, round == 0));
                    b.push(bench.run_pipeline_via(&host, img, round, round == 0, false));
                    b2.push(bench.run_pipeline_via(&host, img, round, false, true));
                    eprintln!(
                        "  {} at {rate} MB/s round {round}: link {:.2}s, a {:.2}s (its download {:.2}s, last byte to exit {:.3}s), b {:.2}s, b2 {:.2}s",
                        img.comp.name(),
                        link[round].wall,
                        a[round].wall,
                        a[round].download.unwrap_or(f64::NAN),
                        a[round].tail.unwrap_or(f64::NAN),
                        b[round].wall,
                        b2[round].wall
                    );
                }
                let (link, a, b, b2) = (
                    summarize(&link),
                    summarize(&a),
                    summarize(&b),
                    summarize(&b2),
                );
                for (name, s) in [
                    ("link alone (curl > /dev/null)", &link),
                    ("(a) bootsync", &a),
                    ("(b) curl \\| tar", &b),
                    ("(b2) = (b) + sha256 + fsync (reference)", &b2),
                ] {
                    let _ = writeln!(
                        t,
                        "| {} | {rate:.0} | {name} | {:.2} | {:.2} | {:.1} | {:.2} | {} | {:.2} |",
                        img.comp.name(),
                        s.wall,
                        s.cpu,
                        s.rss_mb,
                        s.wall - link.wall,
                        s.tail.map_or("".into(), |t| format!("{t:.3}")),
                        s.wall / b.wall
                    );
                }
            }
        }
        report.push_str(&t);
    }

    // A real xz initramfs (Talos <= 1.7), on the loopback: bootsync against the download plus
    // `xz -T0 -t` of the file, the least a verified pull of it can cost.
    if std::env::var("BOOTSYNC_BENCH_XZ").map_or(true, |v| v != "0") {
        eprintln!("building and pushing the xz initramfs image ...");
        let xz_path = xz_initramfs((320.0 * MB * scale) as u64);
        let xz = fs::read(&xz_path).unwrap();
        let xz_sizes = Sizes {
            base: (10.0 * MB * scale) as usize,
            kernel: (40.0 * MB * scale) as usize,
            initramfs: Initramfs::Bytes(&xz),
        };
        let img = build_and_push(
            &bench.reg,
            &scratch,
            "bench/talos-xz",
            Comp::Zstd,
            &xz_sizes,
            70_000,
        );
        let host = bench.reg.host();
        let (mut link, mut test, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let xz_arg = xz_path.as_os_str();
        for round in 0..bench.rounds {
            link.push(bench.run_link(&host, &img));
            test.push(measure(
                "xz",
                &[OsStr::new("-T0"), OsStr::new("-t"), xz_arg],
                Stdio::inherit(),
                &bench.work,
                "xz -T0 -t",
            ));
            a.push(bench.run_bootsync(&img, round, round == 0));
            b.push(bench.run_pipeline(&img, round, round == 0, false));
            eprintln!(
                "  xz round {round}: download {:.2}s, xz -T0 -t {:.2}s/{:.2}s cpu, a {:.2}s/{:.2}s cpu/{} MB, b {:.2}s",
                link[round].wall,
                test[round].wall,
                test[round].cpu,
                a[round].wall,
                a[round].cpu,
                a[round].maxrss / 1024,
                b[round].wall
            );
        }
        let (link, test, a, b) = (
            summarize(&link),
            summarize(&test),
            summarize(&a),
            summarize(&b),
        );
        let floor = link.wall + test.wall;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\n## A real xz initramfs ({:.0} MB xz cpio of /usr files, top layer {:.0} MB; medians of {rounds} rounds)\n\n\
             | method | wall s | CPU s | peak RSS MB | wall / (download + xz -T0 -t) |\n\
             | --- | --- | --- | --- | --- |",
            xz.len() as f64 / MB,
            img.arm_top.size as f64 / MB,
        );
        for (name, s) in [
            ("download alone (curl > /dev/null)", &link),
            ("xz -T0 -t of the initramfs", &test),
            ("(b) curl \\| zstd \\| tar (no check)", &b),
            ("(a) bootsync", &a),
        ] {
            let _ = writeln!(
                t,
                "| {name} | {:.2} | {:.2} | {:.1} | {:.2} |",
                s.wall,
                s.cpu,
                s.rss_mb,
                s.wall / floor
            );
        }
        report.push_str(&t);
    }

    if with_x4 {
        eprintln!("building and pushing the 4x images ...");
        let mut x4_rows = Vec::new();
        for (i, c) in [Comp::Gzip, Comp::Zstd].into_iter().enumerate() {
            let img = build_and_push(
                &bench.reg,
                &scratch,
                &format!("bench/talos-{}-x4", c.name()),
                c,
                &sizes(4.0),
                50_000 + 1000 * i as u64,
            );
            let mut a = Vec::new();
            let mut gets = BlobGets::default();
            for round in 0..bench.rounds {
                let before = BlobGets::of(&bench.reg, &img);
                a.push(bench.run_bootsync(&img, round, round == 0));
                gets.add(&BlobGets::of(&bench.reg, &img), &before);
                eprintln!(
                    "  {} x4 round {round}: a {:.2}s/{:.2}s cpu/{} MB",
                    c.name(),
                    a[round].wall,
                    a[round].cpu,
                    a[round].maxrss / 1024
                );
            }
            x4_rows.push((img, summarize(&a), gets));
        }
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\n## bootsync on a 4x image (4x base, 4x kernel and initramfs)\n\n\
             | layers | top layer MB | wall s | CPU s | peak RSS MB | RSS 1x MB | RSS delta MB | blob GETs: base / top |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for (img, s, gets) in &x4_rows {
            let one = rows
                .iter()
                .find(|r| r.0.comp == img.comp)
                .map(|r| r.1.rss_mb)
                .unwrap_or(0.0);
            let _ = writeln!(
                t,
                "| {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {:+.1} | {} / {} |",
                img.comp.name(),
                img.arm_top.size as f64 / MB,
                s.wall,
                s.cpu,
                s.rss_mb,
                one,
                s.rss_mb - one,
                gets.base,
                gets.top
            );
        }
        report.push_str(&t);
    }
    let _ = writeln!(
        report,
        "\nload average at end: {}; total bench time {:.0?}",
        loadavg(),
        total.elapsed()
    );
    println!("{report}");
}
