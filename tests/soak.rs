//! Soak test: hundreds of syncs through the fault-injecting proxy (`tests/common/proxy.rs`, with
//! the fault catalogue of `tests/common/chaos.rs` on top), with random faults of every kind,
//! while the tag moves between versions of a Talos-like two-platform image.
//!
//! Several independent lanes run in parallel, each with its own proxy, tag, dest and bootsync
//! (some lanes run `sync --once` per round, others a `run` daemon asked with
//! `POST /targets/NAME/sync`), all against one real registry. A round of a lane: move the tag to
//! another version (or leave it, for an up-to-date check), plan 1-4 random faults on the requests
//! that sync will make (the HEAD of the tag, the index and platform manifest GETs, the layer
//! blobs it downloads, and their retries), sync, then read the proxy log for the faults that
//! really took effect and check what is served:
//!
//! * after a success, exactly the version the tag points at: `current` and every stable link
//!   resolve to files byte-equal to that version's sources, `.bootsync.json` lists exactly them
//!   with their sizes and digests, and nothing else lies around;
//! * after a failure, the previous version, intact, and no debris.
//!
//! A served tree that is not one complete pushed version is a *bad publish*; a bad publish, a
//! crash (panic, unexpected exit), a hang, or a retry sooner than a `Retry-After` fails the test.
//! Failed syncs are expected (flipped bits and swapped manifests must fail).
//!
//! `cargo test --test soak -- --nocapture` (or `scripts/reliability.sh`). Environment:
//! `BOOTSYNC_SOAK_FAULTS` faults to inject (default 1000); `BOOTSYNC_SOAK_SEED` replays the fault
//! plans of an earlier run (the seed is printed; timing can still make a replay differ);
//! `BOOTSYNC_SOAK_LANES` parallel lanes (default 6); `BOOTSYNC_SOAK_MAX_SECS` a time limit
//! after which no new round starts (default 60 s + 0.6 s per fault).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

// The harness re-exports items that only other test binaries use.
#[allow(unused_imports)]
mod common;

use common::chaos::{self, Kind, RetryGap};
use common::http;
use common::image::{index_json, BuiltImage, Format, OCI_INDEX};
use common::proxy::{blob_path, Fault, Proxy, Rule};
use common::served::{check_served, debris, Catalog, Launch, Proc};
use common::*;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const REPO: &str = "soak/installer";
const ARCHES: [&str; 2] = ["arm64", "amd64"];
/// Versions pushed (each an index over an arm64 and an amd64 image).
const VERSIONS: usize = 8;
const DEFAULT_FAULTS: u64 = 1000;
const DEFAULT_LANES: usize = 6;
/// One sync (a `sync --once` run, or a daemon sync) taking longer than this is a hang. The
/// worst planned round (four faults of the slowest kinds on one request) takes about 20 s.
const SYNC_LIMIT: Duration = Duration::from_secs(120);
/// bootsync's timeouts in every lane.
const CONNECT_TIMEOUT: &str = "2s";
const REQUEST_TIMEOUT: &str = "3s";
const STALL_TIMEOUT: &str = "1s";

/// How often each kind is planned (relative weights). Faults that need a body are only planned
/// on GETs; a swapped manifest only on manifest GETs.
const KIND_WEIGHTS: [(Kind, u64); 10] = [
    (Kind::Reset, 14),
    (Kind::Truncated, 13),
    (Kind::LyingLength, 12),
    (Kind::Flipped, 9),
    (Kind::Status5xx, 15),
    (Kind::TooManyRequests, 10),
    (Kind::Stall, 9),
    (Kind::Trickle, 8),
    (Kind::RedirectLoop, 5),
    (Kind::ManifestChanged, 5),
];

// ---------------------------------------------------------------------------------------------
// Random numbers (the harness's SplitMix64)
// ---------------------------------------------------------------------------------------------

fn below(rng: &mut Rng, n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        rng.next_u64() % n
    }
}

fn between(rng: &mut Rng, lo: u64, hi: u64) -> u64 {
    lo + below(rng, hi - lo + 1)
}

/// An index into `weights`, chosen with probability proportional to its weight.
fn weighted(rng: &mut Rng, weights: &[u64]) -> Option<usize> {
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return None;
    }
    let mut x = below(rng, total);
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return Some(i);
        }
        x -= w;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The versions
// ---------------------------------------------------------------------------------------------

struct PlatformBuild {
    built: BuiltImage,
    /// The layers a sync downloads, top first: (digest, size).
    fetched: Vec<(String, u64)>,
}

struct Version {
    index: Vec<u8>,
    index_digest: String,
    /// In the order of `ARCHES`.
    platforms: Vec<PlatformBuild>,
}

struct World {
    versions: Vec<Version>,
    /// Per architecture (order of `ARCHES`): version hex -> published name -> bytes.
    catalogs: Vec<Catalog>,
    /// Full length of every manifest and blob, by request path.
    lengths: HashMap<String, u64>,
}

fn names(arch: &str) -> [String; 2] {
    [format!("vmlinuz-{arch}"), format!("initramfs-{arch}.xz")]
}

