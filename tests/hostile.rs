//! Hostile networks and hostile images (part 2): tar entries that aim outside the staging
//! directory, links and device nodes at wanted paths, lying PAX sizes, decompression bombs,
//! layers whose media type lies, hostile manifests and indexes, and boot files that fail their
//! format checks.
//!
//! Every test first publishes a good version, then moves the tag to hostile images one after
//! the other and runs `bootsync sync --once` for each. A rejected input must exit 1 with an
//! error naming the target and the cause, leave the previous version serving byte for byte
//! (`current`, the stable links, `.bootsync.json`), leave no staging or temp debris, and write
//! nothing outside staging: the work directory (config, state, `dest` and its parent) must be
//! unchanged, and canaries the hostile entries aim at (`<work>/escape`, `/tmp/escape`,
//! `/etc/escape`, ...) must not exist. Cases are tallied and every test ends with a line
//! `hostile inputs: N tried, N rejected, 0 written outside staging` (see it with
//! `-- --nocapture`); a test fails only after all its cases ran, listing every problem.
//!
//! Hostile tars are written byte by byte (`tests/common/rawtar.rs`); hostile manifests are
//! served by the fault-injecting proxy's canned responses in front of a real registry
//! (`tests/common/rawimage.rs`). Run with `cargo test --test hostile`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

// The harness re-exports items that only other test binaries use.
#[allow(unused_imports)]
mod common;

use common::image::{
    index_json, BuiltImage, BuiltLayer, OCI_INDEX, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD,
    OCI_MANIFEST,
};
use common::proxy::{Fault, Proxy, Rule};
use common::rawimage::{manifest_json, raw_image, raw_layer, serve_manifest};
use common::rawtar::{self, kind, RawHeader, RawTar};
use common::*;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const REPO: &str = "talos/hostile";
const TAG: &str = "stable";
const TARGET: &str = "talos-arm64";
const KERNEL_SRC: &str = "assets/talos/arm64/vmlinuz";
const INITRD_SRC: &str = "assets/talos/arm64/initramfs.xz";
const KERNEL: &str = "vmlinuz-arm64";
const INITRD: &str = "initramfs-arm64.xz";
/// Small boot files (they must stay under the 1 MiB `max_file_size` of one test).
const KERNEL_LEN: usize = 200_000;
const INITRD_LEN: usize = 300_000;
/// Echoed raw, this name would end bootsync's error line and print a fake success line.
const FORGED_NAME: &[u8] = b"x\ntalos-arm64: published sha256:0000 (2 files)\x1b[1A\x1b[2K";
/// A bomb must be refused within this.
const BOMB_LIMIT: Duration = Duration::from_secs(20);

struct Boot {
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
}

fn boot(seed: u64) -> Boot {
    Boot {
        kernel: fake_kernel("arm64", seed * 2, KERNEL_LEN),
        initramfs: fake_initramfs(seed * 2 + 1, INITRD_LEN),
    }
}

/// A unique absolute path under /tmp that a hostile entry aims at (never created by the test).
fn tmp_canary(what: &str) -> String {
    format!("/tmp/bootsync-hostile-{}-{what}", std::process::id())
}

/// Absolute places a path-traversal bug would write to (besides anything under the work dir,
/// which is compared as a whole).
fn fixed_canaries() -> Vec<PathBuf> {
    [
        "/escape",
        "/pwned",
        "/tmp/escape",
        "/tmp/pwned",
        "/etc/escape",
        "/etc/pwned",
    ]
    .iter()
    .map(PathBuf::from)
    .collect()
}

// ---------------------------------------------------------------------------------------------
// Snapshots: what is served, the whole work dir, canaries
// ---------------------------------------------------------------------------------------------

/// What `dest` serves: `current`, every stable link with the bytes read through it, and the
/// current version's `.bootsync.json`, byte for byte.
#[derive(Debug, Clone, PartialEq)]
struct Serving {
    entries: BTreeSet<String>,
    current: String,
    links: BTreeMap<String, (String, String)>,
    meta: Vec<u8>,
    versions: BTreeSet<String>,
}

fn serving(dest: &Path) -> Result<Serving, String> {
    let entries = entries(dest);
    let current = fs::read_link(dest.join("current"))
        .map_err(|e| format!("{dest:?}/current: {e}"))?
        .to_string_lossy()
        .into_owned();
    let mut links = BTreeMap::new();
    for name in entries
        .iter()
        .filter(|n| *n != "current" && *n != "versions")
    {
        let p = dest.join(name);
        let target = fs::read_link(&p)
            .map_err(|e| format!("{p:?} is not a stable link: {e}"))?
            .to_string_lossy()
            .into_owned();
        let content = if p.is_dir() {
            format!("dir {:?}", tree(&p))
        } else {
            let data = fs::read(&p).map_err(|e| format!("read through {p:?}: {e}"))?;
            format!("{} bytes sha256 {}", data.len(), sha256_hex(&data))
        };
        links.insert(name.clone(), (target, content));
    }
    let meta_path = dest.join(&current).join(".bootsync.json");
    let meta = fs::read(&meta_path).map_err(|e| format!("read {meta_path:?}: {e}"))?;
    Ok(Serving {
        entries,
        current,
        links,
        meta,
        versions: versions(dest),
    })
}

/// Every path under `root` (relative) with what it is: `dir`, `link -> T`, `file N sha256`.
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue;
            };
            let ft = md.file_type();
            if ft.is_symlink() {
                let t = fs::read_link(&p).map(|t| t.to_string_lossy().into_owned());
                out.insert(rel, format!("link -> {}", t.unwrap_or_default()));
            } else if ft.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &p, out);
            } else if ft.is_file() {
                let h = fs::read(&p).map(|d| sha256_hex(&d)).unwrap_or_default();
                out.insert(rel, format!("file {} {h}", md.len()));
            } else {
                out.insert(rel, format!("special {:?}", ft));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// `(path, what)` lines that differ between two trees.
fn tree_diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in after {
        match before.get(k) {
            None => out.push(format!("new {k} ({v})")),
            Some(old) if old != v => out.push(format!("changed {k} ({old} -> {v})")),
            _ => {}
        }
    }
    for k in before.keys().filter(|k| !after.contains_key(*k)) {
        out.push(format!("removed {k}"));
    }
    out
}

/// Splits `tree_diff` lines into those under `dest_rel` (relative to the tree's root) and the
/// rest.
fn split_diff(diff: Vec<String>, dest_rel: &str) -> (Vec<String>, Vec<String>) {
    diff.into_iter().partition(|d| {
        let path = d.split_whitespace().nth(1).unwrap_or_default();
        path.starts_with(&format!("{dest_rel}/"))
    })
}

