//! `/healthz` latency while two targets re-verify large retained versions: the daemon must stay
//! responsive while it hashes, fsyncs and prunes (that work belongs on blocking threads, not on
//! the async runtime's two workers). Results: docs/PERFORMANCE.md.
//!
//! ```sh
//! cargo bench --bench healthz                         # 1 GiB per target, 3 rounds
//! BOOTSYNC_BENCH_VERIFY_MB=256 BOOTSYNC_BENCH_ROUNDS=1 cargo bench --bench healthz   # quick
//! ```
//!
//! Two targets each publish v1, then v2 (v1 retained); v1's kernel in the store is replaced by a
//! `BOOTSYNC_BENCH_VERIFY_MB` file (its record updated), and both tags move back to v1. A daemon
//! is started: it re-hashes each retained v1 before serving it again (both at once,
//! `max_concurrent_syncs = 2`). A client GETs `/healthz` on a fixed schedule, every 5 ms, from the
//! daemon's first answer until both targets serve v1, then for 2 s more (the idle baseline, in
//! the same run). Latency counts from when a request was due, so a stall is charged to every
//! request it delays (no coordinated omission). Printed: p50, p99 and max latency during the
//! re-verify and idle, their ratio, and how long the re-verify took. Medians over rounds.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::{fake_initramfs, fake_kernel, Config, Image, Layer, Registry, TargetCfg, Work};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

const KERNEL: &str = "usr/install/arm64/vmlinuz";
const INITRD: &str = "usr/install/arm64/initramfs.xz";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn image(seed: u64) -> Image {
    Image::oci("arm64").label(&format!("v{seed}")).layer(
        Layer::gzip()
            .file(KERNEL, fake_kernel("arm64", seed, 64 << 10))
            .file(INITRD, fake_initramfs(seed + 1, 64 << 10)),
    )
}

/// One GET /healthz on a fresh connection: its latency, or None when nothing answered.
fn healthz(addr: &str) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    out.starts_with(b"HTTP/1.1 200").then(|| started.elapsed())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Replaces a retained version's kernel by `size` bytes and rewrites its record to match.
fn inflate(version: &Path, name: &str, size: u64) {
    let path = version.join(name);
    let mut f = fs::File::create(&path).unwrap();
    let mut hasher = Sha256::new();
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..size >> 20 {
        f.write_all(&block).unwrap();
        hasher.update(&block);
    }
    f.sync_all().unwrap();
    let manifest = version.join(".bootsync.json");
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    for file in m["files"].as_array_mut().unwrap() {
        if file["name"] == name {
            file["size"] = (size >> 20 << 20).into();
            file["sha256"] = common::hex(&hasher.clone().finalize()).into();
        }
    }
    fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

struct Round {
    busy: Vec<Duration>,
    idle: Vec<Duration>,
    verify: Duration,
}

fn main() {
    let mb = env("BOOTSYNC_BENCH_VERIFY_MB", 1024);
    let rounds = env("BOOTSYNC_BENCH_ROUNDS", 3).max(1);
    let reg = Registry::start();
    let work = Work::new();
    let names = ["a", "b"];
    let mut cfg = Config::new()
        .interval("1h")
        .grace("0s")
        .registry(&reg.host())
        .extra_top("max_concurrent_syncs = 2\nverify_interval = \"24h\"");
    let mut builds = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let repo = format!("bench/{name}");
        let v1 = reg.push_image(&repo, &image(10 + i as u64 * 10), Some("t"));
        let v2 = reg.push_image(&repo, &image(15 + i as u64 * 10), None);
        let reference = format!("{}/{repo}:t", reg.host());
        cfg = cfg
            .target(TargetCfg::new(name, &reference, &work.dest(name)).preset("talos-installer"));
        builds.push((repo, v1, v2));
    }
    let config = work.config(&cfg);
    work.sync_once(&config).assert_success();
    for (repo, _, v2) in &builds {
        reg.push_built(repo, v2, Some("t"));
    }
    work.sync_once(&config).assert_success();
    for (name, (_, v1, _)) in names.iter().zip(&builds) {
        let hex = v1.digest.trim_start_matches("sha256:");
        inflate(
            &work.dest(name).join("versions").join(hex),
            "vmlinuz-arm64",
            mb << 20,
        );
    }
    eprintln!("two retained versions of {mb} MiB each; {rounds} rounds");

    let serving = |name: &str, digest: &str| {
        fs::read_link(work.dest(name).join("current"))
            .is_ok_and(|l| l.ends_with(digest.trim_start_matches("sha256:")))
    };
    let mut results = Vec::new();
    for round in 0..rounds {
        // Back to v2 (small) without the daemon, then the tags to v1 and the daemon started.
        for (repo, _, v2) in &builds {
            reg.push_built(repo, v2, Some("t"));
        }
        work.sync_once(&config).assert_success();
        for (repo, v1, _) in &builds {
            reg.push_built(repo, v1, Some("t"));
        }
        let started = Instant::now();
        let daemon = work.spawn_run(&config, &cfg.listen);
        let mut busy = Vec::new();
        let mut verify = None;
        let mut idle = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        while healthz(&cfg.listen).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let first = Instant::now();
        let step = Duration::from_millis(5);
        let mut k = 0u32;
        while Instant::now() < deadline {
            let due = first + step * k;
            k += 1;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if healthz(&cfg.listen).is_some() {
                let l = due.elapsed();
                match verify {
                    None => busy.push(l),
                    Some(_) => idle.push(l),
                }
            }
            let done = names
                .iter()
                .zip(&builds)
                .all(|(n, (_, v1, _))| serving(n, &v1.digest));
            if done && verify.is_none() {
                verify = Some((started.elapsed(), Instant::now()));
            }
            if let Some((_, at)) = verify {
                if at.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
        }
        drop(daemon);
        let Some((took, _)) = verify else {
            panic!("round {round}: the targets never served v1 again");
        };
        busy.sort();
        idle.sort();
        eprintln!(
            "round {round}: re-verify {:.2} s; healthz during p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({} samples); idle p50 {:.1} ms p99 {:.1} ms",
            took.as_secs_f64(),
            ms(pct(&busy, 0.5)),
            ms(pct(&busy, 0.99)),
            ms(busy.last().copied().unwrap_or_default()),
            busy.len(),
            ms(pct(&idle, 0.5)),
            ms(pct(&idle, 0.99)),
        );
        results.push(Round {
            busy,
            idle,
            verify: took,
        });
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let of = |f: &dyn Fn(&Round) -> f64| median(results.iter().map(f).collect());
    let busy50 = of(&|r| ms(pct(&r.busy, 0.5)));
    let busy99 = of(&|r| ms(pct(&r.busy, 0.99)));
    let busymax = of(&|r| ms(r.busy.last().copied().unwrap_or_default()));
    let idle50 = of(&|r| ms(pct(&r.idle, 0.5)));
    let idle99 = of(&|r| ms(pct(&r.idle, 0.99)));
    let took = of(&|r| r.verify.as_secs_f64());
    println!("| /healthz while 2 x {mb} MiB re-verify (medians of {rounds}) | p50 | p99 | max |");
    println!("| --- | --- | --- | --- |");
    println!("| during the re-verify ({took:.2} s) | {busy50:.1} ms | {busy99:.1} ms | {busymax:.1} ms |");
    println!("| idle, same run | {idle50:.1} ms | {idle99:.1} ms | |");
    println!(
        "| ratio during/idle | {:.1}x | {:.1}x | |",
        busy50 / idle50.max(0.001),
        busy99 / idle99.max(0.001)
    );
}