/// Pushes `VERSIONS` versions of a Talos-installer-like image: per architecture a gzip base layer
/// (filler, and an old kernel and initramfs at the wanted paths that every version hides), then
/// the version's boot files in one zstd layer, or split over a gzip and a zstd layer (either on
/// top). Versions 2k and 2k+1 share their kernels. Kernels 24-190 KB, initramfs 40-300 KB.
fn push_versions(reg: &Registry, seed: u64) -> World {
    let mut rng = Rng::new(seed ^ 0x0B00_75AC);
    let bases: Vec<Layer> = ARCHES
        .iter()
        .enumerate()
        .map(|(a, arch)| {
            Layer::gzip()
                .file("etc/os-release", "NAME=Talos\nID=talos\n")
                .file("usr/lib/libfiller.so", bytes(900 + a as u64, 150_000))
                .file(
                    &format!("usr/install/{arch}/vmlinuz"),
                    fake_kernel(arch, 910 + a as u64, 16_384),
                )
                .file(
                    &format!("usr/install/{arch}/initramfs.xz"),
                    fake_initramfs(920 + a as u64, 16_384),
                )
        })
        .collect();
    let mut world = World {
        versions: Vec::new(),
        catalogs: vec![Catalog::new(), Catalog::new()],
        lengths: HashMap::new(),
    };
    let mut kernel_len = [0usize; 2];
    for n in 0..VERSIONS {
        let mut platforms = Vec::new();
        for (a, arch) in ARCHES.iter().enumerate() {
            if n % 2 == 0 {
                kernel_len[a] = between(&mut rng, 24_000, 190_000) as usize;
            }
            let kseed = seed.wrapping_add(1_000 + (n / 2 * 2 + a) as u64);
            let kernel = fake_kernel(arch, kseed, kernel_len[a]);
            let initramfs = fake_initramfs(
                seed.wrapping_add(2_000 + (n * 2 + a) as u64),
                between(&mut rng, 40_000, 300_000) as usize,
            );
            let kpath = format!("usr/install/{arch}/vmlinuz");
            let ipath = format!("usr/install/{arch}/initramfs.xz");
            let image = Image::oci(arch)
                .label(&format!("v1.{n}.0"))
                .layer(bases[a].clone());
            let image = match n % 3 {
                0 => image.layer(
                    Layer::zstd()
                        .file(&kpath, kernel.clone())
                        .file(&ipath, initramfs.clone())
                        .file(
                            &format!("usr/install/{arch}/systemd-boot.efi"),
                            bytes(kseed, 20_000),
                        ),
                ),
                1 => image
                    .layer(Layer::gzip().file(&kpath, kernel.clone()))
                    .layer(Layer::zstd().file(&ipath, initramfs.clone())),
                _ => image
                    .layer(Layer::zstd().file(&ipath, initramfs.clone()))
                    .layer(
                        Layer::gzip()
                            .file(&kpath, kernel.clone())
                            .file("etc/motd", format!("v1.{n}.0\n")),
                    ),
            };
            let built = reg.push_image(REPO, &image, None);
            let wanted = if n % 3 == 0 { 1 } else { 2 };
            let fetched = built
                .layers
                .iter()
                .rev()
                .take(wanted)
                .map(|l| (l.digest.clone(), l.blob.len() as u64))
                .collect();
            for l in &built.layers {
                world
                    .lengths
                    .insert(blob_path(REPO, &l.digest), l.blob.len() as u64);
            }
            world.lengths.insert(
                format!("/v2/{REPO}/manifests/{}", built.digest),
                built.manifest.len() as u64,
            );
            let [kname, iname] = names(arch);
            world.catalogs[a].insert(
                built.hex().to_string(),
                BTreeMap::from([(kname, kernel), (iname, initramfs)]),
            );
            platforms.push(PlatformBuild { built, fetched });
        }
        let refs: Vec<&BuiltImage> = platforms.iter().map(|p| &p.built).collect();
        let (index, media_type) = index_json(Format::Oci, &refs);
        let index_digest = reg.push_manifest(REPO, &digest_of(&index), media_type, &index);
        world.lengths.insert(
            format!("/v2/{REPO}/manifests/{index_digest}"),
            index.len() as u64,
        );
        world.versions.push(Version {
            index,
            index_digest,
            platforms,
        });
    }
    world
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum SyncResult {
    /// Exit 0 / a counted success: the outcome label (`published`, `up to date`, ...).
    Ok(String),
    /// Exit 1 / a counted failure: the error.
    Failed(String),
    /// A panic, an unexpected exit code, a dead daemon.
    Crashed(String),
    /// Not finished within `SYNC_LIMIT`.
    Hung(String),
}

#[derive(Default)]
struct Stats {
    injected: BTreeMap<Kind, u64>,
    planned: u64,
    attempted: u64,
    succeeded: u64,
    failed: u64,
    published: u64,
    up_to_date: u64,
    bad_publishes: Vec<String>,
    problems: Vec<String>,
    retry_gaps: Vec<RetryGap>,
    causes: BTreeMap<String, u64>,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        for (k, v) in o.injected {
            *self.injected.entry(k).or_insert(0) += v;
        }
        self.planned += o.planned;
        self.attempted += o.attempted;
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.published += o.published;
        self.up_to_date += o.up_to_date;
        self.bad_publishes.extend(o.bad_publishes);
        self.problems.extend(o.problems);
        self.retry_gaps.extend(o.retry_gaps);
        for (k, v) in o.causes {
            *self.causes.entry(k).or_insert(0) += v;
        }
    }

    fn injected_total(&self) -> u64 {
        self.injected.values().sum()
    }
}