/// Size, mode and mtime of a sensitive file a hostile link aims at (never its content).
fn stat_line(p: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p).ok().map(|m| {
        format!(
            "{} {:o} {}.{}",
            m.len(),
            m.mode(),
            m.mtime(),
            m.mtime_nsec()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// The lab: a registry (optionally behind the proxy), a work dir, one target, and a tally
// ---------------------------------------------------------------------------------------------

/// What a case must do.
enum Expect<'a> {
    /// Exit 1; stderr names the target and, for each group, at least one of its words.
    Reject(&'a [&'a [&'a str]]),
    /// Exit 0, publishing a new version (checked further by the caller).
    Accept,
    /// Whatever bootsync decides, as long as it is safe; the behaviour is reported.
    Observe,
}

#[derive(Default)]
struct Tally {
    tried: usize,
    rejected: usize,
    accepted: usize,
    observed: usize,
    outside: usize,
    lines: Vec<String>,
    problems: Vec<String>,
}

struct Opts {
    proxy: bool,
    extra_top: &'static str,
    /// Copy `assets/talos/arm64` as a directory instead of the two files.
    dir_target: bool,
}

const DEFAULT_OPTS: Opts = Opts {
    proxy: false,
    extra_top: "",
    dir_target: false,
};

struct Lab {
    name: &'static str,
    // Dropped in this order: proxy before the registry behind it.
    proxy: Option<Proxy>,
    reg: Registry,
    work: Work,
    dest: PathBuf,
    config: PathBuf,
    reference: String,
    base: BuiltLayer,
    canaries: Vec<PathBuf>,
    preexisting: BTreeSet<PathBuf>,
    sensitive: Vec<(PathBuf, Option<String>)>,
    tally: Tally,
    /// How long the last `sync --once` took.
    last_elapsed: Duration,
}

impl Lab {
    fn new(name: &'static str) -> Lab {
        Lab::with(name, DEFAULT_OPTS)
    }

    fn with(name: &'static str, opts: Opts) -> Lab {
        let reg = Registry::start();
        let proxy = opts.proxy.then(|| Proxy::start(&reg.host()));
        let host = proxy.as_ref().map_or_else(|| reg.host(), |p| p.host());
        let reference = format!("{host}/{REPO}:{TAG}");
        let work = Work::new();
        let dest = work.dest("talos");
        let mut target = TargetCfg::new(TARGET, &reference, &dest).platform("linux/arm64");
        target = if opts.dir_target {
            target.dir("assets/talos/arm64", "arm64")
        } else {
            target.file(KERNEL_SRC, KERNEL).file(INITRD_SRC, INITRD)
        };
        let mut cfg = Config::new().registry(&host).target(target);
        if !opts.extra_top.is_empty() {
            cfg = cfg.extra_top(opts.extra_top);
        }
        let config = work.config(&cfg);
        let base = Layer::gzip()
            .file("etc/os-release", "ID=talos\nVERSION_ID=v1.10\n")
            .file("usr/lib/libfiller.so", bytes(4242, 50_000))
            .build(Format::Oci);
        let canaries = fixed_canaries();
        let preexisting = canaries
            .iter()
            .filter(|c| fs::symlink_metadata(c).is_ok())
            .cloned()
            .collect();
        let sensitive = ["/etc/shadow"]
            .iter()
            .map(|p| (PathBuf::from(p), stat_line(Path::new(p))))
            .collect();
        Lab {
            name,
            proxy,
            reg,
            work,
            dest,
            config,
            reference,
            base,
            canaries,
            preexisting,
            sensitive,
            tally: Tally::default(),
            last_elapsed: Duration::ZERO,
        }
    }

    fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("this lab has no proxy")
    }

    /// Pushes `b` as a two-layer image (base + boot files) at the tag and syncs it: it must be
    /// published. Returns the image.
    fn publish_good(&mut self, seed: u64, b: &Boot) -> BuiltImage {
        let top = Layer::gzip()
            .file(KERNEL_SRC, b.kernel.clone())
            .file(INITRD_SRC, b.initramfs.clone());
        let img = Image::oci("arm64")
            .label(&format!("good-{seed}"))
            .layer(Layer::gzip().file("etc/os-release", format!("VERSION_ID=v1.{seed}\n")))
            .layer(top);
        let built = self.reg.push_image(REPO, &img, Some(TAG));
        let out = self.work.sync_once(&self.config);
        out.assert_success();
        self.assert_published(&built, b);
        built
    }

    /// `img` with kernel `b` is current, byte for byte, and dest holds nothing else.
    #[track_caller]
    fn assert_published(&self, img: &BuiltImage, b: &Boot) {
        assert_current(
            &self.dest,
            &Published {
                target: TARGET,
                reference: &self.reference,
                platform: "linux/arm64",
                digest: &img.digest,
                tag_digest: &img.digest,
                files: &[
                    Want {
                        name: KERNEL,
                        source: KERNEL_SRC,
                        data: &b.kernel,
                    },
                    Want {
                        name: INITRD,
                        source: INITRD_SRC,
                        data: &b.initramfs,
                    },
                ],
            },
        );
    }

    /// An image of the base layer and `top` (bottom first), pushed at the tag.
    fn push_layers(&self, label: &str, layers: Vec<BuiltLayer>) -> BuiltImage {
        let mut all = vec![self.base.clone()];
        all.extend(layers);
        let img = raw_image("arm64", label, all);
        self.reg.push_built(REPO, &img, Some(TAG));
        img
    }

    /// The base layer and one gzip layer holding the raw tar `tar`, pushed at the tag.
    fn push_tar(&self, label: &str, tar: Vec<u8>) -> BuiltImage {
        self.push_layers(label, vec![gzip_layer(tar)])
    }

    fn add_canary(&mut self, p: impl Into<PathBuf>) {
        let p = p.into();
        if fs::symlink_metadata(&p).is_ok() {
            self.preexisting.insert(p.clone());
        }
        self.canaries.push(p);
    }

    /// Runs `sync --once` and checks the outcome against `expect` and every safety property;
    /// problems are collected, not raised, so every case runs.
    fn case(&mut self, name: &str, expect: Expect) -> Outcome {
        let before_tree = tree(self.work.path());
        let before_serving = serving(&self.dest);
        let started = Instant::now();
        let out = self.work.sync_once(&self.config);
        let elapsed = started.elapsed();
        self.last_elapsed = elapsed;
        if let Some(p) = &self.proxy {
            p.wait_idle(Duration::from_secs(10));
        }
        let mut problems = Vec::new();
        let mut outside = Vec::new();

        // Nothing outside staging: canaries, sensitive files, the work dir outside dest.
        for c in &self.canaries {
            if !self.preexisting.contains(c) && fs::symlink_metadata(c).is_ok() {
                outside.push(format!("{c:?} exists"));
            }
        }
        for (p, before) in &self.sensitive {
            if &stat_line(p) != before {
                outside.push(format!("{p:?} changed"));
            }
        }
        let after_tree = tree(self.work.path());
        let dest_rel = self
            .dest
            .strip_prefix(self.work.path())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let (in_dest, not_in_dest) = split_diff(tree_diff(&before_tree, &after_tree), &dest_rel);
        outside.extend(not_in_dest);

        // No debris, and dest holds only current, the stable links and versions/.
        let debris: Vec<String> = after_tree
            .keys()
            .filter(|k| k.contains(".staging-") || k.contains(".tmp-"))
            .cloned()
            .collect();
        if !debris.is_empty() {
            problems.push(format!("debris left: {debris:?}"));
        }

        let stderr = out.stderr.to_lowercase();
        if stderr.contains("panicked") || out.code == Some(101) {
            problems.push("bootsync panicked".into());
        }
        let verdict = match expect {
            Expect::Reject(groups) => {
                self.tally.tried += 1;
                if out.code != Some(1) {
                    problems.push(format!("exit {:?}, want 1", out.code));
                } else {
                    self.tally.rejected += 1;
                }
                match error_cause(&out.stderr) {
                    None => problems.push(format!(
                        "no `error: target {TARGET} (...): <cause>` on stderr"
                    )),
                    Some(cause) => {
                        let lower = cause.to_lowercase();
                        for g in groups {
                            if !g.iter().any(|w| lower.contains(&w.to_lowercase())) {
                                problems.push(format!("the error's cause mentions none of {g:?}"));
                            }
                        }
                        if cause.chars().any(|c| c.is_control()) {
                            problems.push(format!(
                                "the error carries control characters from the hostile input: {cause:?}"
                            ));
                        }
                    }
                }
                if !in_dest.is_empty() {
                    problems.push(format!("dest changed: {in_dest:?}"));
                }
                match (&before_serving, serving(&self.dest)) {
                    (Ok(b), Ok(a)) if *b == a => {}
                    (Ok(b), Ok(a)) => problems.push(format!(
                        "previous version no longer served as it was: before {b:?}, after {a:?}"
                    )),
                    (_, Err(e)) => problems.push(format!("previous version not serving: {e}")),
                    (Err(e), _) => problems.push(format!("nothing served before the case: {e}")),
                }
                match out.code {
                    Some(1) => "rejected",
                    Some(101) => "CRASHED",
                    _ => "NOT REJECTED",
                }
            }
            Expect::Accept => {
                if out.code != Some(0) {
                    problems.push(format!("exit {:?}, want 0", out.code));
                } else {
                    self.tally.accepted += 1;
                }
                if out.code == Some(0) {
                    "accepted"
                } else {
                    "NOT ACCEPTED"
                }
            }
            Expect::Observe => {
                self.tally.observed += 1;
                if !matches!(out.code, Some(0) | Some(1)) {
                    problems.push(format!("exit {:?}, want 0 or 1", out.code));
                }
                if out.code == Some(1) && before_serving != serving(&self.dest) {
                    problems.push("failed, and the previous version is no longer served".into());
                }
                if out.code == Some(1) && !in_dest.is_empty() {
                    problems.push(format!("failed, yet dest changed: {in_dest:?}"));
                }
                match out.code {
                    Some(0) => "published",
                    Some(1) => "refused",
                    _ => "CRASHED",
                }
            }
        };
        if let Err(e) = self.dest_layout() {
            problems.push(e);
        }
        if !outside.is_empty() {
            self.tally.outside += 1;
            problems.push(format!("WRITTEN OUTSIDE STAGING: {outside:?}"));
        }
        let said = out
            .stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("error:"))
            .or_else(|| out.stdout.lines().next())
            .unwrap_or("<nothing>");
        self.tally.lines.push(format!(
            "  [{verdict}] {name}: exit {:?} in {elapsed:.1?}: {said}",
            out.code
        ));
        for p in problems {
            self.tally
                .problems
                .push(format!("{name}: {p}\n{}", out.describe()));
        }
        out
    }

    /// `dest` holds only `current`, the stable links and `versions/` (no debris).
    fn dest_layout(&self) -> Result<(), String> {
        let s = serving(&self.dest)?;
        for e in &s.entries {
            if e != "current" && e != "versions" && !s.links.contains_key(e) {
                return Err(format!("unexpected entry {e:?} in dest"));
            }
        }
        let cur = s.current.strip_prefix("versions/").unwrap_or_default();
        if !s.versions.contains(cur) {
            return Err(format!("current -> {} is not a version", s.current));
        }
        Ok(())
    }

    /// Adds `text` to the report line of the last case.
    fn note(&mut self, text: &str) {
        if let Some(l) = self.tally.lines.last_mut() {
            l.push_str("\n      -> ");
            l.push_str(text);
        }
    }

    /// What the kernel link serves now: `which` if it is one of `candidates`' kernels.
    fn served_kernel(&self, candidates: &[(&str, &Boot)]) -> String {
        match fs::read(self.dest.join(KERNEL)) {
            Ok(k) => candidates.iter().find(|(_, b)| b.kernel == k).map_or_else(
                || format!("an unknown {} byte kernel", k.len()),
                |(n, _)| n.to_string(),
            ),
            Err(e) => format!("nothing ({e})"),
        }
    }

    fn reject(&mut self, name: &str, cause: &[&[&str]]) -> Outcome {
        self.case(name, Expect::Reject(cause))
    }

    /// Prints the tally and fails with every problem found.
    fn finish(self) {
        let t = &self.tally;
        let mut s = format!("{}:\n", self.name);
        for l in &t.lines {
            let _ = writeln!(s, "{l}");
        }
        let _ = write!(
            s,
            "hostile inputs: {} tried, {} rejected, {} written outside staging",
            t.tried, t.rejected, t.outside
        );
        if t.accepted + t.observed > 0 {
            let _ = write!(
                s,
                " (and {} odd but legitimate inputs accepted, {} behaviours observed)",
                t.accepted, t.observed
            );
        }
        println!("{s}");
        assert!(
            t.problems.is_empty(),
            "{}\n\n{} problem(s):\n{}",
            s,
            t.problems.len(),
            t.problems.join("\n\n")
        );
        assert_eq!(t.tried, t.rejected);
        assert_eq!(t.outside, 0);
    }
}

/// The cause in bootsync's last `error: target NAME (REFERENCE, PLATFORM): CAUSE` report (to the
/// end of stderr, so a cause that spans lines is seen whole).
fn error_cause(stderr: &str) -> Option<&str> {
    let head = format!("error: target {TARGET} (");
    let at = stderr.rfind(&head)?;
    let rest = &stderr[at + head.len()..];
    let (_, cause) = rest.split_once("): ")?;
    Some(cause.trim_end())
}

fn gzip_layer(tar: Vec<u8>) -> BuiltLayer {
    let blob = rawtar::gzip(&tar);
    raw_layer(blob, &tar, OCI_LAYER_GZIP)
}

// ---------------------------------------------------------------------------------------------
// 1. Paths that aim outside
// ---------------------------------------------------------------------------------------------

#[test]
fn tar_paths_that_escape_are_never_written() {
    let mut lab = Lab::new("tar paths");
    let tmp_escape = tmp_canary("abs");
    lab.add_canary(&tmp_escape);
    let good = boot(1);
    lab.publish_good(1, &good);
    let evil = boot(2);

    // Each hostile name stands in for the kernel; the initramfs is a good regular file.
    let cases: [(&str, String); 6] = [
        ("`../../escape`", "../../escape".into()),
        (
            "`assets/talos/../../../escape`",
            "assets/talos/../../../escape".into(),
        ),
        (
            "`..` that lexically normalises to the wanted path",
            "assets/talos/arm64/../arm64/vmlinuz".into(),
        ),
        ("absolute `/etc/escape`", "/etc/escape".into()),
        ("absolute path under /tmp", tmp_escape.clone()),
        (
            "deep `../` x12 to /tmp/escape",
            format!("{}tmp/escape", "../".repeat(12)),
        ),
    ];
    for (i, (name, path)) in cases.iter().enumerate() {
        let tar = RawTar::new()
            .dir("../../evil-dir/")
            .file(INITRD_SRC, &evil.initramfs)
            .file(path.as_bytes(), &evil.kernel)
            .finish();
        lab.push_tar(&format!("paths-{i}"), tar);
        lab.reject(
            &format!("kernel only as {name}"),
            &[&[KERNEL_SRC], &["not found"]],
        );
    }

    // Leading `/` and `./` are ordinary spellings of the wanted paths: accepted, while every
    // hostile entry beside them is skipped.
    let tar = RawTar::new()
        .file("../../escape", b"escape")
        .file("assets/talos/../../../escape", b"escape")
        .file("/etc/escape", b"escape")
        .file(tmp_escape.as_bytes(), b"escape")
        .file(format!("{}tmp/escape", "../".repeat(12)), b"escape")
        .file(format!("/{KERNEL_SRC}"), &evil.kernel)
        .file(format!("./{INITRD_SRC}"), &evil.initramfs)
        .finish();
    let img = lab.push_tar("leading-slash", tar);
    lab.case(
        "`/assets/talos/arm64/vmlinuz` and `./assets/...` beside escaping entries",
        Expect::Accept,
    );
    lab.assert_published(&img, &evil);
    lab.finish();
}

// ---------------------------------------------------------------------------------------------
// 2. Links at wanted paths, symlinked directories on the way
// ---------------------------------------------------------------------------------------------

#[test]
fn links_at_wanted_paths_are_refused() {
    let mut lab = Lab::new("links");
    let dir_canary = tmp_canary("dir");
    lab.add_canary(&dir_canary);
    lab.add_canary(format!("{dir_canary}/arm64"));
    let good = boot(3);
    lab.publish_good(3, &good);
    let evil = boot(4);

    // Links are resolved inside the image root: these lead to nothing in the image.
    let links: [(&str, u8, &str); 4] = [
        ("symlink -> /etc/shadow", kind::SYMLINK, "/etc/shadow"),
        (
            "symlink -> ../../../escape",
            kind::SYMLINK,
            "../../../escape",
        ),
        (
            "hardlink -> ../../../escape",
            kind::HARDLINK,
            "../../../escape",
        ),
        ("hardlink -> /etc/shadow", kind::HARDLINK, "/etc/shadow"),
    ];
    for (i, (name, typeflag, target)) in links.iter().enumerate() {
        let tar = RawTar::new()
            .file("usr/lib/vmlinuz.real", &evil.kernel)
            .file(INITRD_SRC, &evil.initramfs)
            .entry(&RawHeader::new(*typeflag, KERNEL_SRC, 0).link(target), &[])
            .finish();
        lab.push_tar(&format!("link-{i}"), tar);
        lab.reject(
            &format!("kernel is a {name}"),
            &[
                &[KERNEL_SRC],
                &["link"],
                &["not in the image", "outside the image"],
            ],
        );
    }
    // A hard link to a regular file of the same layer is an ordinary file in the image
    // (`ln` in a build step): published with its target's content.
    let linked = boot(44);
    let tar = RawTar::new()
        .file("usr/lib/vmlinuz.real", &linked.kernel)
        .file(INITRD_SRC, &linked.initramfs)
        .entry(
            &RawHeader::new(kind::HARDLINK, KERNEL_SRC, 0).link("usr/lib/vmlinuz.real"),
            &[],
        )
        .finish();
    lab.push_tar("link-regular", tar);
    lab.case(
        "kernel is a hardlink -> a regular file in the same layer",
        Expect::Accept,
    );
    assert_eq!(
        lab.served_kernel(&[("the link target's", &linked)]),
        "the link target's"
    );
    // The same at the initramfs, after a good kernel.
    let tar = RawTar::new()
        .file(KERNEL_SRC, &evil.kernel)
        .symlink(INITRD_SRC, "/etc/shadow")
        .finish();
    lab.push_tar("link-initrd", tar);
    lab.reject(
        "initramfs is a symlink -> /etc/shadow",
        &[&[INITRD_SRC], &["symlink"], &["not in the image"]],
    );

    // A symlinked directory on the wanted path, in a lower layer; the files under it in the upper
    // one. An extractor that follows links would write to the link's target.
    let files = |b: &Boot| {
        RawTar::new()
            .file(KERNEL_SRC, &b.kernel)
            .file(INITRD_SRC, &b.initramfs)
            .finish()
    };
    let link = RawTar::new()
        .dir("assets/")
        .symlink("assets/talos", &dir_canary)
        .finish();
    let (a, b, c) = (boot(41), boot(42), boot(43));
    let candidates = [("the previous version's", &good), ("the image's files", &a)];
    lab.push_layers(
        "symdir-lower",
        vec![gzip_layer(link.clone()), gzip_layer(files(&a))],
    );
    lab.case(
        "`assets/talos -> /tmp/...` in a lower layer, files under it in the upper",
        Expect::Observe,
    );
    let served = lab.served_kernel(&candidates);
    lab.note(&format!(
        "serves {served} kernel; nothing created at the link target"
    ));

    // The other way round: the upper layer replaces the directory with a link, so in the image's
    // filesystem the lower files are not at the wanted paths any more (they would be under
    // the link's target, outside the image).
    lab.push_layers(
        "symdir-upper",
        vec![gzip_layer(files(&b)), gzip_layer(link.clone())],
    );
    lab.case(
        "files in a lower layer, `assets/talos -> /tmp/...` in the upper",
        Expect::Observe,
    );
    let served = lab.served_kernel(&[("the lower layer's (hidden in the image)", &b)]);
    lab.note(&format!("serves {served} kernel"));

    // Link and files in one layer, link first.
    let tar = RawTar::new()
        .dir("assets/")
        .dir("assets/talos/")
        .symlink("assets/talos/arm64", &dir_canary)
        .file(KERNEL_SRC, &c.kernel)
        .file(INITRD_SRC, &c.initramfs)
        .finish();
    lab.push_tar("symdir-same", tar);
    lab.case(
        "`assets/talos/arm64 -> /tmp/...` then files under it, one layer",
        Expect::Observe,
    );
    let served = lab.served_kernel(&[("the image's files", &c)]);
    lab.note(&format!(
        "serves {served} kernel; nothing created at the link target"
    ));
    lab.finish();
}

#[test]
fn links_inside_a_copied_directory_are_refused() {
    let mut lab = Lab::with(
        "links in a source_dir",
        Opts {
            dir_target: true,
            ..DEFAULT_OPTS
        },
    );
    let good = boot(5);
    let top = Layer::gzip()
        .file(KERNEL_SRC, good.kernel.clone())
        .file(INITRD_SRC, good.initramfs.clone())
        .file("assets/talos/arm64/extra/readme.txt", "hello");
    let img = Image::oci("arm64").label("dir-good").layer(top);
    lab.reg.push_image(REPO, &img, Some(TAG));
    lab.work.sync_once(&lab.config).assert_success();
    assert_eq!(
        fs::read(lab.dest.join("arm64").join("vmlinuz")).unwrap(),
        good.kernel
    );
    let evil = boot(6);
    let cases: [(&str, RawTar); 4] = [
        (
            "symlink -> /etc/shadow inside the directory",
            RawTar::new().symlink("assets/talos/arm64/shadow", "/etc/shadow"),
        ),
        (
            "symlinked subdirectory -> ../../../../",
            RawTar::new().symlink("assets/talos/arm64/up", "../../../../"),
        ),
        (
            "hardlink -> ../../../escape inside the directory",
            RawTar::new().hardlink("assets/talos/arm64/escape", "../../../escape"),
        ),
        (
            "FIFO inside the directory",
            RawTar::new().fifo("assets/talos/arm64/fifo"),
        ),
    ];
    for (i, (name, t)) in cases.into_iter().enumerate() {
        let tar = t
            .file(KERNEL_SRC, &evil.kernel)
            .file(INITRD_SRC, &evil.initramfs)
            .file("assets/talos/arm64/up/escape", b"through the link?")
            .file("assets/talos/arm64/sub/../../../../escape", b"escape")
            .finish();
        lab.push_tar(&format!("dir-{i}"), tar);
        lab.reject(name, &[&["assets/talos/arm64/"], &["regular file"]]);
    }
    lab.finish();
}

// ---------------------------------------------------------------------------------------------
// 3. Device nodes and FIFOs
// ---------------------------------------------------------------------------------------------

#[test]
fn device_nodes_and_fifos_are_refused() {
    let mut lab = Lab::new("devices");
    let good = boot(7);
    lab.publish_good(7, &good);
    let evil = boot(8);
    let nodes: [(&str, RawTar, &str); 4] = [
        (
            "kernel is a char device (1,3: /dev/null)",
            RawTar::new().device(kind::CHAR, KERNEL_SRC, 1, 3),
            KERNEL_SRC,
        ),
        (
            "kernel is a block device (8,0: /dev/sda)",
            RawTar::new().device(kind::BLOCK, KERNEL_SRC, 8, 0),
            KERNEL_SRC,
        ),
        (
            "kernel is a FIFO",
            RawTar::new().fifo(KERNEL_SRC),
            KERNEL_SRC,
        ),
        (
            "initramfs is a char device (1,5: /dev/zero)",
            RawTar::new().device(kind::CHAR, INITRD_SRC, 1, 5),
            INITRD_SRC,
        ),
    ];
    for (i, (name, t, path)) in nodes.into_iter().enumerate() {
        let t = if path == KERNEL_SRC {
            t.file(INITRD_SRC, &evil.initramfs)
        } else {
            t.file(KERNEL_SRC, &evil.kernel)
        };
        lab.push_tar(&format!("dev-{i}"), t.finish());
        lab.reject(
            name,
            &[&[path], &["char", "block", "fifo"], &["regular file"]],
        );
    }
    lab.finish();
}

// ---------------------------------------------------------------------------------------------
// 4. PAX headers that lie, GNU long names that escape
// ---------------------------------------------------------------------------------------------

#[test]
fn pax_size_lies_and_gnu_long_names_are_refused() {
    let mut lab = Lab::new("pax and gnu headers");
    let good = boot(9);
    lab.publish_good(9, &good);
    let evil = boot(10);
    let k = &evil.kernel;
    let pax_size = |n: u64| n.to_string().into_bytes();

    // PAX size larger than the data: the entry runs past the end of the archive.
    let tar = RawTar::new()
        .file(INITRD_SRC, &evil.initramfs)
        .pax(&[("size", &pax_size(k.len() as u64 + 1_000_000))])
        .file(KERNEL_SRC, k)
        .finish();
    lab.push_tar("pax-larger", tar);
    lab.reject(
        "PAX size= 1 MB larger than the kernel's data",
        &[&["eof", "truncated", "end of"]],
    );

    // PAX size larger than the data, swallowing the next entry (the initramfs) whole.
    let swallowed = 512 + evil.initramfs.len().next_multiple_of(512);
    let tar = RawTar::new()
        .pax(&[(
            "size",
            &pax_size((k.len().next_multiple_of(512) + swallowed) as u64),
        )])
        .file(KERNEL_SRC, k)
        .file(INITRD_SRC, &evil.initramfs)
        .finish();
    lab.push_tar("pax-swallow", tar);
    lab.reject(
        "PAX size= swallows the next entry",
        &[&[INITRD_SRC, KERNEL], &["not found", "kernel", "initramfs"]],
    );

    // PAX size smaller than the data: the reader looks for the next header inside the kernel.
    let tar = RawTar::new()
        .file(INITRD_SRC, &evil.initramfs)
        .pax(&[("size", &pax_size(1000))])
        .file(KERNEL_SRC, k)
        .finish();
    lab.push_tar("pax-smaller", tar);
    lab.reject(
        "PAX size=1000, smaller than the kernel's data",
        &[&[KERNEL], &["kernel", "zboot", "payload"]],
    );

    // PAX size 0 on an innocent file whose real data hides a tar header for the kernel
    // (parser-differential smuggling).
    let hidden = RawTar::new().file(KERNEL_SRC, k).unterminated();
    let tar = RawTar::new()
        .file(INITRD_SRC, &evil.initramfs)
        .pax(&[("size", b"0")])
        .entry(
            &RawHeader::new(kind::REGULAR, "usr/share/doc/readme", hidden.len() as u64),
            &hidden,
        )
        .finish();
    lab.push_tar("pax-smuggle", tar);
    lab.case(
        "PAX size=0 hides a kernel entry inside another file's data",
        Expect::Observe,
    );
    let served = lab.served_kernel(&[("the previous", &good), ("the hidden", &evil)]);
    lab.note(&format!(
        "serves {served} kernel (PAX size wins, as in GNU tar and Go's archive/tar)"
    ));

    // PAX size far beyond max_file_size (4 GiB by default), with little data.
    let tar = RawTar::new()
        .file(INITRD_SRC, &evil.initramfs)
        .pax(&[("size", &pax_size(1 << 50))])
        .file(KERNEL_SRC, k)
        .finish();
    lab.push_tar("pax-huge", tar);
    lab.reject(
        "PAX size=2^50",
        &[&[KERNEL_SRC], &["max_file_size", "larger"]],
    );

    // PAX path pointing outside, over a ustar name that is the wanted path.
    let tar = RawTar::new()
        .file(INITRD_SRC, &evil.initramfs)
        .pax(&[("path", b"../../escape")])
        .file(KERNEL_SRC, k)
        .finish();
    lab.push_tar("pax-path", tar);
    lab.reject(
        "PAX path=../../escape over the kernel's ustar name",
        &[&[KERNEL_SRC], &["not found"]],
    );

    // GNU long name pointing outside, over a header whose own name is the wanted path.
    let long = format!("{}escape", "../".repeat(40));
    let tar = RawTar::new()
        .file(INITRD_SRC, &evil.initramfs)
        .gnu_longname(&long)
        .entry(
            &RawHeader::new(kind::REGULAR, KERNEL_SRC, k.len() as u64).gnu(),
            k,
        )
        .finish();
    lab.push_tar("gnu-longname", tar);
    lab.reject(
        "GNU long name ../ x40 escape over the kernel's header",
        &[&[KERNEL_SRC], &["not found"]],
    );

    // GNU long link: a symlink at the kernel path whose long target points outside.
    let tar = RawTar::new()
        .file(INITRD_SRC, &evil.initramfs)
        .gnu_longlink(format!("/{}/etc/shadow", "./".repeat(60)))
        .entry(
            &RawHeader::new(kind::SYMLINK, KERNEL_SRC, 0)
                .link("placeholder")
                .gnu(),
            &[],
        )
        .finish();
    lab.push_tar("gnu-longlink", tar);
    lab.reject(
        "GNU long link: kernel is a symlink to /././.../etc/shadow",
        &[&[KERNEL_SRC], &["symlink"]],
    );

    lab.finish();
}

// ---------------------------------------------------------------------------------------------
// 5. Decompression bombs, files over max_file_size
// ---------------------------------------------------------------------------------------------

#[test]
fn decompression_bombs_fail_fast() {
    let mut lab = Lab::new("bombs");
    let good = boot(11);
    lab.publish_good(11, &good);

    // gzip: 32 members of 32 MiB zeros (deflate's limit is ~1032:1), the kernel path holding
    // 1 GiB of zeros.
    let blob = rawtar::gzip_bomb(KERNEL_SRC, 32);
    let compressed = blob.len();
    let header = rawtar::bomb_header(KERNEL_SRC, 32 << 25);
    lab.push_layers("gzip-bomb", vec![raw_layer(blob, &header, OCI_LAYER_GZIP)]);
    lab.reject(
        &format!("gzip bomb: {compressed} bytes -> 1 GiB at the kernel path"),
        &[&["bomb", "compression ratio", "max_compression_ratio"]],
    );
    let gzip_time = lab.last_elapsed;

    // zstd: one frame of RLE blocks, 8 GiB of zeros in an unwanted file.
    let blocks = 8u64 << 13; // 8 GiB / 128 KiB
    let blob = rawtar::zstd_bomb("usr/share/zeros.img", blocks);
    let compressed = blob.len();
    let header = rawtar::bomb_header("usr/share/zeros.img", blocks << 17);
    lab.push_layers("zstd-bomb", vec![raw_layer(blob, &header, OCI_LAYER_ZSTD)]);
    lab.reject(
        &format!("zstd bomb: {compressed} bytes -> 8 GiB in an unwanted file"),
        &[&["bomb", "compression ratio", "max_compression_ratio"]],
    );
    let zstd_time = lab.last_elapsed;
    for (what, t) in [("gzip", gzip_time), ("zstd", zstd_time)] {
        if t >= BOMB_LIMIT {
            lab.tally
                .problems
                .push(format!("{what} bomb took {t:?} (limit {BOMB_LIMIT:?})"));
        }
    }
    lab.finish();
}

#[test]
fn files_over_max_file_size_are_refused() {
    let mut lab = Lab::with(
        "max_file_size",
        Opts {
            extra_top: "max_file_size = \"1MiB\"",
            ..DEFAULT_OPTS
        },
    );
    let good = boot(12);
    lab.publish_good(12, &good);
    let big = fake_kernel("arm64", 99, 1_500_000);
    let initrd = fake_initramfs(98, INITRD_LEN);
    let tar = RawTar::new()
        .file(INITRD_SRC, &initrd)
        .file(KERNEL_SRC, &big)
        .finish();
    lab.push_tar("big-kernel", tar);
    lab.reject(
        &format!(
            "a valid {} byte kernel over max_file_size = 1MiB",
            big.len()
        ),
        &[
            &[KERNEL_SRC],
            &["max_file_size"],
            &["1048576", "1 mib", "1mib"],
        ],
    );
    // A header declaring 1 TiB (GNU base-256 size) with almost no data behind it.
    let tar = RawTar::new()
        .file(KERNEL_SRC, &good.kernel)
        .entry(
            &RawHeader::new(kind::REGULAR, INITRD_SRC, 1 << 40).gnu(),
            b"tiny",
        )
        .finish();
    lab.push_tar("declared-1tib", tar);
    lab.reject(
        "an initramfs header declaring 1 TiB (base-256 size)",
        &[&[INITRD_SRC], &["max_file_size"]],
    );
    lab.finish();
}

// ---------------------------------------------------------------------------------------------
// 6. Layer media types that lie
// ---------------------------------------------------------------------------------------------

#[test]
fn layer_media_types_that_lie_are_refused() {
    let mut lab = Lab::new("media types");
    let good = boot(13);
    lab.publish_good(13, &good);
    let evil = boot(14);
    let tar = RawTar::new()
        .file(KERNEL_SRC, &evil.kernel)
        .file(INITRD_SRC, &evil.initramfs)
        .finish();
    type Lie<'a> = (&'a str, Vec<u8>, &'static str, &'a [&'a [&'a str]]);
    let cases: [Lie; 5] = [
        (
            "says tar+gzip, is zstd",
            rawtar::zstd(&tar),
            OCI_LAYER_GZIP,
            &[&["gzip"]],
        ),
        (
            "says tar, is gzip",
            rawtar::gzip(&tar),
            OCI_LAYER_TAR,
            &[&["tar", "archive", "header", "gzip"]],
        ),
        (
            "says tar+zstd, is gzip",
            rawtar::gzip(&tar),
            OCI_LAYER_ZSTD,
            &[&["zstd", "frame", "unknown"]],
        ),
        (
            "says tar+gzip, is a plain tar",
            tar.clone(),
            OCI_LAYER_GZIP,
            &[&["gzip"]],
        ),
        (
            "an unknown media type (tar+bzip2)",
            rawtar::gzip(&tar),
            "application/vnd.oci.image.layer.v1.tar+bzip2",
            &[&["media type"], &["bzip2"]],
        ),
    ];
    for (i, (name, blob, media_type, cause)) in cases.into_iter().enumerate() {
        lab.push_layers(&format!("mt-{i}"), vec![raw_layer(blob, &tar, media_type)]);
        let mut words: Vec<&[&str]> = vec![&["layer"]];
        words.extend_from_slice(cause);
        lab.reject(name, &words);
    }
    lab.finish();
}

