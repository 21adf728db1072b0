//! Serving guarantees: what a netboot client (through nginx standing in for matchbox) and the
//! operator see while bootsync publishes, crashes, runs out of disk, rolls back, or finds its
//! tree changed under it.
//!
//! Needs `/usr/bin/docker-registry` (as the other end-to-end tests) and Debian's `nginx` for the
//! concurrent-readers test (a missing nginx fails it; it is not skipped). The disk-full test
//! mounts a tmpfs (root); where mounting is not permitted it prints
//! "skipped: cannot mount tmpfs: ..." and passes. Run with
//! `cargo test --test serving -- --nocapture` to see the counts each test prints.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

// The harness re-exports items that only other test binaries use.
#[allow(unused_imports)]
mod common;

use common::image::BuiltImage;
use common::nginx::{self, Nginx};
use common::served::{check_profile, check_served, debris, Catalog, Launch, Proc};
use common::tmpfs::Tmpfs;
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const REPO: &str = "talos/serving";
const TAG: &str = "stable";
const NAME: &str = "talos";
const KERNEL_NAME: &str = "vmlinuz-arm64";
const INITRD_NAME: &str = "initramfs-arm64.xz";
const NAMES: [&str; 2] = [KERNEL_NAME, INITRD_NAME];
/// Small boot files: these tests are about the tree, not throughput.
const SMALL: usize = 24_000;

/// One pushed image (by digest; the tag is moved separately) and its boot files.
struct Version {
    built: BuiltImage,
    arch: String,
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
}

impl Version {
    fn digest(&self) -> &str {
        &self.built.digest
    }
    fn hex(&self) -> &str {
        self.built.hex()
    }
    fn kernel_name(&self) -> String {
        format!("vmlinuz-{}", self.arch)
    }
    fn initrd_name(&self) -> String {
        format!("initramfs-{}.xz", self.arch)
    }
    fn files(&self) -> BTreeMap<String, Vec<u8>> {
        [
            (self.kernel_name(), self.kernel.clone()),
            (self.initrd_name(), self.initramfs.clone()),
        ]
        .into()
    }
}

/// Builds the image (one gzip layer with the `demo` preset's paths) and pushes it by digest.
fn push_files(
    reg: &Registry,
    arch: &str,
    seed: u64,
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
) -> Version {
    let image = Image::oci(arch).label(&format!("v{seed}")).layer(
        Layer::gzip()
            .file(&format!("assets/talos/{arch}/vmlinuz"), kernel.clone())
            .file(
                &format!("assets/talos/{arch}/initramfs.xz"),
                initramfs.clone(),
            ),
    );
    let built = reg.push_image(REPO, &image, None);
    Version {
        built,
        arch: arch.into(),
        kernel,
        initramfs,
    }
}

/// An arm64 version with fake (format-valid) boot files of about `len` bytes each.
fn push_version(reg: &Registry, seed: u64, len: usize) -> Version {
    push_files(
        reg,
        "arm64",
        seed,
        fake_kernel("arm64", seed * 2, len),
        fake_initramfs(seed * 2 + 1, len),
    )
}

fn move_tag_to(reg: &Registry, tag: &str, v: &Version) {
    reg.push_manifest(REPO, tag, v.built.media_type, &v.built.manifest);
}

fn move_tag(reg: &Registry, v: &Version) {
    move_tag_to(reg, TAG, v)
}

fn catalog(versions: &[&Version]) -> Catalog {
    versions
        .iter()
        .map(|v| (v.hex().to_string(), v.files()))
        .collect()
}

fn reference(reg: &Registry, tag: &str) -> String {
    format!("{}/{REPO}:{tag}", reg.host())
}

fn profile_toml(path: &Path) -> String {
    format!("[target.profile]\npath = {}", q(path.to_str().unwrap()))
}

/// One `demo`-preset target `talos` (linux/ARCH) into `dest`, interval 1h (syncs only when
/// asked), `assets_root` = `<work>/assets`, and the profile when given.
fn config_for(
    reg: &Registry,
    work: &Work,
    dest: &Path,
    arch: &str,
    profile: Option<&Path>,
) -> Config {
    let mut t = TargetCfg::new(NAME, &reference(reg, TAG), dest)
        .platform(&format!("linux/{arch}"))
        .preset("demo");
    if let Some(p) = profile {
        t = t.extra(&profile_toml(p));
    }
    let assets = work.path().join("assets");
    Config::new()
        .interval("1h")
        .registry(&reg.host())
        .extra_top(&format!("assets_root = {}", q(assets.to_str().unwrap())))
        .target(t)
}

fn base_config(reg: &Registry, work: &Work, dest: &Path, profile: Option<&Path>) -> Config {
    config_for(reg, work, dest, "arm64", profile)
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// `dest` serves `v` completely (files, manifest, links) and holds no staging or temp debris.
#[track_caller]
fn assert_serving(dest: &Path, v: &Version, catalog: &Catalog) {
    let names = [v.kernel_name(), v.initrd_name()];
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let served = check_served(dest, &names, catalog).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(served.hex, v.hex(), "version served from {dest:?}");
    let left = debris(dest);
    assert!(left.is_empty(), "debris in {dest:?}: {left:?}");
    assert!(
        served.stray.is_empty(),
        "stray files in the served version: {:?}",
        served.stray
    );
}

#[track_caller]
fn assert_profile_at(profile: &Path, dest: &Path, v: &Version, catalog: &Catalog) {
    let hex =
        check_profile(profile, dest, "/assets/talos", catalog).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(hex, v.hex(), "version the profile {profile:?} points at");
}

fn sync(work: &Work, config: &Path) -> Outcome {
    work.sync_once(config)
}

#[track_caller]
fn sync_ok(work: &Work, config: &Path) -> Outcome {
    let out = work.sync_once(config);
    out.assert_success();
    out
}

/// Flips one byte in the middle of `path`, keeping its size (and inode).
fn corrupt_in_place(path: &Path) {
    let mut data = fs::read(path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x5A;
    fs::write(path, &data).unwrap();
}

fn hexes(vs: &[&Version]) -> BTreeSet<String> {
    vs.iter().map(|v| v.hex().to_string()).collect()
}

/// Manifest requests (HEAD or GET) the registry has served for `REPO` so far.
fn manifest_requests(reg: &Registry) -> usize {
    let path = format!("/v2/{REPO}/manifests/");
    reg.requests("HEAD", &path).len() + reg.requests("GET", &path).len()
}

// ---------------------------------------------------------------------------------------------
// 1. Concurrent readers
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    stable_downloads: AtomicU64,
    profile_downloads: AtomicU64,
    pairs: AtomicU64,
    errors: AtomicU64,
    seen: Mutex<BTreeSet<usize>>,
    seen_by_profile: Mutex<BTreeSet<usize>>,
    first_errors: Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_errors.lock().unwrap();
        if first.len() < 20 {
            first.push(e);
        }
    }
}

