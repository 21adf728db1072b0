//! Power loss, proven: `dest`, the matchbox profile and the state directory (pins) live on a
//! FUSE file system that keeps what was not fsynced in a volatile layer (`common::lazyfs`, the
//! idea of LazyFS). Each run freezes it at one chosen change (every fsync, rename, write, mkdir,
//! symlink and unlink of a publish with a prune, of a profile rewrite, of a rollback's pin and
//! switch), kills bootsync, drops everything not durable (the power cut), mounts what is left
//! (the reboot), and checks: `dest` serves exactly one complete, verified version (old or new);
//! the profile names an intact version; the next `bootsync sync --once` recovers and serves.
//!
//! Needs `/dev/fuse` and `fusermount3` (Debian `fuse3`); runs as root in CI. Every fsync and
//! rename is cut at, and by default 40 more points spread over the writes in between;
//! `BOOTSYNC_POWERLOSS_CUTS=all` cuts at every change (about 580),
//! `BOOTSYNC_POWERLOSS_CUTS=N` at N points besides the boundaries.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

#[allow(unused_imports)]
mod common;

use common::lazyfs::{Mounted, Snapshot};
use common::served::{check_profile, check_served, Catalog};
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const REPO: &str = "talos/powerloss";
const NAME: &str = "talos";
const NAMES: [&str; 2] = ["vmlinuz-arm64", "initramfs-arm64.xz"];
/// Cuts between the boundaries in a default run (every fsync and rename is cut at anyway).
const DEFAULT_CUTS: usize = 40;

struct Version {
    digest: String,
    files: BTreeMap<String, Vec<u8>>,
}

impl Version {
    fn hex(&self) -> &str {
        hex_of(&self.digest)
    }
}

fn push(reg: &Registry, seed: u64, tag: &str) -> Version {
    let kernel = fake_kernel("arm64", seed * 2, 700_000);
    let initramfs = fake_initramfs(seed * 2 + 1, 1_100_000);
    let image = Image::oci("arm64").label(&format!("v{seed}")).layer(
        Layer::gzip()
            .file("assets/talos/arm64/vmlinuz", kernel.clone())
            .file("assets/talos/arm64/initramfs.xz", initramfs.clone()),
    );
    let built = reg.push_image(REPO, &image, Some(tag));
    Version {
        digest: built.digest,
        files: [
            (NAMES[0].to_string(), kernel),
            (NAMES[1].to_string(), initramfs),
        ]
        .into(),
    }
}

/// Where things live on the lazy file system.
struct Layout {
    assets: PathBuf,
    dest: PathBuf,
    profile: PathBuf,
    state: PathBuf,
}

impl Layout {
    fn at(mnt: &Path) -> Layout {
        Layout {
            assets: mnt.join("assets"),
            dest: mnt.join("assets/talos"),
            profile: mnt.join("profiles/talos.json"),
            state: mnt.join("state"),
        }
    }
}

/// The config: the target on the lazy file system, `retain` versions, no grace (so a publish
/// prunes at once), its state directory and profile there too. Written outside the mount.
fn config(work: &Work, reg: &Registry, l: &Layout, tag: &str, retain: u32) -> PathBuf {
    let cfg = Config::new()
        .interval("1h")
        .retain(retain)
        .grace("0s")
        .registry(&reg.host())
        .extra_top(&format!(
            "assets_root = {}\nstate_dir = {}",
            q(l.assets.to_str().unwrap()),
            q(l.state.to_str().unwrap())
        ))
        .target(
            TargetCfg::new(NAME, &format!("{}/{REPO}:{tag}", reg.host()), &l.dest)
                .platform("linux/arm64")
                .preset("demo")
                .extra(&format!(
                    "[target.profile]\npath = {}",
                    q(l.profile.to_str().unwrap())
                )),
        );
    let path = work.path().join(format!("bootsync-{tag}-{retain}.toml"));
    fs::write(&path, cfg.render()).unwrap();
    path
}