// ---------------------------------------------------------------------------------------------
// 7. Hostile manifests and indexes (served by the proxy: the registry would refuse them)
// ---------------------------------------------------------------------------------------------

/// The manifest of `good`'s layers with layer descriptors replaced by `layers`.
fn manifest_over(good: &BuiltImage, layers: &[serde_json::Value]) -> Vec<u8> {
    manifest_json(&good.config_digest, good.config.len(), layers)
}

/// Serves `body` (hashed honestly) as the manifest the tag resolves to.
fn serve(lab: &Lab, body: &[u8], media_type: &str) -> String {
    let d = digest_of(body);
    serve_manifest(lab.proxy(), REPO, TAG, &d, media_type, body);
    d
}

#[test]
fn hostile_manifests_and_indexes_are_refused() {
    let mut lab = Lab::with(
        "manifests",
        Opts {
            proxy: true,
            ..DEFAULT_OPTS
        },
    );
    let good = boot(15);
    let good_img = lab.publish_good(15, &good);
    let layer = json!({
        "mediaType": OCI_LAYER_GZIP,
        "size": good_img.layers[1].blob.len(),
        "digest": good_img.layers[1].digest,
    });
    let with_layers = |layers: &[serde_json::Value]| manifest_over(&good_img, layers);

    // Not JSON.
    serve(
        &lab,
        b"<html><body>502 Bad Gateway</body></html>",
        OCI_MANIFEST,
    );
    lab.reject(
        "a manifest that is not JSON",
        &[&["manifest"], &["json", "valid"]],
    );

    // Larger than 4 MiB (valid JSON).
    let mut huge: serde_json::Value =
        serde_json::from_slice(&with_layers(std::slice::from_ref(&layer))).unwrap();
    huge["annotations"] = json!({ "padding": "x".repeat(5 << 20) });
    let huge = serde_json::to_vec(&huge).unwrap();
    serve(&lab, &huge, OCI_MANIFEST);
    lab.reject(
        &format!("a {} byte manifest", huge.len()),
        &[&["manifest"], &["larger", "too large", "4194304"]],
    );

    // Layer descriptors with digests bootsync cannot or must not use.
    let digests: [(&str, String, &[&str]); 6] = [
        ("sha512", format!("sha512:{}", "ab".repeat(64)), &["sha512"]),
        ("md5", format!("md5:{}", "0f".repeat(16)), &["md5"]),
        (
            "short hex",
            "sha256:abc123".into(),
            &["malformed", "sha256:abc123"],
        ),
        (
            "uppercase hex",
            format!("sha256:{}", "AB".repeat(32)),
            &["malformed"],
        ),
        (
            "path traversal",
            "sha256:../../../../etc/passwd".into(),
            &["malformed"],
        ),
        (
            "no algorithm",
            "e3b0c44298fc1c149afbf4c8996fb924".into(),
            &["malformed"],
        ),
    ];
    for (what, digest, cause) in digests {
        let mut l = layer.clone();
        l["digest"] = json!(digest);
        serve(&lab, &with_layers(&[l]), OCI_MANIFEST);
        lab.reject(
            &format!("layer digest: {what} ({digest})"),
            &[&["digest"], cause],
        );
    }

    // A layer that claims one byte less than the blob.
    let mut short = layer.clone();
    short["size"] = json!(good_img.layers[1].blob.len() - 1);
    serve(&lab, &with_layers(&[short]), OCI_MANIFEST);
    lab.reject(
        "a layer descriptor one byte shorter than its blob",
        &[&["longer", "size"]],
    );

    // An index that references itself: impossible with honest digests (a document cannot
    // contain its own hash), so the server claims the listed digest for the index's bytes.
    let claimed = digest_of(b"the digest this index claims to have");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_INDEX,
            "size": 1234,
            "digest": claimed,
            "platform": {"architecture": "arm64", "os": "linux"},
        }],
    }))
    .unwrap();
    serve_manifest(lab.proxy(), REPO, TAG, &claimed, OCI_INDEX, &index);
    lab.reject(
        "an index that lists itself (served under the digest it lists)",
        &[&["digest"], &["mismatch", "hashes to"]],
    );

    // An index whose arm64 entry (labelled an image manifest) is itself an index: honest
    // digests, nesting one level too deep.
    let (inner, inner_type) = index_json(Format::Oci, &[&good_img]);
    let inner_digest = lab
        .reg
        .push_manifest(REPO, &digest_of(&inner), inner_type, &inner);
    let outer = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "size": inner.len(),
            "digest": inner_digest,
            "platform": {"architecture": "arm64", "os": "linux"},
        }],
    }))
    .unwrap();
    serve(&lab, &outer, OCI_INDEX);
    lab.reject(
        "an index whose arm64 entry is another index",
        &[
            &["index"],
            &["inside an index", "index in", "nested", "media type"],
        ],
    );

    // An index that lists linux/arm64 twice: pushed to the registry for real (it is valid).
    lab.proxy().clear_rules();
    let other = boot(16);
    let other_img = lab.reg.push_image(
        REPO,
        &Image::oci("arm64").label("twin").layer(
            Layer::gzip()
                .file(KERNEL_SRC, other.kernel.clone())
                .file(INITRD_SRC, other.initramfs.clone()),
        ),
        None,
    );
    for (what, pair) in [
        ("the same manifest twice", [&good_img, &good_img]),
        ("two different manifests", [&good_img, &other_img]),
    ] {
        let (bytes, media_type) = index_json(Format::Oci, &pair);
        lab.reg.push_manifest(REPO, TAG, media_type, &bytes);
        lab.reject(
            &format!("an index listing linux/arm64 twice: {what}"),
            &[&["linux/arm64"], &["2 times", "twice", "more than once"]],
        );
    }

    // The tag resolves to a malformed digest (HEAD answer).
    serve_manifest(
        lab.proxy(),
        REPO,
        TAG,
        "sha256:../../../../etc/passwd",
        OCI_MANIFEST,
        b"{}",
    );
    lab.reject(
        "the tag resolves to `sha256:../../../../etc/passwd`",
        &[&["malformed", "digest"]],
    );
    lab.proxy().clear_rules();
    lab.finish();
}