/// An error message with digests and long numbers (ports, sizes, offsets) made generic, to group
/// failures by cause.
fn cause_class(text: &str) -> String {
    let text = text.split_once("): ").map_or(text, |(_, c)| c);
    let mut out = String::new();
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        if token.len() >= 16 && token.bytes().all(|b| b.is_ascii_hexdigit()) {
            out.push('…');
        } else if token.len() > 3 && token.bytes().all(|b| b.is_ascii_digit()) {
            out.push('N');
        } else {
            out.push_str(token);
        }
        token.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            token.push(c);
        } else {
            flush(&mut token, &mut out);
            out.push(c);
        }
    }
    flush(&mut token, &mut out);
    out.chars().take(220).collect()
}

// ---------------------------------------------------------------------------------------------
// A lane
// ---------------------------------------------------------------------------------------------

struct Shared {
    target: u64,
    injected: AtomicU64,
    deadline: Instant,
    /// Set when a lane hit a crash or a hang: the others stop too.
    abort: AtomicBool,
    running: AtomicUsize,
}

impl Shared {
    fn done(&self) -> bool {
        self.injected.load(Ordering::SeqCst) >= self.target
            || Instant::now() >= self.deadline
            || self.abort.load(Ordering::SeqCst)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SlotKind {
    Head,
    Index,
    Manifest,
    Blob,
}

/// One request (method and path) a sync will make, and the number of the next request to it that
/// has no fault planned yet (1-based; retries and redirect hops are later requests).
struct Slot {
    what: SlotKind,
    method: &'static str,
    path: String,
    len: u64,
    next: usize,
}

/// One independent lane: its own proxy, tag (`laneNN`, fixed width, as proxy rules match paths by
/// substring), dest and bootsync. `retain = 1` and `grace = "0s"` make every move of the tag a
/// real download (no retained version to switch back to); `interval`, `backoff_start` and
/// `backoff_max` of 1 h keep the daemon from syncing on its own between the rounds.
struct Lane<'w> {
    n: usize,
    arch_i: usize,
    arch: &'static str,
    world: &'w World,
    reg: &'w Registry,
    proxy: Proxy,
    work: Work,
    dest: PathBuf,
    config: PathBuf,
    listen: String,
    name: String,
    tag: String,
    daemon: Option<Proc>,
    rng: Rng,
    next_id: u64,
    /// The version the tag points at.
    tagged: Option<usize>,
    stats: Stats,
}

impl<'w> Lane<'w> {
    fn new(n: usize, seed: u64, world: &'w World, reg: &'w Registry) -> Lane<'w> {
        let arch_i = n % ARCHES.len();
        let arch = ARCHES[arch_i];
        let proxy = Proxy::start(&reg.host());
        let work = Work::new();
        let dest = work.dest(&format!("lane{n:02}"));
        let name = format!("lane{n:02}-{arch}");
        let tag = format!("lane{n:02}");
        let reference = format!("{}/{REPO}:{tag}", proxy.host());
        let mut cfg = Config::new()
            .registry(&proxy.host())
            .interval("1h")
            .retain(1)
            .grace("0s")
            .extra_top("backoff_start = \"1h\"\nbackoff_max = \"1h\"")
            .target(
                TargetCfg::new(&name, &reference, &dest)
                    .platform(&format!("linux/{arch}"))
                    .preset("talos-installer"),
            );
        cfg.connect_timeout = Some(CONNECT_TIMEOUT.into());
        cfg.request_timeout = Some(REQUEST_TIMEOUT.into());
        cfg.stall_timeout = Some(STALL_TIMEOUT.into());
        let listen = cfg.listen.clone();
        let config = work.config(&cfg);
        Lane {
            n,
            arch_i,
            arch,
            world,
            reg,
            proxy,
            work,
            dest,
            config,
            listen,
            name,
            tag,
            daemon: None,
            rng: Rng::new(seed.wrapping_mul(0x9E37_79B9).wrapping_add(n as u64 + 1)),
            next_id: (n as u64) << 40,
            tagged: None,
            stats: Stats::default(),
        }
    }