fn run(config: &Path, args: &[&str]) -> Outcome {
    let mut all = vec!["--config".to_string(), config.to_str().unwrap().to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    run_bin(&all, Duration::from_secs(60))
}

/// `find` of the mount, for failure messages.
fn listing(dir: &Path) -> String {
    let out = std::process::Command::new("find")
        .arg(dir)
        .args(["-printf", "%y %s %p -> %l\n"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What must hold after a cut and the reboot, before anything runs again: `dest` serves one
/// complete version (or, when nothing had been published yet, nothing: no `current`, no stable
/// links), and the profile, when there is one, names an intact version. Returns the version
/// served.
fn check_after_cut(
    l: &Layout,
    catalog: &Catalog,
    may_be_empty: bool,
) -> Result<Option<String>, String> {
    if may_be_empty && fs::symlink_metadata(l.dest.join("current")).is_err() {
        for name in NAMES {
            if fs::symlink_metadata(l.dest.join(name)).is_ok() {
                return Err(format!(
                    "nothing is current, but the stable name {name} exists"
                ));
            }
        }
        return Ok(None);
    }
    let served = check_served(&l.dest, &NAMES, catalog)?;
    if fs::symlink_metadata(&l.profile).is_ok() || !may_be_empty {
        // It may lag `current` by one version (it is rewritten after the switch), but the
        // version it names is intact: check_profile reads every file it names.
        check_profile(&l.profile, &l.dest, "/assets/talos", catalog)?;
    }
    Ok(Some(served.hex))
}

/// One phase: the state it starts from, the command to cut, and the version the recovery run
/// must end at (`None`: either, e.g. a rollback pin that may or may not have become durable).
struct Phase {
    name: &'static str,
    start: Snapshot,
    args: Vec<String>,
    config: PathBuf,
    recover: PathBuf,
    recovered: Option<String>,
    may_be_empty: bool,
}

fn args_of(p: &[String]) -> Vec<&str> {
    p.iter().map(String::as_str).collect()
}

#[test]
fn every_power_cut_leaves_one_complete_version_and_the_next_start_recovers() {
    let reg = Registry::start();
    let v1 = push(&reg, 1, "one");
    let v2 = push(&reg, 2, "two");
    let catalog: Catalog = [
        (v1.hex().to_string(), v1.files.clone()),
        (v2.hex().to_string(), v2.files.clone()),
    ]
    .into();
    let name_of = |hex: &Option<String>| match hex.as_deref() {
        None => "nothing",
        Some(h) if h == v1.hex() => "v1",
        Some(_) => "v2",
    };
    let work = Work::new();
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut disk = Mounted::mount(&mnt);
    let l = Layout::at(&mnt);
    let one = config(&work, &reg, &l, "one", 1);
    let two = config(&work, &reg, &l, "two", 1);
    let two_r2 = config(&work, &reg, &l, "two", 2);
    let sync = vec!["sync".to_string(), "--once".to_string()];

    // The states the phases start from, each made by running the previous step uncut.
    let empty = disk.snapshot();
    run(&one, &["sync", "--once"]).assert_success();
    let v1_served = disk.snapshot();
    run(&two_r2, &["sync", "--once"]).assert_success();
    let both_v2_current = disk.snapshot();
    let rollback = vec![
        "rollback".to_string(),
        NAME.to_string(),
        "--to".to_string(),
        v1.digest.clone(),
    ];
    run(&two_r2, &args_of(&rollback)).assert_success();
    assert_eq!(
        check_after_cut(&l, &catalog, false).unwrap().as_deref(),
        Some(v1.hex())
    );
    let pinned_v1 = disk.snapshot();

    let phases = [
        Phase {
            name: "first publish",
            start: empty,
            args: sync.clone(),
            config: one.clone(),
            recover: one.clone(),
            recovered: Some(v1.hex().to_string()),
            may_be_empty: true,
        },
        Phase {
            name: "publish + prune + profile",
            start: v1_served,
            args: sync.clone(),
            config: two.clone(),
            recover: two.clone(),
            recovered: Some(v2.hex().to_string()),
            may_be_empty: false,
        },
        Phase {
            name: "rollback: pin + switch + profile",
            start: both_v2_current,
            args: rollback,
            config: two_r2.clone(),
            recover: two_r2.clone(),
            recovered: None,
            may_be_empty: false,
        },
        Phase {
            name: "unpin + sync",
            start: pinned_v1,
            args: vec!["unpin".to_string(), NAME.to_string()],
            config: two_r2.clone(),
            recover: two_r2.clone(),
            recovered: None,
            may_be_empty: false,
        },
    ];

    // How many changes each phase makes, uncut.
    let mut lengths = Vec::new();
    for p in &phases {
        disk.restore(&p.start);
        run(&p.config, &args_of(&p.args)).assert_success();
        let (changes, boundaries) = disk.counts();
        assert!(changes > 10, "{}: only {changes} changes", p.name);
        lengths.push((changes, boundaries, disk.boundary_changes()));
    }
    let total: u64 = lengths.iter().map(|(c, _, _)| c).sum();
    // Every fsync and rename is cut at always; `wanted` more cuts are spread over the rest.
    let wanted = match std::env::var("BOOTSYNC_POWERLOSS_CUTS").as_deref() {
        Ok("all") => total as usize,
        Ok(n) => n.parse().unwrap_or(DEFAULT_CUTS),
        Err(_) => DEFAULT_CUTS,
    }
    .clamp(1, total as usize);

    let mut cuts = 0;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (p, (changes, boundaries, at_boundaries)) in phases.iter().zip(&lengths) {
        // Every boundary, and this phase's share of `wanted` spread evenly over the rest.
        let share = (wanted as u64 * changes).div_ceil(total).clamp(1, *changes);
        let mut points: Vec<u64> = (0..share).map(|i| i * changes / share).collect();
        points.extend(at_boundaries);
        // The state after the last change too (the uncut end, checked the same way).
        points.push(*changes);
        points.sort_unstable();
        points.dedup();
        eprintln!(
            "{}: {changes} changes ({boundaries} fsyncs and renames), cutting at {} of them",
            p.name,
            points.len()
        );
        for at in points {
            disk.restore(&p.start);
            disk.cut_after(at);
            let out = run(&p.config, &args_of(&p.args));
            assert!(
                disk.is_frozen() || out.code == Some(0),
                "{}: the cut at {at} never happened and the run failed: {}",
                p.name,
                out.describe()
            );
            disk.power_cut();
            let after = check_after_cut(&l, &catalog, p.may_be_empty).unwrap_or_else(|e| {
                panic!(
                    "{}: after a power cut at change {at} of {changes}: {e}\nwhat is left:\n{}\nthe cut run: {}",
                    p.name,
                    listing(&mnt),
                    out.describe()
                )
            });
            // The next start recovers, and the profile follows what it serves.
            let rec = run(&p.recover, &["sync", "--once"]);
            rec.assert_success();
            let recovered = check_after_cut(&l, &catalog, false).unwrap_or_else(|e| {
                panic!(
                    "{}: after recovering from a cut at change {at}: {e}\nwhat is left:\n{}\n{}",
                    p.name,
                    listing(&mnt),
                    rec.describe()
                )
            });
            if let Some(want) = &p.recovered {
                assert_eq!(recovered.as_ref(), Some(want), "{}: cut at {at}", p.name);
            }
            let in_profile = check_profile(&l.profile, &l.dest, "/assets/talos", &catalog)
                .unwrap_or_else(|e| panic!("{}: cut at {at}: {e}", p.name));
            assert_eq!(
                Some(in_profile),
                recovered,
                "{}: cut at {at}: profile",
                p.name
            );
            *outcomes
                .entry(format!("{}: {} after the cut", p.name, name_of(&after)))
                .or_default() += 1;
            cuts += 1;
        }
    }
    println!(
        "power cuts: {cuts} (of {total} changes over {} phases, each a possible cut); served \
         after the cut: {outcomes:?}; incomplete or mixed trees: 0; profiles naming a missing \
         version: 0; failed recoveries: 0",
        phases.len()
    );
    assert!(cuts >= wanted, "{cuts} cuts, {wanted} wanted");
}