// ---------------------------------------------------------------------------------------------
// Found while writing the above: layer sizes that overflow, hostile bytes echoed into errors
// ---------------------------------------------------------------------------------------------

/// Descriptor sizes are untrusted numbers: adding them up must not overflow (a debug build
/// panics; a release build wraps around and checks the wrong amount of free space).
#[test]
fn layer_sizes_near_u64_max_are_refused_without_a_crash() {
    let mut lab = Lab::with(
        "absurd layer sizes",
        Opts {
            proxy: true,
            ..DEFAULT_OPTS
        },
    );
    let good = boot(19);
    let good_img = lab.publish_good(19, &good);
    let layer = json!({
        "mediaType": OCI_LAYER_GZIP,
        "size": good_img.layers[1].blob.len(),
        "digest": good_img.layers[1].digest,
    });
    let with_layers = |layers: &[serde_json::Value]| manifest_over(&good_img, layers);
    // A layer size that overflows when sizes are added up: a real, empty top layer, and a lower
    // layer that claims u64::MAX - 100 bytes.
    let empty = RawTar::new().finish();
    let empty_digest = lab.reg.push_blob(REPO, &empty);
    let mut huge_layer = layer.clone();
    huge_layer["size"] = json!(u64::MAX - 100);
    let top = json!({"mediaType": OCI_LAYER_TAR, "size": empty.len(), "digest": empty_digest});
    serve(&lab, &with_layers(&[huge_layer, top]), OCI_MANIFEST);
    lab.reject(
        "a lower layer of u64::MAX - 100 bytes under a real top layer",
        &[&["max_download_size", "larger", "size"]],
    );
    // The same size on the only layer.
    let mut only = layer.clone();
    only["size"] = json!(u64::MAX);
    serve(&lab, &with_layers(&[only]), OCI_MANIFEST);
    lab.reject(
        "the only layer claims u64::MAX bytes",
        &[&["max_download_size", "larger", "space", "size"]],
    );
    lab.proxy().clear_rules();
    lab.finish();
}