fn fetch(url: &str) -> Result<Vec<u8>, String> {
    match http::request("GET", url, &[], &[], Duration::from_secs(20)) {
        Ok(r) if r.status == 200 => Ok(r.body),
        Ok(r) => Err(format!("GET {url}: HTTP {}", r.status)),
        Err(e) => Err(format!("GET {url}: {e}")),
    }
}

struct ReaderCx<'a> {
    nginx: &'a Nginx,
    profile: &'a Path,
    versions: &'a [Version],
    /// sha256 -> (version index, published name)
    by_sha: &'a HashMap<String, (usize, &'static str)>,
    stop: &'a AtomicBool,
    tally: &'a Tally,
}

/// What a booting node does, in a loop: (a) the stable names; (b) the profile, then the
/// kernel and every initrd it names.
fn reader(cx: &ReaderCx) {
    let t = cx.tally;
    let lookup = |data: &[u8]| cx.by_sha.get(&sha256_hex(data)).copied();
    while !cx.stop.load(Ordering::Relaxed) {
        for name in NAMES {
            match fetch(&cx.nginx.url(&format!("/assets/talos/{name}"))) {
                Ok(data) => {
                    t.stable_downloads.fetch_add(1, Ordering::Relaxed);
                    match lookup(&data) {
                        Some((v, n)) if n == name => {
                            t.seen.lock().unwrap().insert(v);
                        }
                        Some((v, n)) => t.error(format!("stable {name} served {n} of v{v}")),
                        None => t.error(format!(
                            "stable {name}: {} bytes that match no published file",
                            data.len()
                        )),
                    }
                }
                Err(e) => t.error(e),
            }
        }

        let doc: Value = match fs::read(cx.profile)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(d) => d,
            Err(e) => {
                t.error(format!("profile {:?}: {e}", cx.profile));
                continue;
            }
        };
        let mut urls = vec![doc["boot"]["kernel"]
            .as_str()
            .unwrap_or_default()
            .to_string()];
        for u in doc["boot"]["initrd"].as_array().into_iter().flatten() {
            urls.push(u.as_str().unwrap_or_default().to_string());
        }
        let mut got = Vec::new();
        for url in &urls {
            let Some((hex, name)) = url
                .strip_prefix("/assets/talos/versions/")
                .and_then(|r| r.split_once('/'))
            else {
                t.error(format!("profile URL {url:?} is not version-specific"));
                continue;
            };
            match fetch(&cx.nginx.url(url)) {
                Ok(data) => {
                    t.profile_downloads.fetch_add(1, Ordering::Relaxed);
                    match lookup(&data) {
                        Some((v, n)) if n == name && cx.versions[v].hex() == hex => got.push(v),
                        Some((v, n)) => t.error(format!(
                            "{url} served {n} of v{v} ({})",
                            cx.versions[v].hex()
                        )),
                        None => t.error(format!(
                            "{url}: {} bytes that match no published file",
                            data.len()
                        )),
                    }
                }
                Err(e) => t.error(e),
            }
        }
        if got.len() == urls.len() {
            if got.iter().all(|v| *v == got[0]) {
                t.pairs.fetch_add(1, Ordering::Relaxed);
                t.seen_by_profile.lock().unwrap().insert(got[0]);
            } else {
                t.error(format!(
                    "profile pair from different versions: {got:?} ({urls:?})"
                ));
            }
        }
    }
}