    fn mode(&self) -> &'static str {
        if self.daemon.is_some() {
            "daemon"
        } else {
            "sync --once"
        }
    }

    fn tag_path(&self) -> String {
        format!("/v2/{REPO}/manifests/{}", self.tag)
    }

    fn move_tag(&mut self, v: usize) {
        let version = &self.world.versions[v];
        self.reg
            .push_manifest(REPO, &self.tag, OCI_INDEX, &version.index);
        self.tagged = Some(v);
    }

    fn platform(&self, v: usize) -> &'w PlatformBuild {
        &self.world.versions[v].platforms[self.arch_i]
    }

    /// The version `current` points at (by its hex), if any.
    fn served_hex(&self) -> Option<String> {
        let link = fs::read_link(self.dest.join("current")).ok()?;
        link.to_string_lossy()
            .strip_prefix("versions/")
            .map(str::to_string)
    }

    fn version_of_hex(&self, hex: &str) -> Option<usize> {
        (0..VERSIONS).find(|v| self.platform(*v).built.hex() == hex)
    }

    /// The first version: tag, start the daemon or sync once, no faults.
    fn start(&mut self, daemon: bool) {
        let v = self.n % VERSIONS;
        self.move_tag(v);
        self.stats.attempted += 1;
        let result = if daemon {
            let log = self.work.path().join("daemon.log");
            let proc = Launch::new().spawn_run(&self.config, &self.listen, &log);
            self.daemon = Some(proc);
            self.wait_daemon_sync(&BTreeMap::new())
        } else {
            self.sync_once()
        };
        self.record(result, v, None, "first sync (no faults)");
    }

    /// Rounds until the shared target or deadline is reached.
    fn run(&mut self, shared: &Shared, max_rounds: u64) {
        for _ in 0..max_rounds {
            if shared.done() {
                break;
            }
            let injected = self.round();
            shared.injected.fetch_add(injected, Ordering::SeqCst);
            let fatal = self
                .stats
                .problems
                .iter()
                .any(|p| p.contains("CRASH") || p.contains("HANG"));
            if fatal {
                shared.abort.store(true, Ordering::SeqCst);
                break;
            }
        }
    }

    /// One round; returns the faults that took effect.
    fn round(&mut self) -> u64 {
        let before = self.served_hex();
        let served_v = before.as_deref().and_then(|h| self.version_of_hex(h));
        // Now and then leave the tag where it is: an up-to-date check (HEAD only).
        let stay =
            self.tagged.is_some() && served_v == self.tagged && below(&mut self.rng, 10) == 0;
        let target = if stay {
            self.tagged.unwrap()
        } else {
            let others: Vec<usize> = (0..VERSIONS).filter(|v| Some(*v) != served_v).collect();
            let v = others[below(&mut self.rng, others.len() as u64) as usize];
            self.move_tag(v);
            v
        };
        let full = served_v != Some(target);
        let (rules, planned) = self.plan(target, full);
        self.stats.planned += planned;
        for r in rules {
            self.proxy.add(r);
        }
        let log_from = self.proxy.log().len();
        self.stats.attempted += 1;
        let result = if self.daemon.is_some() {
            self.daemon_sync()
        } else {
            self.sync_once()
        };
        let idle = self.proxy.wait_idle(Duration::from_secs(30));
        let log = self.proxy.log();
        let log = &log[log_from.min(log.len())..];
        let lengths = &self.world.lengths;
        let tally = chaos::tally(log, |p| lengths.get(p).copied());
        let injected: u64 = tally.values().sum();
        for (k, v) in tally {
            *self.stats.injected.entry(k).or_insert(0) += v;
        }
        self.stats.retry_gaps.extend(chaos::retry_after_gaps(log));
        let dump = tail_lines(&self.proxy.dump(), 30);
        self.proxy.clear_rules();
        if idle {
            self.proxy.clear_log();
        } else {
            self.stats.problems.push(format!(
                "HANG: lane {} ({}): proxy still busy 30 s after the sync ended:\n{dump}",
                self.n,
                self.mode()
            ));
        }
        let what = format!(
            "round with {planned} planned faults ({injected} took effect); proxy log:\n{dump}"
        );
        if std::env::var_os("BOOTSYNC_SOAK_VERBOSE").is_some() {
            println!("soak: lane {} -> v{target}: {result:?}; {what}\n", self.n);
        }
        self.record(result, target, before, &what);
        injected
    }

    /// Random faults on the requests the sync to version `target` will make: 1-4 of them, on the
    /// first request of a kind or on its retries.
    fn plan(&mut self, target: usize, full: bool) -> (Vec<Rule>, u64) {
        let p = self.platform(target);
        let version = &self.world.versions[target];
        let mut slots = vec![Slot {
            what: SlotKind::Head,
            method: "HEAD",
            path: self.tag_path(),
            len: 0,
            next: 1,
        }];
        if full {
            slots.push(Slot {
                what: SlotKind::Index,
                method: "GET",
                path: format!("/v2/{REPO}/manifests/{}", version.index_digest),
                len: version.index.len() as u64,
                next: 1,
            });
            slots.push(Slot {
                what: SlotKind::Manifest,
                method: "GET",
                path: format!("/v2/{REPO}/manifests/{}", p.built.digest),
                len: p.built.manifest.len() as u64,
                next: 1,
            });
            for (digest, size) in &p.fetched {
                slots.push(Slot {
                    what: SlotKind::Blob,
                    method: "GET",
                    path: blob_path(REPO, digest),
                    len: *size,
                    next: 1,
                });
            }
        }
        let count = [1, 2, 2, 2, 3, 3, 3, 4][below(&mut self.rng, 8) as usize];
        let mut rules = Vec::new();
        let mut planned = 0;
        for _ in 0..count {
            let weights: Vec<u64> = KIND_WEIGHTS
                .iter()
                .map(|(k, w)| {
                    let possible = slots.iter().any(|s| slot_weight(*k, s.what) > 0);
                    if possible {
                        *w
                    } else {
                        0
                    }
                })
                .collect();
            let Some(k) = weighted(&mut self.rng, &weights) else {
                break;
            };
            let kind = KIND_WEIGHTS[k].0;
            let sw: Vec<u64> = slots.iter().map(|s| slot_weight(kind, s.what)).collect();
            let Some(s) = weighted(&mut self.rng, &sw) else {
                continue;
            };
            self.add_fault(kind, &mut slots[s], target, &mut rules);
            planned += 1;
        }
        (rules, planned)
    }

    fn add_fault(&mut self, kind: Kind, slot: &mut Slot, target: usize, rules: &mut Vec<Rule>) {
        let n = slot.next;
        let id = self.next_id;
        self.next_id += 1;
        let rng = &mut self.rng;
        // A body offset: anywhere in a first response; early in a later (possibly resumed) one.
        let at = if n == 1 {
            below(rng, slot.len)
        } else {
            below(rng, slot.len / 4 + 1)
        };
        let manifest = matches!(slot.what, SlotKind::Index | SlotKind::Manifest);
        let fault = match kind {
            Kind::Reset => Fault::ResetAfter(at),
            Kind::Truncated => Fault::CutAfter(at),
            Kind::LyingLength => Fault::ShortBody(at),
            Kind::Flipped => Fault::FlipBits {
                at,
                mask: 1 << below(rng, 8),
            },
            Kind::Status5xx => chaos::status([500, 502, 503][below(rng, 3) as usize], id),
            Kind::TooManyRequests => chaos::too_many_requests(between(rng, 1, 2), id),
            Kind::Stall => {
                if slot.what == SlotKind::Head || below(rng, 4) == 0 {
                    // Nothing at all, not even the head, for longer than the timeouts.
                    Fault::Delay(Duration::from_millis(between(rng, 2_500, 4_000)))
                } else {
                    Fault::Stall {
                        after: at,
                        duration: Duration::from_secs(5),
                        then_close: below(rng, 2) == 0,
                    }
                }
            }
            Kind::Trickle => {
                if manifest {
                    // Small pieces: some manifests take longer than request_timeout in all.
                    Fault::Trickle {
                        chunk: between(rng, 64, 256) as usize,
                        pause: Duration::from_millis(between(rng, 100, 400)),
                    }
                } else {
                    let pieces = between(rng, 4, 16);
                    Fault::Trickle {
                        chunk: (slot.len / pieces).max(512) as usize,
                        pause: Duration::from_millis(between(rng, 40, 250)),
                    }
                }
            }
            Kind::RedirectLoop => {
                // 2-13 hops: up to 10 reqwest follows to the real answer; more fail an attempt
                // (too many redirects), and the retry follows the rest of the loop.
                let hops = between(rng, 2, 13) as usize;
                for h in 0..hops {
                    rules.push(
                        Rule::request(slot.method, &slot.path)
                            .nth(n + h)
                            .fault(chaos::redirect_to_self(&slot.path, id)),
                    );
                }
                slot.next += hops;
                return;
            }
            Kind::ManifestChanged => {
                let others: Vec<usize> = (0..VERSIONS).filter(|v| *v != target).collect();
                let o = others[below(rng, others.len() as u64) as usize];
                let other = &self.world.versions[o];
                if slot.what == SlotKind::Index {
                    chaos::swapped_manifest(&other.index, OCI_INDEX, id)
                } else {
                    let b = &other.platforms[self.arch_i].built;
                    chaos::swapped_manifest(&b.manifest, b.media_type, id)
                }
            }
        };
        rules.push(Rule::request(slot.method, &slot.path).nth(n).fault(fault));
        slot.next += 1;
    }

    // ---- syncing ----

    /// `bootsync sync --once`, output to files, `SYNC_LIMIT` at most.
    fn sync_once(&mut self) -> SyncResult {
        let out_path = self.work.path().join("sync.out");
        let err_path = self.work.path().join("sync.err");
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(["sync", "--once"])
            .env("RUST_BACKTRACE", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).unwrap())
            .stderr(fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        let deadline = Instant::now() + SYNC_LIMIT;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        let crashed = stderr.contains("panicked") || stderr.contains("internal error");
        match status.map(|s| s.code()) {
            None => SyncResult::Hung(format!(
                "`sync --once` still running after {SYNC_LIMIT:?}; stderr:\n{}",
                tail_lines(&stderr, 20)
            )),
            Some(Some(0)) if !crashed => {
                let label = stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{}: ", self.name)))
                    .and_then(|rest| rest.split(" sha256:").next())
                    .unwrap_or("?")
                    .to_string();
                SyncResult::Ok(label)
            }
            Some(Some(1)) if !crashed => SyncResult::Failed(
                stderr
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("error: "))
                    .unwrap_or("(no error line)")
                    .to_string(),
            ),
            Some(code) => SyncResult::Crashed(format!(
                "`sync --once` exited with {code:?}; stderr:\n{}",
                tail_lines(&stderr, 30)
            )),
        }
    }

    /// `bootsync_syncs_total` of this lane's target, by result.
    fn syncs_total(&self) -> Option<BTreeMap<String, f64>> {
        let d = self.daemon.as_ref()?;
        let r = http::request(
            "GET",
            &format!("{}/metrics", d.base),
            &[],
            &[],
            Duration::from_secs(5),
        )
        .ok()?;
        if r.status != 200 {
            return None;
        }
        let mut out = BTreeMap::new();
        let want = format!("target=\"{}\"", self.name);
        for line in r.text().lines() {
            let Some(rest) = line.strip_prefix("bootsync_syncs_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            if !labels.split(',').any(|l| l == want) {
                continue;
            }
            let result = labels
                .split(',')
                .find_map(|l| l.strip_prefix("result=\""))?
                .trim_end_matches('"');
            out.insert(result.to_string(), value.trim().parse().ok()?);
        }
        Some(out)
    }

    /// `POST /targets/NAME/sync`, then waits until the daemon counted one more sync.
    fn daemon_sync(&mut self) -> SyncResult {
        let Some(before) = self.syncs_total() else {
            return self.daemon_gone("no /metrics before the sync");
        };
        let base = self.daemon.as_ref().unwrap().base.clone();
        let url = format!("{base}/targets/{}/sync", self.name);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match http::request("POST", &url, &[], &[], Duration::from_secs(10)) {
                Ok(r) if r.status == 202 => break,
                Ok(r) if r.status == 409 && Instant::now() < deadline => {}
                Ok(r) => {
                    return SyncResult::Crashed(format!(
                        "POST /targets/{}/sync answered {} {}",
                        self.name,
                        r.status,
                        r.text()
                    ))
                }
                Err(e) if Instant::now() >= deadline => {
                    return self.daemon_gone(&format!("POST /targets/{}/sync: {e}", self.name))
                }
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_daemon_sync(&before)
    }

    /// Waits until `bootsync_syncs_total` of the target exceeds `before`, and reports that sync.
    fn wait_daemon_sync(&mut self, before: &BTreeMap<String, f64>) -> SyncResult {
        let deadline = Instant::now() + SYNC_LIMIT;
        let sum = |m: &BTreeMap<String, f64>| m.values().sum::<f64>();
        loop {
            if let Some(st) = self.daemon.as_mut().unwrap().try_wait() {
                return self.daemon_gone(&format!("the daemon exited ({st})"));
            }
            if let Some(now) = self.syncs_total() {
                if sum(&now) > sum(before) {
                    let rose = now
                        .iter()
                        .find(|(k, v)| **v > before.get(*k).copied().unwrap_or(0.0))
                        .map(|(k, _)| k.clone())
                        .unwrap_or_default();
                    if rose != "failed" {
                        return SyncResult::Ok(rose.replace('_', " "));
                    }
                    let error = self
                        .daemon_status()
                        .and_then(|t| t["last_error"].as_str().map(str::to_string))
                        .unwrap_or_else(|| "(no last_error)".into());
                    if error.contains("internal error") {
                        return SyncResult::Crashed(format!("daemon sync: {error}"));
                    }
                    return SyncResult::Failed(error);
                }
            }
            if Instant::now() > deadline {
                return SyncResult::Hung(format!(
                    "daemon sync not finished after {SYNC_LIMIT:?}; log:\n{}",
                    self.daemon.as_ref().unwrap().log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn daemon_status(&self) -> Option<serde_json::Value> {
        let d = self.daemon.as_ref()?;
        let status = d.status()?;
        status_target(&status, &self.name).cloned()
    }

    fn daemon_gone(&self, what: &str) -> SyncResult {
        let log = self
            .daemon
            .as_ref()
            .map(|d| d.log_tail())
            .unwrap_or_default();
        SyncResult::Crashed(format!("{what}; daemon log:\n{log}"))
    }

    // ---- checking ----

    /// Counts the outcome and checks what is served after it.
    fn record(&mut self, result: SyncResult, target: usize, before: Option<String>, what: &str) {
        let lane = format!("lane {} ({}, linux/{})", self.n, self.mode(), self.arch);
        let [k, i] = names(self.arch);
        let names = [k.as_str(), i.as_str()];
        let catalog = &self.world.catalogs[self.arch_i];
        let served = check_served(&self.dest, &names, catalog);
        let want = self.platform(target).built.hex().to_string();
        match &result {
            SyncResult::Ok(label) => {
                self.stats.succeeded += 1;
                match &served {
                    Err(e) => self
                        .stats
                        .bad_publishes
                        .push(format!("{lane}: after a successful sync ({label}): {e}\n{what}")),
                    Ok(s) if s.hex != want => self.stats.problems.push(format!(
                        "WRONG VERSION: {lane}: sync succeeded ({label}) but serves {}, not {want} (tag moved to v{target})\n{what}",
                        s.hex
                    )),
                    Ok(s) => {
                        if let Err(e) = self.check_meta(&s.hex, target) {
                            self.stats.problems.push(format!("{lane}: {e}\n{what}"));
                        }
                        if before.as_deref() == Some(s.hex.as_str()) {
                            self.stats.up_to_date += 1;
                        } else {
                            self.stats.published += 1;
                        }
                    }
                }
            }
            SyncResult::Failed(cause) => {
                self.stats.failed += 1;
                *self.stats.causes.entry(cause_class(cause)).or_insert(0) += 1;
                match (&before, &served) {
                    (Some(_), Err(e)) => self.stats.bad_publishes.push(format!(
                        "{lane}: after a failed sync ({cause}): {e}\n{what}"
                    )),
                    (Some(b), Ok(s)) if &s.hex != b => self.stats.problems.push(format!(
                        "{lane}: a failed sync ({cause}) changed what is served from {b} to {}\n{what}",
                        s.hex
                    )),
                    (None, Ok(s)) => self.stats.bad_publishes.push(format!(
                        "{lane}: a failed sync ({cause}) published {}\n{what}",
                        s.hex
                    )),
                    _ => {}
                }
            }
            SyncResult::Crashed(e) => {
                self.stats.failed += 1;
                self.stats
                    .problems
                    .push(format!("CRASH: {lane}: {e}\n{what}"));
            }
            SyncResult::Hung(e) => {
                self.stats.failed += 1;
                self.stats
                    .problems
                    .push(format!("HANG: {lane}: {e}\n{what}"));
            }
        }
        if let Ok(s) = &served {
            if !s.stray.is_empty() {
                self.stats.problems.push(format!(
                    "{lane}: temp files inside the served version: {:?}",
                    s.stray
                ));
            }
        }
        if let (Some(_), Ok(s)) = (&self.daemon, &served) {
            if let Err(e) = self.check_daemon_status(&result, &s.hex) {
                self.stats.problems.push(format!("{lane}: {e}\n{what}"));
            }
        }
        let left = debris(&self.dest);
        if !left.is_empty() {
            self.stats.problems.push(format!(
                "{lane}: debris after a sync ({result:?}): {left:?}\n{what}"
            ));
        }
    }

    /// The daemon's `/status` agrees with the sync's outcome and with what is served.
    fn check_daemon_status(&self, result: &SyncResult, hex: &str) -> Result<(), String> {
        let want_state = match result {
            SyncResult::Ok(_) => "ok",
            SyncResult::Failed(_) => "failed",
            _ => return Ok(()),
        };
        let t = self
            .daemon_status()
            .ok_or("no /status for the target after the sync")?;
        let digest = format!("sha256:{hex}");
        if t["state"] != want_state || t["published"]["digest"] != digest.as_str() {
            return Err(format!(
                "/status says state {} published {}; expected {want_state} and {digest} (served)",
                t["state"], t["published"]["digest"]
            ));
        }
        Ok(())
    }

    /// `.bootsync.json` of the served version names the tag's index and this platform.
    fn check_meta(&self, hex: &str, target: usize) -> Result<(), String> {
        let path = self.dest.join("versions").join(hex).join(".bootsync.json");
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).map_err(|e| format!("read {path:?}: {e}"))?)
                .map_err(|e| format!("{path:?}: {e}"))?;
        let want_tag = &self.world.versions[target].index_digest;
        if meta["tag_digest"] != want_tag.as_str()
            || meta["platform"] != format!("linux/{}", self.arch)
            || meta["target"] != self.name.as_str()
        {
            return Err(format!(
                "{path:?} does not name tag digest {want_tag}, linux/{}, {}: {meta}",
                self.arch, self.name
            ));
        }
        Ok(())
    }
}

fn slot_weight(kind: Kind, slot: SlotKind) -> u64 {
    use SlotKind::*;
    match (kind, slot) {
        (Kind::ManifestChanged, Index | Manifest) => 1,
        (Kind::ManifestChanged, _) => 0,
        (k, Head) if k.needs_body() => 0,
        (Kind::Status5xx | Kind::TooManyRequests | Kind::RedirectLoop, Head) => 30,
        (Kind::Status5xx | Kind::TooManyRequests | Kind::RedirectLoop, Index | Manifest) => 10,
        (Kind::Status5xx | Kind::TooManyRequests | Kind::RedirectLoop, Blob) => 25,
        (Kind::Stall, Head) => 25,
        (Kind::Stall, Index | Manifest) => 8,
        (Kind::Stall, Blob) => 30,
        (_, Index | Manifest) => 4,
        (_, Blob) => 42,
        (_, Head) => 0,
    }
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
    )
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[test]
fn soak_random_faults_never_publish_a_bad_version() {
    let started = Instant::now();
    let target = env_u64("BOOTSYNC_SOAK_FAULTS").unwrap_or(DEFAULT_FAULTS);
    let seed = env_u64("BOOTSYNC_SOAK_SEED").unwrap_or_else(|| {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        (t.as_secs() ^ u64::from(t.subsec_nanos())) % 1_000_000
    });
    let lanes = env_u64("BOOTSYNC_SOAK_LANES")
        .map(|n| n.clamp(1, 32) as usize)
        .unwrap_or(DEFAULT_LANES);
    let max_secs = env_u64("BOOTSYNC_SOAK_MAX_SECS").unwrap_or(60 + target * 6 / 10);
    println!(
        "soak: seed {seed} (replay: BOOTSYNC_SOAK_SEED={seed}); target {target} faults; {lanes} lanes; \
         time limit {max_secs} s; timeouts connect {CONNECT_TIMEOUT}, request {REQUEST_TIMEOUT}, stall {STALL_TIMEOUT}"
    );

    let reg = Registry::start();
    let world = push_versions(&reg, seed);
    let shared = Shared {
        target,
        injected: AtomicU64::new(0),
        deadline: Instant::now() + Duration::from_secs(max_secs),
        abort: AtomicBool::new(false),
        running: AtomicUsize::new(lanes),
    };
    // Bounded loops: a round injects one fault or more most of the time.
    let max_rounds = target * 3 / lanes as u64 + 20;

    let mut total = Stats::default();
    let mut lane_lines = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..lanes)
            .map(|n| {
                let (world, reg, shared) = (&world, &reg, &shared);
                s.spawn(move || {
                    // Every third lane runs a daemon; the others `sync --once`.
                    let daemon = n % 3 == 0;
                    let mut lane = Lane::new(n, seed, world, reg);
                    lane.start(daemon);
                    lane.run(shared, max_rounds);
                    shared.running.fetch_sub(1, Ordering::SeqCst);
                    let line = format!(
                        "soak:   lane {} ({}, linux/{}): {} syncs, {} ok, {} failed, {} faults",
                        lane.n,
                        lane.mode(),
                        lane.arch,
                        lane.stats.attempted,
                        lane.stats.succeeded,
                        lane.stats.failed,
                        lane.stats.injected_total()
                    );
                    if let Some(d) = lane.daemon.as_mut() {
                        d.terminate();
                    }
                    (std::mem::take(&mut lane.stats), line)
                })
            })
            .collect();
        // Progress every 30 s.
        s.spawn(|| {
            let mut next = Instant::now() + Duration::from_secs(30);
            while shared.running.load(Ordering::SeqCst) > 0 {
                if Instant::now() >= next {
                    println!(
                        "soak: {:>4} s: {} faults injected",
                        started.elapsed().as_secs(),
                        shared.injected.load(Ordering::SeqCst)
                    );
                    next += Duration::from_secs(30);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        for h in handles {
            match h.join() {
                Ok((stats, line)) => {
                    total.merge(stats);
                    lane_lines.push(line);
                }
                Err(_) => {
                    shared.running.fetch_sub(1, Ordering::SeqCst);
                    total
                        .problems
                        .push("CRASH: a lane thread panicked (see above)".into());
                }
            }
        }
    });
    let elapsed = started.elapsed();

    for l in &lane_lines {
        println!("{l}");
    }
    let mut causes: Vec<(&String, &u64)> = total.causes.iter().collect();
    causes.sort_by(|a, b| b.1.cmp(a.1));
    println!("soak:   failure causes (most frequent first):");
    for (c, n) in causes.iter().take(12) {
        println!("soak:     {n:>4}  {c}");
    }
    let honoured = total.retry_gaps.iter().filter(|g| g.honoured()).count();
    let min_gap = total
        .retry_gaps
        .iter()
        .map(|g| g.waited)
        .min()
        .map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
    let kinds: Vec<String> = Kind::ALL
        .iter()
        .map(|k| {
            format!(
                "{} {}",
                k.label(),
                total.injected.get(k).copied().unwrap_or(0)
            )
        })
        .collect();
    println!(
        "soak:   {} faults planned, {} took effect; {} up-to-date checks; {:.0} s",
        total.planned,
        total.injected_total(),
        total.up_to_date,
        elapsed.as_secs_f64()
    );
    if total.injected_total() < target {
        println!(
            "soak:   stopped at the time limit ({max_secs} s) before {target} faults (BOOTSYNC_SOAK_MAX_SECS)"
        );
    }
    println!(
        "soak: seed {seed}; faults injected {} ({}); syncs {} attempted, {} succeeded, {} failed; \
         versions published {}; bad publishes {}; retry-after honoured {honoured}/{} (min gap {min_gap})",
        total.injected_total(),
        kinds.join(", "),
        total.attempted,
        total.succeeded,
        total.failed,
        total.published,
        total.bad_publishes.len(),
        total.retry_gaps.len(),
    );

    let mut failures = Vec::new();
    for b in &total.bad_publishes {
        failures.push(format!("BAD PUBLISH: {b}"));
    }
    failures.extend(total.problems.iter().cloned());
    for g in total.retry_gaps.iter().filter(|g| !g.honoured()) {
        failures.push(format!(
            "RETRY-AFTER: {} retried after {:?}, Retry-After asked {:?}",
            g.path, g.waited, g.asked
        ));
    }
    assert!(
        failures.is_empty(),
        "seed {seed}: {} problem(s):\n\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n\n")
    );
    assert!(total.succeeded > 0 && total.injected_total() > 0);
}

/// Regression test for a bug the soak test found: a manifest GET whose body breaks once (here
/// cut after 100 bytes; a reset, a stall or a lying `Content-Length` do the same) used to fail the
/// whole sync, because only the response head was retried. The body is now read inside the retry
/// loop (`Registry::fetch_small`).
#[test]
fn manifest_body_broken_once_is_retried() {
    const TAG: &str = "stable";
    let repo = "soak/repro";
    let reg = Registry::start();
    let proxy = Proxy::start(&reg.host());
    let image = Image::oci("arm64").layer(
        Layer::zstd()
            .file("usr/install/arm64/vmlinuz", fake_kernel("arm64", 1, 50_000))
            .file("usr/install/arm64/initramfs.xz", fake_initramfs(2, 50_000)),
    );
    let built = reg.push_image(repo, &image, Some(TAG));
    proxy.add(
        Rule::get(&format!("/v2/{repo}/manifests/{}", built.digest))
            .nth(1)
            .fault(Fault::CutAfter(100)),
    );
    let work = Work::new();
    let reference = format!("{}/{repo}:{TAG}", proxy.host());
    let config = work.config(
        &Config::new().registry(&proxy.host()).target(
            TargetCfg::new("talos-arm64", &reference, &work.dest("talos"))
                .platform("linux/arm64")
                .preset("talos-installer"),
        ),
    );
    let out = work.sync_once(&config);
    assert!(proxy.wait_idle(Duration::from_secs(10)), "{}", proxy.dump());
    assert_eq!(
        out.code,
        Some(0),
        "one broken manifest response failed the sync:\n{}\nproxy log:\n{}",
        out.describe(),
        proxy.dump()
    );
}