/// Names from a tar header and bodies of registry errors end up in bootsync's error text: raw,
/// a newline or an ANSI escape in them forges log lines and terminal output.
#[test]
fn hostile_bytes_are_not_echoed_raw_into_errors() {
    let mut lab = Lab::with(
        "hostile bytes in errors",
        Opts {
            proxy: true,
            ..DEFAULT_OPTS
        },
    );
    let good = boot(20);
    lab.publish_good(20, &good);
    let evil = boot(21);
    let k = &evil.kernel;

    // A header whose checksum field is not a number, named so that echoing the name forges a
    // log line (newline, fake success, ANSI "cursor up, erase line").
    let mut block = RawHeader::new(kind::REGULAR, FORGED_NAME, 0).block();
    block[148..156].copy_from_slice(b"\x1b[2Jzz\0 ");
    let tar = RawTar::new()
        .file(INITRD_SRC, &evil.initramfs)
        .raw(&block)
        .file(KERNEL_SRC, k)
        .finish();
    lab.push_tar("forged-name", tar);
    lab.reject(
        "a header with a non-numeric checksum and a name that forges a log line",
        &[&["checksum", "cksum", "header"]],
    );

    // The registry's error body is echoed into the error: it must not forge output.
    let digest = digest_of(b"a manifest the registry pretends not to have");
    lab.proxy().clear_rules();
    lab.proxy().add(
        Rule::head(&format!("/v2/{REPO}/manifests/{TAG}")).fault(Fault::Respond {
            status: 200,
            headers: vec![("Docker-Content-Digest".into(), digest.clone())],
            body: Vec::new(),
        }),
    );
    let mut body = b"{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\"}]}\n".to_vec();
    body.extend_from_slice(FORGED_NAME);
    lab.proxy().add(
        Rule::get(&format!("/v2/{REPO}/manifests/{digest}")).fault(Fault::Respond {
            status: 404,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body,
        }),
    );
    lab.reject(
        "a 404 whose body forges a log line",
        &[&["404"], &["manifest_unknown", "not found"]],
    );

    lab.proxy().clear_rules();
    lab.finish();
}