#[test]
fn concurrent_readers_always_get_whole_versions_while_55_are_published() {
    nginx::require();
    let started = Instant::now();
    const N: usize = 55;
    const READERS: usize = 8;
    let reg = Registry::start();
    let work = Work::new();
    // nginx workers run as nobody: the scratch dir (0700 from tempfile) must be traversable.
    set_mode(work.path(), 0o755);
    let assets = work.path().join("assets");
    fs::create_dir_all(&assets).unwrap();
    set_mode(&assets, 0o755);
    let dest = assets.join("talos");
    let profile = work.path().join("profiles/talos.json");

    let versions: Vec<Version> = (0..N)
        .map(|i| push_version(&reg, 1000 + i as u64, SMALL))
        .collect();
    let mut by_sha: HashMap<String, (usize, &'static str)> = HashMap::new();
    for (i, v) in versions.iter().enumerate() {
        assert!(by_sha
            .insert(sha256_hex(&v.kernel), (i, KERNEL_NAME))
            .is_none());
        assert!(by_sha
            .insert(sha256_hex(&v.initramfs), (i, INITRD_NAME))
            .is_none());
    }

    move_tag(&reg, &versions[0]);
    // retain is small, but the default grace (30m) keeps every version a profile has named.
    let cfg = base_config(&reg, &work, &dest, Some(&profile)).retain(2);
    let config = work.config(&cfg);
    let mut daemon = Launch::new().spawn_run(&config, &cfg.listen, &work.path().join("run.log"));
    daemon.wait_published(NAME, versions[0].digest(), Duration::from_secs(60));

    let nginx = Nginx::start(&assets);
    let first = fetch(&nginx.url(&format!("/assets/talos/{KERNEL_NAME}")))
        .unwrap_or_else(|e| panic!("{e}; nginx error log:\n{}", nginx.error_log_tail()));
    assert!(first == versions[0].kernel, "nginx serves the first kernel");

    let stop = AtomicBool::new(false);
    let tally = Tally::default();
    let cx = ReaderCx {
        nginx: &nginx,
        profile: &profile,
        versions: &versions,
        by_sha: &by_sha,
        stop: &stop,
        tally: &tally,
    };
    let publish_started = Instant::now();
    std::thread::scope(|s| {
        let readers: Vec<_> = (0..READERS).map(|_| s.spawn(|| reader(&cx))).collect();
        let driven = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for v in &versions[1..] {
                move_tag(&reg, v);
                daemon.trigger_sync(NAME);
                daemon.wait_published(NAME, v.digest(), Duration::from_secs(30));
            }
            // Let the readers see the last version too.
            std::thread::sleep(Duration::from_millis(300));
        }));
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().expect("reader thread panicked");
        }
        if let Err(p) = driven {
            std::panic::resume_unwind(p);
        }
    });
    let publish_time = publish_started.elapsed();

    let stable = tally.stable_downloads.load(Ordering::Relaxed);
    let through_profile = tally.profile_downloads.load(Ordering::Relaxed);
    let pairs = tally.pairs.load(Ordering::Relaxed);
    let errors = tally.errors.load(Ordering::Relaxed);
    let seen = tally.seen.lock().unwrap().len();
    let seen_by_profile = tally.seen_by_profile.lock().unwrap().len();
    println!(
        "concurrent readers: {N} versions published in {publish_time:.1?} with {READERS} readers; \
         downloads: {} ({stable} by stable name, {through_profile} through the profile); \
         versions seen: {seen} by stable name, {seen_by_profile} through the profile; \
         pairs checked: {pairs}; errors: {errors}",
        stable + through_profile
    );
    assert_eq!(
        errors,
        0,
        "readers saw errors (first ones):\n{}\nnginx error log:\n{}",
        tally.first_errors.lock().unwrap().join("\n"),
        nginx.error_log_tail()
    );
    assert!(pairs >= 50, "only {pairs} profile pairs checked");
    assert!(
        seen_by_profile >= 10 && seen >= 10,
        "readers overlapped too few publishes ({seen_by_profile} versions through the profile, \
         {seen} by stable name)"
    );

    let all: Vec<&Version> = versions.iter().collect();
    let catalog = catalog(&all);
    let last = versions.last().unwrap();
    assert_serving(&dest, last, &catalog);
    assert_profile_at(&profile, &dest, last, &catalog);
    // Within the grace period nothing a profile named may go, whatever `retain` says.
    assert_eq!(
        common::versions(&dest),
        hexes(&all),
        "versions kept within the grace period"
    );
    println!("concurrent readers: total {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 2. Crash (kill -9) during sync and publish
// ---------------------------------------------------------------------------------------------

/// The last publish step a killed process reached, from its debug log.
fn last_phase(log: &str) -> String {
    if log.contains("published new version") {
        return "after publish".into();
    }
    log.lines()
        .rev()
        .find_map(|l| {
            let at = l.find("point=")?;
            Some(l[at + 6..].trim().trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "before writing".into())
}

/// Waits until the process has logged `k` test pauses (true), or has exited (false).
fn wait_for_pauses(p: &mut Proc, k: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if p.log().matches("test pause").count() >= k {
            return true;
        }
        if p.try_wait().is_some() {
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "no pause #{k} within 60 s; log:\n{}",
            p.log_tail()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn kill_9_during_sync_and_publish_always_leaves_one_complete_version() {
    let started = Instant::now();
    const IMAGES: usize = 8;
    const WANT_KILLS: usize = 55;
    const PAUSE_MS: u64 = 30;
    let reg = Registry::start();
    let work = Work::new();
    let dest = work.dest("talos");
    let profile = work.path().join("profiles/talos.json");
    let versions: Vec<Version> = (0..IMAGES)
        .map(|i| push_version(&reg, 2000 + i as u64, 32_000))
        .collect();
    let catalog = catalog(&versions.iter().collect::<Vec<_>>());
    // retain 2 and no grace: pruning happens at every publish (and can be interrupted too).
    let cfg = base_config(&reg, &work, &dest, Some(&profile))
        .retain(2)
        .grace("0s");
    let config = work.config(&cfg);
    let paused = Launch::new().pause_ms(PAUSE_MS);
    let logs = work.path().join("logs");
    fs::create_dir_all(&logs).unwrap();

    move_tag(&reg, &versions[0]);
    sync_ok(&work, &config);
    assert_serving(&dest, &versions[0], &catalog);

    // How long a paused publish takes, and when its first write starts: kills land mostly in
    // between (some earlier, during start-up and the registry requests).
    move_tag(&reg, &versions[1]);
    let calib_log = logs.join("calibrate.log");
    let t0 = Instant::now();
    let mut calib = paused.spawn(&config, &["sync", "--once"], &calib_log);
    let mut first_write = None;
    let status = loop {
        if first_write.is_none() && calib.log().contains("point=\"writing\"") {
            first_write = Some(t0.elapsed());
        }
        if let Some(st) = calib.try_wait() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "calibration sync hangs"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let window = t0.elapsed();
    assert!(
        status.success(),
        "calibration sync failed:\n{}",
        calib.log()
    );
    let first_write = first_write.expect("no \"writing\" pause logged: is the test hook gone?");
    // writing (one per file), staged, committed, switched, pruning
    let pauses = calib.log().matches("test pause").count();
    assert!(
        pauses >= 6,
        "{pauses} pauses in a publish:\n{}",
        calib.log()
    );
    let pause = Duration::from_millis(PAUSE_MS);
    assert_serving(&dest, &versions[1], &catalog);
    let mut cur = 1;

    let mut iterations = 0;
    let mut kills_during = 0;
    let mut kills_idle = 0;
    let mut finished_first = 0;
    let mut left_old = 0;
    let mut left_new = 0;
    let mut left_debris = 0;
    let mut recovered_by_run = 0;
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    let mut not_removed: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(150);
    while kills_during < WANT_KILLS {
        assert!(
            Instant::now() < deadline && iterations < 300,
            "only {kills_during} kills during a sync after {iterations} iterations"
        );
        iterations += 1;
        let next = (cur + 1) % IMAGES;
        let (old, new) = (&versions[cur], &versions[next]);
        move_tag(&reg, new);

        // The victim: mostly `sync --once`, every fourth time the daemon (startup recovery,
        // then the sync).
        let as_daemon = iterations % 4 == 0;
        let log = logs.join(format!("victim-{iterations}.log"));
        let mut victim = if as_daemon {
            paused.spawn_run(&config, &cfg.listen, &log)
        } else {
            paused.spawn(&config, &["sync", "--once"], &log)
        };
        // Where to kill: k = 0 at a random moment before the first write (start-up, startup
        // recovery, registry requests, layer download); k >= 1 once the k-th publish step has
        // begun, plus 0.5 to 1.5 pauses: about half land inside the pause, half in the work
        // that follows it.
        let k = fastrand::usize(0..=pauses);
        let t_spawn = Instant::now();
        if k == 0 {
            std::thread::sleep(first_write.mul_f64(fastrand::f64()));
        } else if wait_for_pauses(&mut victim, k) {
            std::thread::sleep(pause.mul_f64(0.5 + fastrand::f64()));
        }
        let delay = t_spawn.elapsed();
        let phase = if victim.kill9() {
            let phase = last_phase(&victim.log());
            if phase == "after publish" {
                kills_idle += 1;
            } else {
                kills_during += 1;
            }
            *phases.entry(phase.clone()).or_default() += 1;
            phase
        } else {
            finished_first += 1;
            "none (finished first)".to_string()
        };

        // Right after the kill: one complete version, the old or the new one.
        let served = check_served(&dest, &NAMES, &catalog).unwrap_or_else(|e| {
            panic!(
                "after kill #{iterations} ({delay:?} after start): {e}\nvictim log:\n{}",
                victim.log_tail()
            )
        });
        assert!(
            served.hex == old.hex() || served.hex == new.hex(),
            "after kill #{iterations}: serving {}, neither the old nor the new version",
            served.hex
        );
        if served.hex == old.hex() {
            left_old += 1;
        } else {
            left_new += 1;
        }
        let in_profile = check_profile(&profile, &dest, "/assets/talos", &catalog)
            .unwrap_or_else(|e| panic!("after kill #{iterations}: {e}"));
        assert!(
            in_profile == old.hex() || in_profile == new.hex(),
            "after kill #{iterations}: the profile names {in_profile}"
        );
        if !debris(&dest).is_empty() || !served.stray.is_empty() {
            left_debris += 1;
        }

        // Start again: recovery clears the debris and the sync publishes the tag's image.
        if iterations % 5 == 0 {
            recovered_by_run += 1;
            let mut d = Launch::new().spawn_run(
                &config,
                &cfg.listen,
                &logs.join(format!("recover-{iterations}.log")),
            );
            d.wait_published(NAME, new.digest(), Duration::from_secs(60));
            d.terminate();
        } else {
            sync_ok(&work, &config);
        }
        let served = check_served(&dest, &NAMES, &catalog)
            .unwrap_or_else(|e| panic!("after recovery from kill #{iterations}: {e}"));
        assert_eq!(
            served.hex,
            new.hex(),
            "after recovery from kill #{iterations}"
        );
        assert_profile_at(&profile, &dest, new, &catalog);
        // Debris that survived the restart is collected (and cleared, so later kills are
        // judged on their own) and reported at the end.
        let left = debris(&dest);
        if !left.is_empty() {
            not_removed.push(format!("kill #{iterations} (phase {phase}): {left:?}"));
            for p in &left {
                let _ = fs::remove_dir_all(p).or_else(|_| fs::remove_file(p));
            }
        }
        cur = next;
    }
    // Temp files of interrupted profile rewrites (not served: matchbox reads `<id>.json`).
    let profile_temps = entries(profile.parent().unwrap()).len() - 1;
    println!(
        "crash: {iterations} runs, {kills_during} SIGKILLs during a sync/publish, {kills_idle} \
         after it had published (daemon idle), {finished_first} finished before the kill; \
         left serving the old version {left_old}x, the new one {left_new}x; debris left by \
         {left_debris} kills, {} of them not removed by the next start; {recovered_by_run} \
         recoveries by `run`; kills by phase reached: {phases:?}; temp files left beside the \
         profile (never removed): {profile_temps}; calibration: first write {first_write:.0?} \
         after start, publish done after {window:.0?}; total {:.1?}",
        not_removed.len(),
        started.elapsed()
    );
    assert!(
        not_removed.is_empty(),
        "debris that recovery (the next `sync --once` or `run`) did not remove:\n{}",
        not_removed.join("\n")
    );
    assert!(
        left_old > 0 && left_new > 0,
        "kills never landed on both sides of the switch"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Disk full
// ---------------------------------------------------------------------------------------------

#[test]
fn disk_full_fails_cleanly_and_the_old_version_keeps_serving() {
    let started = Instant::now();
    let work = Work::new();
    let mnt = work.path().join("mnt");
    // Declared after `work`, so it is unmounted before the scratch dir is removed.
    let tmpfs = match Tmpfs::mount(&mnt, "4m") {
        Ok(t) => t,
        Err(e) => {
            println!("skipped: cannot mount tmpfs: {e}");
            return;
        }
    };
    let reg = Registry::start();
    let dest = mnt.join("talos");
    let cfg = config_for(&reg, &work, &dest, "amd64", None);
    let config = work.config(&cfg);

    let v1 = push_files(
        &reg,
        "amd64",
        1,
        fake_kernel("amd64", 11, 40_000),
        fake_initramfs(12, 40_000),
    );
    move_tag(&reg, &v1);
    sync_ok(&work, &config);
    let mut catalog = catalog(&[&v1]);
    assert_serving(&dest, &v1, &catalog);

    // Leave about 1.5 MB free.
    let filler = mnt.join("filler");
    let filler_len = tmpfs.free() - 1_500_000;
    fs::write(&filler, vec![0x55u8; filler_len as usize]).unwrap();
    let free_before = tmpfs.free();
    assert!(
        (1_200_000..=1_800_000).contains(&free_before),
        "{free_before} bytes free"
    );

    // (a) Up-front check: a 2.5 MB incompressible kernel; the top layer alone is too big.
    let big = push_files(
        &reg,
        "amd64",
        2,
        fake_kernel("amd64", 21, 2_500_000),
        fake_initramfs(22, 40_000),
    );
    assert!(big.built.layers.last().unwrap().blob.len() as u64 > free_before);
    move_tag(&reg, &big);
    let out = sync(&work, &config);
    out.assert_code(1).assert_stderr_has(&["bytes free"]);
    assert_serving(&dest, &v1, &catalog);
    assert_eq!(versions(&dest), hexes(&[&v1]));

    // (b) ENOSPC part way: 2.4 MB of files in a layer of a few KB (zeros compress), so the
    // up-front estimate passes and the write fails.
    let zeros = push_files(
        &reg,
        "amd64",
        3,
        common::served::compressible_bzimage(31, 1_200_000),
        common::served::compressible_cpio(32, 1_200_000),
    );
    let layer = zeros.built.layers.last().unwrap().blob.len() as u64;
    assert!(layer < 100_000, "compressible layer is {layer} bytes");
    move_tag(&reg, &zeros);
    let out = sync(&work, &config);
    out.assert_code(1)
        .assert_stderr_has_any(&["No space left on device", "os error 28"]);
    assert_serving(&dest, &v1, &catalog);
    assert_eq!(versions(&dest), hexes(&[&v1]));
    let free_after = tmpfs.free();
    assert!(
        free_after + 16_384 >= free_before,
        "the failed sync left space in use: {free_before} bytes free before, {free_after} after"
    );

    // Free the space: the same tag now publishes.
    fs::remove_file(&filler).unwrap();
    let out = sync_ok(&work, &config);
    assert!(out.stdout.contains("published"), "{}", out.describe());
    catalog.insert(zeros.hex().to_string(), zeros.files());
    assert_serving(&dest, &zeros, &catalog);
    assert_eq!(versions(&dest), hexes(&[&v1, &zeros]));
    println!(
        "disk full: up-front check and ENOSPC both left {} serving; total {:.1?}",
        v1.hex(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Rollback, pins, retention, profiles, permissions, recovery, self-repair
// ---------------------------------------------------------------------------------------------

#[test]
fn rollback_pin_and_unpin_from_the_cli() {
    let started = Instant::now();
    let reg = Registry::start();
    let work = Work::new();
    let dest = work.dest("talos");
    let profile = work.path().join("profiles/talos.json");
    let vs: Vec<Version> = (1..=4)
        .map(|i| push_version(&reg, 3000 + i, SMALL))
        .collect();
    let catalog = catalog(&vs.iter().collect::<Vec<_>>());
    let cfg = base_config(&reg, &work, &dest, Some(&profile));
    let config = work.config(&cfg);
    let pin_file = work.path().join("state/pins/talos.json");
    for v in &vs[..3] {
        move_tag(&reg, v);
        sync_ok(&work, &config);
    }
    assert_serving(&dest, &vs[2], &catalog);

    // Default: the version before the current one.
    let out = work.run(&config, &["rollback", NAME]);
    out.assert_success();
    assert!(
        out.stdout.contains(vs[1].digest()) && out.stdout.contains("pinned"),
        "{}",
        out.describe()
    );
    assert_serving(&dest, &vs[1], &catalog);
    assert_profile_at(&profile, &dest, &vs[1], &catalog);
    assert!(pin_file.is_file(), "no pin at {pin_file:?}");

    // Pinned: the tag moves, the sync does not even ask the registry.
    move_tag(&reg, &vs[3]);
    let asked = manifest_requests(&reg);
    let out = sync_ok(&work, &config);
    assert!(out.stdout.contains("pinned"), "{}", out.describe());
    assert_eq!(
        manifest_requests(&reg),
        asked,
        "a pinned sync asked the registry"
    );
    assert_serving(&dest, &vs[1], &catalog);

    // --to a hex prefix, and a full digest.
    let out = work.run(&config, &["rollback", NAME, "--to", &vs[0].hex()[..12]]);
    out.assert_success();
    assert_serving(&dest, &vs[0], &catalog);
    assert_profile_at(&profile, &dest, &vs[0], &catalog);
    let out = work.run(&config, &["rollback", NAME, "--to", vs[2].digest()]);
    out.assert_success();
    assert_serving(&dest, &vs[2], &catalog);

    // No such version: an error naming what is retained; nothing changes.
    let out = work.run(&config, &["rollback", NAME, "--to", "0000deadbeef"]);
    out.assert_code(1)
        .assert_stderr_has(&["no retained version", vs[0].hex()]);
    assert_serving(&dest, &vs[2], &catalog);

    // The files are re-hashed before switching: a same-size corruption is refused.
    corrupt_in_place(&dest.join("versions").join(vs[1].hex()).join(KERNEL_NAME));
    let out = work.run(&config, &["rollback", NAME, "--to", vs[1].hex()]);
    out.assert_code(1)
        .assert_stderr_has(&["sha256", vs[1].hex()]);
    assert_serving(&dest, &vs[2], &catalog);

    // Unpin: the target follows the tag again at once (the same sync a daemon runs next).
    let out = work.run(&config, &["unpin", NAME]);
    out.assert_success();
    assert!(out.stdout.contains("unpinned"), "{}", out.describe());
    assert!(!pin_file.exists(), "pin file still there");
    assert!(
        out.stdout.contains("published") && out.stdout.contains(vs[3].digest()),
        "{}",
        out.describe()
    );
    let out = sync_ok(&work, &config);
    assert!(out.stdout.contains("up to date"), "{}", out.describe());
    assert_serving(&dest, &vs[3], &catalog);
    assert_profile_at(&profile, &dest, &vs[3], &catalog);
    let out = work.run(&config, &["unpin", NAME]);
    out.assert_success();
    assert!(out.stdout.contains("was not pinned"), "{}", out.describe());

    // A config change of the target lifts the pin.
    work.run(&config, &["rollback", NAME, "--to", vs[2].hex()])
        .assert_success();
    assert!(pin_file.is_file());
    move_tag_to(&reg, "stable2", &vs[3]);
    let mut changed = cfg.clone();
    changed.targets[0].reference = reference(&reg, "stable2");
    let config = work.config(&changed);
    let out = sync_ok(&work, &config);
    assert!(!out.stdout.contains("pinned"), "{}", out.describe());
    assert!(!pin_file.exists(), "the pin survived a config change");
    assert_serving(&dest, &vs[3], &catalog);
    println!("rollback (CLI): total {:.1?}", started.elapsed());
}

/// `bootsync_syncs_total{...result="pinned"...}` from `/metrics`, summed.
fn pinned_syncs(d: &Proc) -> u64 {
    let r = http::get(&format!("{}/metrics", d.base)).expect("GET /metrics");
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("syncs") && l.contains("\"pinned\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn rollback_pin_and_unpin_over_the_api() {
    let started = Instant::now();
    let reg = Registry::start();
    let work = Work::new();
    let dest = work.dest("talos");
    let profile = work.path().join("profiles/talos.json");
    let vs: Vec<Version> = (1..=3)
        .map(|i| push_version(&reg, 4000 + i, SMALL))
        .collect();
    let catalog = catalog(&vs.iter().collect::<Vec<_>>());
    let cfg = base_config(&reg, &work, &dest, Some(&profile));
    let config = work.config(&cfg);
    for v in &vs[..2] {
        move_tag(&reg, v);
        sync_ok(&work, &config);
    }
    let mut d = Launch::new().spawn_run(&config, &cfg.listen, &work.path().join("run.log"));
    d.wait_published(NAME, vs[1].digest(), Duration::from_secs(30));

    // No body: the version before the current one.
    let r = d.post(&format!("/targets/{NAME}/rollback"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["digest"], vs[0].digest());
    assert_eq!(body["pinned"], true);
    let t = d.wait_target(NAME, "pinned to v1", Duration::from_secs(5), |t| {
        t["pinned"] == vs[0].digest()
    });
    assert_eq!(t["published"]["digest"], vs[0].digest());
    assert_serving(&dest, &vs[0], &catalog);
    assert_profile_at(&profile, &dest, &vs[0], &catalog);

    // A requested sync of a pinned target: no registry traffic, nothing changes.
    move_tag(&reg, &vs[2]);
    let asked = manifest_requests(&reg);
    let before = pinned_syncs(&d);
    d.trigger_sync(NAME);
    let deadline = Instant::now() + Duration::from_secs(15);
    while pinned_syncs(&d) <= before {
        assert!(
            Instant::now() < deadline,
            "no pinned sync counted; log:\n{}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        manifest_requests(&reg),
        asked,
        "a pinned sync asked the registry"
    );
    let st = d.wait_target(NAME, "ok", Duration::from_secs(5), |t| t["state"] == "ok");
    assert_eq!(st["pinned"], vs[0].digest());
    assert_serving(&dest, &vs[0], &catalog);

    // {"to": hex prefix}
    let r = d.post(
        &format!("/targets/{NAME}/rollback"),
        Some(&json!({"to": &vs[1].hex()[..10]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["digest"], vs[1].digest());
    assert_serving(&dest, &vs[1], &catalog);
    d.wait_target(NAME, "pinned to v2", Duration::from_secs(5), |t| {
        t["pinned"] == vs[1].digest() && t["published"]["digest"] == vs[1].digest()
    });

    // Errors: no such version (409, naming it), no such target (404).
    let r = d.post(
        &format!("/targets/{NAME}/rollback"),
        Some(&json!({"to": "ffffffffffff"})),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("no retained version"), "{}", r.text());
    assert_eq!(d.post("/targets/nope/rollback", None).status, 404);
    assert_eq!(d.post("/targets/nope/unpin", None).status, 404);
    assert_serving(&dest, &vs[1], &catalog);

    // Unpin: follows the tag again (at once: unpin triggers a sync).
    let r = d.post(&format!("/targets/{NAME}/unpin"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["was_pinned"], true);
    let t = d.wait_published(NAME, vs[2].digest(), Duration::from_secs(30));
    assert!(t["pinned"].is_null(), "still pinned: {t}");
    assert_serving(&dest, &vs[2], &catalog);
    assert_profile_at(&profile, &dest, &vs[2], &catalog);
    assert!(!work.path().join("state/pins/talos.json").exists());
    d.terminate();
    println!("rollback (API): total {:.1?}", started.elapsed());
}

#[test]
fn grace_period_keeps_recently_retired_versions_beyond_retain() {
    let started = Instant::now();
    let reg = Registry::start();
    let work = Work::new();
    let dest = work.dest("talos");
    let vs: Vec<Version> = (1..=6)
        .map(|i| push_version(&reg, 5000 + i, SMALL))
        .collect();
    let catalog = catalog(&vs.iter().collect::<Vec<_>>());

    // retain 1, grace 1h: nothing that was current a moment ago goes.
    let config = work.config(&base_config(&reg, &work, &dest, None).retain(1).grace("1h"));
    for (i, v) in vs[..3].iter().enumerate() {
        move_tag(&reg, v);
        sync_ok(&work, &config);
        let kept: Vec<&Version> = vs[..=i].iter().collect();
        assert_eq!(versions(&dest), hexes(&kept), "grace 1h after v{}", i + 1);
    }
    assert_serving(&dest, &vs[2], &catalog);

    // grace 0s: only `retain` (1) stays, at every publish.
    let config = work.config(&base_config(&reg, &work, &dest, None).retain(1).grace("0s"));
    for v in &vs[3..] {
        move_tag(&reg, v);
        sync_ok(&work, &config);
        assert_eq!(versions(&dest), hexes(&[v]), "grace 0s");
        assert_serving(&dest, v, &catalog);
    }
    println!("grace: total {:.1?}", started.elapsed());
}

#[test]
fn profile_rewrite_keeps_every_other_field_and_a_missing_profile_is_made_from_the_template() {
    let started = Instant::now();
    let reg = Registry::start();
    let work = Work::new();
    let dest = work.dest("talos");
    let dest2 = work.dest("custom");
    let profiles = work.path().join("profiles");
    fs::create_dir_all(&profiles).unwrap();
    let profile = profiles.join("talos.json");
    let made = profiles.join("made.json");
    let original = json!({
        "id": "talos-nodes",
        "name": "Talos (arm64)",
        "boot": {
            "kernel": "/assets/talos/vmlinuz-arm64",
            "initrd": ["/assets/talos/initramfs-arm64.xz"],
            "args": [
                "initrd=initramfs-arm64.xz",
                "talos.platform=metal",
                "console=ttyAMA0",
                "talos.config=http://127.0.0.1:8080/assets/config.yaml"
            ],
            "custom_boot_field": {"nested": [1, 2, {"deep": null}]}
        },
        "generic_id": "talos-generic",
        "cloud_id": "",
        "x_operator_note": "keep me, é ünïcode"
    });
    fs::write(&profile, serde_json::to_vec_pretty(&original).unwrap()).unwrap();

    let vs: Vec<Version> = (1..=2)
        .map(|i| push_version(&reg, 6000 + i, SMALL))
        .collect();
    let catalog = catalog(&vs.iter().collect::<Vec<_>>());
    let template = format!(
        "[target.profile]\npath = {}\nurl_prefix = \"/boot/custom/\"\nid = \"made-id\"\n\
         name = \"Made from the template\"\nargs = [\"talos.platform=metal\", \"console=ttyS0\"]",
        q(made.to_str().unwrap())
    );
    let cfg = base_config(&reg, &work, &dest, Some(&profile)).target(
        TargetCfg::new("custom", &reference(&reg, TAG), &dest2)
            .platform("linux/arm64")
            .preset("demo")
            .extra(&template),
    );
    let config = work.config(&cfg);

    for v in &vs {
        move_tag(&reg, v);
        sync_ok(&work, &config);
        let text = fs::read_to_string(&profile).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        let mut want = original.clone();
        want["boot"]["kernel"] = json!(format!("/assets/talos/versions/{}/{KERNEL_NAME}", v.hex()));
        want["boot"]["initrd"] =
            json!([format!("/assets/talos/versions/{}/{INITRD_NAME}", v.hex())]);
        assert_eq!(doc, want, "rewritten profile:\n{text}");
        let keys = |d: &Value| d.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&doc), keys(&original), "top-level key order");
        assert_eq!(
            keys(&doc["boot"]),
            keys(&original["boot"]),
            "boot key order"
        );
        assert_profile_at(&profile, &dest, v, &catalog);
        assert_eq!(mode(&profile), 0o644, "profile mode");

        let doc: Value = serde_json::from_slice(&fs::read(&made).unwrap()).unwrap();
        assert_eq!(
            doc,
            json!({
                "id": "made-id",
                "name": "Made from the template",
                "boot": {
                    "kernel": format!("/boot/custom/versions/{}/{KERNEL_NAME}", v.hex()),
                    "initrd": [format!("/boot/custom/versions/{}/{INITRD_NAME}", v.hex())],
                    "args": ["talos.platform=metal", "console=ttyS0"],
                }
            })
        );
        assert_serving(&dest2, v, &catalog);
    }
    // Atomic rewrites leave no temp files beside the profiles.
    assert_eq!(
        entries(&profiles),
        ["made.json".to_string(), "talos.json".to_string()].into()
    );
    println!("profile rewrite: total {:.1?}", started.elapsed());
}

#[test]
fn a_profile_that_is_not_valid_json_fails_the_sync_and_is_left_untouched() {
    let started = Instant::now();
    let reg = Registry::start();
    let work = Work::new();
    let dest = work.dest("talos");
    let profiles = work.path().join("profiles");
    fs::create_dir_all(&profiles).unwrap();
    let profile = profiles.join("talos.json");
    // Cut off mid-way, as an editor crash or a full disk might leave it.
    let broken: &[u8] = br#"{"id": "talos", "boot": {"kernel": "/assets/talos/vmlinuz-arm64", "#;
    fs::write(&profile, broken).unwrap();
    let mtime = fs::metadata(&profile).unwrap().modified().unwrap();
    let v = push_version(&reg, 7001, SMALL);
    let catalog = catalog(&[&v]);
    move_tag(&reg, &v);
    let config = work.config(&base_config(&reg, &work, &dest, Some(&profile)));

    std::thread::sleep(Duration::from_millis(20));
    let out = sync(&work, &config);
    out.assert_code(1)
        .assert_stderr_has(&["not valid JSON", profile.to_str().unwrap()]);
    assert_eq!(fs::read(&profile).unwrap(), broken, "profile bytes changed");
    assert_eq!(fs::metadata(&profile).unwrap().modified().unwrap(), mtime);
    assert_eq!(entries(&profiles), ["talos.json".to_string()].into());

    // Fixed by hand: the next sync points it at the version.
    fs::write(
        &profile,
        br#"{"id": "talos", "boot": {"args": ["console=ttyAMA0"]}}"#,
    )
    .unwrap();
    sync_ok(&work, &config);
    assert_profile_at(&profile, &dest, &v, &catalog);
    let doc: Value = serde_json::from_slice(&fs::read(&profile).unwrap()).unwrap();
    assert_eq!(doc["boot"]["args"], json!(["console=ttyAMA0"]));
    assert_serving(&dest, &v, &catalog);
    println!("invalid profile: total {:.1?}", started.elapsed());
}

/// Directory and file modes of everything bootsync made for version `v`.
#[track_caller]
fn assert_modes(work: &Work, dest: &Path, profile: &Path, v: &Version) {
    let vdir = dest.join("versions").join(v.hex());
    for dir in [
        work.path().join("assets"),
        dest.to_path_buf(),
        dest.join("versions"),
        vdir.clone(),
        profile.parent().unwrap().to_path_buf(),
    ] {
        assert_eq!(mode(&dir), 0o755, "mode of directory {dir:?}");
    }
    for f in [
        vdir.join(KERNEL_NAME),
        vdir.join(INITRD_NAME),
        vdir.join(".bootsync.json"),
        profile.to_path_buf(),
    ] {
        assert_eq!(mode(&f), 0o644, "mode of {f:?}");
    }
}

#[test]
fn published_modes_ignore_a_umask_of_077() {
    let started = Instant::now();
    let reg = Registry::start();
    let work = Work::new();
    let dest = work.dest("talos");
    let profile = work.path().join("profiles/talos.json");
    let vs: Vec<Version> = (1..=2)
        .map(|i| push_version(&reg, 8000 + i, SMALL))
        .collect();
    let catalog = catalog(&vs.iter().collect::<Vec<_>>());
    let cfg = base_config(&reg, &work, &dest, Some(&profile));
    let config = work.config(&cfg);
    let umask = Launch::new().umask(0o077);

    move_tag(&reg, &vs[0]);
    umask
        .run(&config, &["sync", "--once"], Duration::from_secs(60))
        .assert_success();
    assert_serving(&dest, &vs[0], &catalog);
    assert_modes(&work, &dest, &profile, &vs[0]);

    // The daemon too.
    move_tag(&reg, &vs[1]);
    let mut d = umask.spawn_run(&config, &cfg.listen, &work.path().join("run.log"));
    d.wait_published(NAME, vs[1].digest(), Duration::from_secs(30));
    assert_serving(&dest, &vs[1], &catalog);
    assert_modes(&work, &dest, &profile, &vs[1]);
    // The wrapper really gave the daemon that umask.
    let status = fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    assert!(line.ends_with("0077"), "daemon {line}");
    d.terminate();
    println!("umask 077: total {:.1?}", started.elapsed());
}

#[test]
fn startup_recovery_falls_back_from_a_damaged_current_version() {
    let started = Instant::now();
    let reg = Registry::start();
    let work = Work::new();
    let dest = work.dest("talos");
    let profile = work.path().join("profiles/talos.json");
    let vs: Vec<Version> = (1..=2)
        .map(|i| push_version(&reg, 9000 + i, SMALL))
        .collect();
    let catalog = catalog(&vs.iter().collect::<Vec<_>>());
    let cfg = base_config(&reg, &work, &dest, Some(&profile));
    let config = work.config(&cfg);
    for v in &vs {
        move_tag(&reg, v);
        sync_ok(&work, &config);
    }
    assert_serving(&dest, &vs[1], &catalog);

    // With the daemon stopped: one byte of the current kernel changes (same size), and a crash
    // left debris behind.
    corrupt_in_place(&dest.join("versions").join(vs[1].hex()).join(KERNEL_NAME));
    fs::create_dir(dest.join(format!(".staging-{}-1-deadbeef", vs[1].hex()))).unwrap();
    fs::write(dest.join(".tmp-current-1-deadbeef"), b"").unwrap();
    // The registry cannot hand the tag out for now, so what serves after start is recovery's
    // doing alone.
    reg.delete_manifest(REPO, vs[1].digest());

    let mut d = Launch::new().spawn_run(&config, &cfg.listen, &work.path().join("run.log"));
    let t = d.wait_target(
        NAME,
        "recovery note and the first sync",
        Duration::from_secs(30),
        |t| !t["recovery"].is_null() && t["last_check"].is_string(),
    );
    let note = t["recovery"].as_str().unwrap();
    assert!(
        note.contains(vs[1].digest()) && note.contains(&format!("fell back to {}", vs[0].digest())),
        "recovery note: {note}"
    );
    assert_eq!(t["published"]["digest"], vs[0].digest(), "{t}");
    assert_serving(&dest, &vs[0], &catalog);
    assert_profile_at(&profile, &dest, &vs[0], &catalog);

    // The tag is back: the next sync must not serve the damaged copy it fell back from.
    move_tag(&reg, &vs[1]);
    d.trigger_sync(NAME);
    let t = d.wait_target(
        NAME,
        "a sync after the tag is back",
        Duration::from_secs(30),
        |t| t["state"] == "ok" && t["published"]["digest"] == vs[1].digest(),
    );
    let served = check_served(&dest, &NAMES, &catalog);
    assert!(
        served.is_ok(),
        "after recovery fell back from the damaged {}, the next sync serves it again: {}\n\
         status: {t}",
        vs[1].digest(),
        served.unwrap_err()
    );
    assert_serving(&dest, &vs[1], &catalog);
    d.terminate();
    println!("startup recovery: total {:.1?}", started.elapsed());
}

#[test]
fn self_repair_restores_deleted_links_and_modified_files() {
    let started = Instant::now();
    let reg = Registry::start();
    let work = Work::new();
    let dest = work.dest("talos");
    let v = push_version(&reg, 10_001, SMALL);
    let catalog = catalog(&[&v]);
    move_tag(&reg, &v);
    let cfg = base_config(&reg, &work, &dest, None);
    let config = work.config(&cfg);
    let mut d = Launch::new().spawn_run(&config, &cfg.listen, &work.path().join("run.log"));
    d.wait_published(NAME, v.digest(), Duration::from_secs(30));
    let limit = Duration::from_secs(10);
    // bootsync ignores events under dest for 2 s after its own writes.
    let settle = Duration::from_millis(2500);
    let repairs = |t: &Value| t["self_repairs"].as_u64().unwrap_or(0);

    std::thread::sleep(settle);
    let link = dest.join(INITRD_NAME);
    fs::remove_file(&link).unwrap();
    let t0 = Instant::now();
    d.wait_target(NAME, "the stable link restored", limit, |t| {
        repairs(t) >= 1 && fs::read(&link).is_ok_and(|b| b == v.initramfs)
    });
    let link_time = t0.elapsed();
    assert_serving(&dest, &v, &catalog);

    std::thread::sleep(settle);
    let file = dest.join("versions").join(v.hex()).join(KERNEL_NAME);
    corrupt_in_place(&file);
    let t0 = Instant::now();
    d.wait_target(NAME, "the modified kernel re-downloaded", limit, |t| {
        repairs(t) >= 2 && fs::read(&file).is_ok_and(|b| b == v.kernel)
    });
    let file_time = t0.elapsed();
    assert_serving(&dest, &v, &catalog);

    std::thread::sleep(settle);
    fs::remove_file(dest.join("current")).unwrap();
    let t0 = Instant::now();
    let t = d.wait_target(NAME, "current restored", limit, |t| {
        repairs(t) >= 3 && fs::read(dest.join(KERNEL_NAME)).is_ok_and(|b| b == v.kernel)
    });
    let current_time = t0.elapsed();
    assert_serving(&dest, &v, &catalog);
    assert_eq!(t["state"], "ok");
    println!(
        "self-repair: link restored in {link_time:.1?}, file in {file_time:.1?}, current in \
         {current_time:.1?}; self_repairs = {}; total {:.1?}",
        t["self_repairs"],
        started.elapsed()
    );
    d.terminate();
}

// ---------------------------------------------------------------------------------------------
// Minimal reproductions of bugs the tests above found
// ---------------------------------------------------------------------------------------------

/// A retained version whose file was changed in place (same size) must not be switched to
/// when the tag moves back to it: serving it would hand nodes bytes that do not match its
/// `.bootsync.json`. (The startup-recovery test hits the same path: recovery falls back from
/// the damaged current version, and the next sync re-activates it.)
#[test]
fn a_tag_moving_back_to_a_damaged_retained_version_does_not_serve_the_damage() {
    let reg = Registry::start();
    let work = Work::new();
    let dest = work.dest("talos");
    let vs: Vec<Version> = (1..=2)
        .map(|i| push_version(&reg, 11_000 + i, SMALL))
        .collect();
    let catalog = catalog(&vs.iter().collect::<Vec<_>>());
    let config = work.config(&base_config(&reg, &work, &dest, None));
    for v in &vs {
        move_tag(&reg, v);
        sync_ok(&work, &config);
    }
    corrupt_in_place(&dest.join("versions").join(vs[0].hex()).join(KERNEL_NAME));
    move_tag(&reg, &vs[0]);
    let out = sync(&work, &config);
    // Either a fresh download of v1 or a failure that keeps v2: never the damaged copy.
    match check_served(&dest, &NAMES, &catalog) {
        Ok(served) => assert!(
            served.hex == vs[0].hex() || (served.hex == vs[1].hex() && out.code == Some(1)),
            "serving {}; {}",
            served.hex,
            out.describe()
        ),
        Err(e) => panic!(
            "the tag moved back to a damaged retained version: {e}\n{}",
            out.describe()
        ),
    }
}

/// Store::activate re-stamps `versions/<hex>/.bootsync.json` through a temp file
/// `versions/<hex>/.tmp-manifest-<pid>-<rand>`; a crash in that window (the crash test above
/// hits it now and then) leaves the temp file inside the served version directory. The next
/// start or sync must remove it, as it does for `.tmp-*` in dest and dest/versions.
#[test]
fn temp_files_a_crash_leaves_inside_a_version_directory_are_removed_at_the_next_start() {
    let reg = Registry::start();
    let work = Work::new();
    let dest = work.dest("talos");
    let v = push_version(&reg, 12_001, SMALL);
    let catalog = catalog(&[&v]);
    move_tag(&reg, &v);
    let cfg = base_config(&reg, &work, &dest, None);
    let config = work.config(&cfg);
    sync_ok(&work, &config);
    let stray = dest
        .join("versions")
        .join(v.hex())
        .join(".tmp-manifest-4242-deadbeef");
    fs::write(&stray, b"{\"target\": \"talos\", \"refer").unwrap();

    let out = sync_ok(&work, &config);
    let after_sync = debris(&dest);
    let mut d = Launch::new().spawn_run(&config, &cfg.listen, &work.path().join("run.log"));
    d.wait_published(NAME, v.digest(), Duration::from_secs(30));
    let after_start = debris(&dest);
    d.terminate();
    assert!(
        after_sync.is_empty() && after_start.is_empty(),
        "left after `sync --once`: {after_sync:?}; after `run` started: {after_start:?}\n{}",
        out.describe()
    );
    assert_serving(&dest, &v, &catalog);
}