// ---------------------------------------------------------------------------------------------
// 8. Boot files that fail their format checks
// ---------------------------------------------------------------------------------------------

/// A zstd frame with a content checksum (as the zstd CLI writes).
fn zstd_with_checksum(data: &[u8]) -> Vec<u8> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_checksum(true).unwrap();
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// The cpio inside a `fake_initramfs` (decoded).
fn unzstd(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(data)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn boot_files_failing_their_checks_are_refused() {
    let mut lab = Lab::new("format checks");
    let good = boot(17);
    lab.publish_good(17, &good);
    let evil = boot(18);

    // Kernel: the zboot header promises a payload the file no longer holds.
    let payload_size = u32::from_le_bytes(evil.kernel[12..16].try_into().unwrap()) as usize;
    let truncated = evil.kernel[..0x1000 + payload_size / 2].to_vec();
    let tar = RawTar::new()
        .file(KERNEL_SRC, &truncated)
        .file(INITRD_SRC, &evil.initramfs)
        .finish();
    lab.push_tar("zboot-truncated", tar);
    lab.reject(
        "kernel with a truncated zboot payload",
        &[&[KERNEL], &["kernel"], &["payload", "zboot"]],
    );

    // Initramfs: one bit flipped inside a zstd member that carries a content checksum.
    let mut flipped = zstd_with_checksum(&unzstd(&evil.initramfs));
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    let tar = RawTar::new()
        .file(KERNEL_SRC, &evil.kernel)
        .file(INITRD_SRC, &flipped)
        .finish();
    lab.push_tar("initrd-flip-checksum", tar);
    lab.reject(
        "initramfs: a bit flipped in a checksummed zstd member",
        &[&[INITRD], &["initramfs"], &["zstd", "checksum", "member"]],
    );

    // Initramfs: two members (like Talos with extensions); the second's cpio magic bit-flipped
    // (stored raw in the zstd frame, so the flip lands on the magic itself).
    let mut second = fake_initramfs(77, 20_000);
    let at = second
        .windows(6)
        .position(|w| w == b"070701")
        .expect("cpio magic stored raw in the zstd frame");
    second[at + 5] ^= 0x01;
    let mut two = evil.initramfs.clone();
    two.extend_from_slice(&second);
    let tar = RawTar::new()
        .file(KERNEL_SRC, &evil.kernel)
        .file(INITRD_SRC, &two)
        .finish();
    lab.push_tar("initrd-flip-magic", tar);
    lab.reject(
        "initramfs: the second member's cpio magic bit-flipped",
        &[&[INITRD], &["initramfs"], &["cpio", "magic"]],
    );
    lab.finish();
}

// ---------------------------------------------------------------------------------------------
// The raw builders themselves
// ---------------------------------------------------------------------------------------------

#[test]
fn raw_builders_produce_what_they_claim() {
    // Headers the tar crate reads back as written (checksums, types, links, devices, PAX).
    let tar = RawTar::new()
        .file("../../escape", b"abc")
        .symlink("a/link", "/etc/shadow")
        .hardlink("a/hard", "../x")
        .device(kind::CHAR, "a/null", 1, 3)
        .fifo("a/fifo")
        .pax(&[("path", b"long/pax/path"), ("size", b"2")])
        .file("short", b"xyz")
        .gnu_longname("g/".repeat(80) + "name")
        .file("trunc", b"q")
        .finish();
    let mut archive = tar::Archive::new(&tar[..]);
    let got: Vec<(String, tar::EntryType, u64)> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                e.header().entry_type(),
                e.size(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("../../escape".into(), tar::EntryType::Regular, 3),
            ("a/link".into(), tar::EntryType::Symlink, 0),
            ("a/hard".into(), tar::EntryType::Link, 0),
            ("a/null".into(), tar::EntryType::Char, 0),
            ("a/fifo".into(), tar::EntryType::Fifo, 0),
            ("long/pax/path".into(), tar::EntryType::Regular, 2),
            ("g/".repeat(80) + "name", tar::EntryType::Regular, 1),
        ]
    );
    for r in [
        rawtar::pax_record("size", b"7"),
        rawtar::pax_record("path", &[b'p'; 200]),
    ] {
        let len: usize = String::from_utf8_lossy(&r)
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, r.len());
    }

    // The zstd bomb decodes to its tar header and the promised zeros.
    let bomb = rawtar::zstd_bomb("z", 3);
    let out = unzstd(&bomb);
    assert_eq!(out.len(), 512 + 3 * (128 << 10));
    assert_eq!(&out[..512], &rawtar::bomb_header("z", 3 << 17)[..]);
    assert!(out[512..].iter().all(|&b| b == 0));
    let mut a = tar::Archive::new(&out[..]);
    let e = a.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(e.size(), (3 << 17) - 1024);

    // The gzip bomb: multi-member, 32 MiB per member.
    let bomb = rawtar::gzip_bomb("g", 1);
    let mut d = flate2::read::MultiGzDecoder::new(&bomb[..]);
    let n = std::io::copy(&mut d, &mut std::io::sink()).unwrap();
    assert_eq!(n, 512 + (32 << 20));
    assert!(
        bomb.len() < 64 << 10,
        "gzip bomb member is {} bytes",
        bomb.len()
    );
}

#[test]
fn safety_checks_notice_writes_outside_dest() {
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("assets/talos");
    fs::create_dir_all(dest.join("versions/aa")).unwrap();
    fs::write(dest.join("versions/aa/k"), b"k").unwrap();
    std::os::unix::fs::symlink("versions/aa", dest.join("current")).unwrap();
    let before = tree(root.path());
    fs::write(root.path().join("assets/escape"), b"x").unwrap();
    fs::write(root.path().join("assets/talos-evil"), b"x").unwrap();
    fs::write(dest.join("versions/aa/k"), b"changed").unwrap();
    fs::create_dir(dest.join(".staging-bb")).unwrap();
    fs::remove_file(dest.join("current")).unwrap();
    let (inside, outside) = split_diff(tree_diff(&before, &tree(root.path())), "assets/talos");
    assert_eq!(outside.len(), 2, "{outside:?}");
    assert!(outside.iter().any(|d| d.starts_with("new assets/escape ")));
    assert!(outside
        .iter()
        .any(|d| d.starts_with("new assets/talos-evil ")));
    assert_eq!(inside.len(), 3, "{inside:?}");
    assert!(inside
        .iter()
        .any(|d| d.starts_with("changed assets/talos/versions/aa/k ")));
    assert!(inside
        .iter()
        .any(|d| d.starts_with("new assets/talos/.staging-bb ")));
    assert!(inside.iter().any(|d| d == "removed assets/talos/current"));
}
