//! Operating bootsync: scheduling around registry rate limits, token refresh, config reloads
//! (file changes, drop-ins, SIGHUP), the API token, `/metrics`, registry credentials, secrets in
//! output, post-publish hooks and `sync --once --dry-run`.
//!
//! Everything runs against real CNCF distribution registries on 127.0.0.1, with the
//! fault-injecting proxy (`tests/common/proxy.rs`), a token-auth front
//! (`tests/common/authfront.rs`) or an htpasswd registry (`tests/common/authreg.rs`) in front
//! where a test needs one. Run with `cargo test --test operate`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

// The harness re-exports items that only other test binaries use.
#[allow(unused_imports)]
mod common;

use base64::Engine as _;
use common::authfront::{self, AuthFront};
use common::authreg::AuthRegistry;
use common::http;
use common::image::BuiltImage;
use common::metrics::{scalar, Scrape};
use common::proxy::{Exchange, Fault, Proxy, Rule};
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const REPO: &str = "talos/operate";
const TAG: &str = "stable";
const KERNEL: usize = 200_000;
const INITRAMFS: usize = 300_000;
const NAME: &str = "talos-arm64";

// ---------------------------------------------------------------------------------------------
// Images, configs and small helpers
// ---------------------------------------------------------------------------------------------

struct Boot {
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
}

fn boot(seed: u64) -> Boot {
    Boot {
        kernel: fake_kernel("arm64", seed * 2, KERNEL),
        initramfs: fake_initramfs(seed * 2 + 1, INITRAMFS),
    }
}

/// A base layer with nothing wanted, and the boot files on top (so only the top is fetched).
fn image(seed: u64, b: &Boot) -> Image {
    Image::oci("arm64")
        .label(&format!("v{seed}"))
        .layer(
            Layer::gzip()
                .file(
                    "etc/os-release",
                    format!("ID=talos\nVERSION_ID=v1.{seed}\n"),
                )
                .file("usr/lib/libfiller.so", bytes(9_000 + seed, 100_000)),
        )
        .layer(
            Layer::zstd()
                .file("assets/talos/arm64/vmlinuz", b.kernel.clone())
                .file("assets/talos/arm64/initramfs.xz", b.initramfs.clone()),
        )
}

fn target(name: &str, reference: &str, dest: &Path) -> TargetCfg {
    TargetCfg::new(name, reference, dest)
        .platform("linux/arm64")
        .file("assets/talos/arm64/vmlinuz", "vmlinuz-arm64")
        .file("assets/talos/arm64/initramfs.xz", "initramfs-arm64.xz")
}

fn wants(b: &Boot) -> Vec<Want<'_>> {
    vec![
        Want {
            name: "vmlinuz-arm64",
            source: "assets/talos/arm64/vmlinuz",
            data: &b.kernel,
        },
        Want {
            name: "initramfs-arm64.xz",
            source: "assets/talos/arm64/initramfs.xz",
            data: &b.initramfs,
        },
    ]
}

#[track_caller]
fn assert_serving(dest: &Path, name: &str, reference: &str, img: &BuiltImage, tag: &str, b: &Boot) {
    assert_current(
        dest,
        &Published {
            target: name,
            reference,
            platform: "linux/arm64",
            digest: &img.digest,
            tag_digest: tag,
            files: &wants(b),
        },
    );
}

/// A `[[registry]]` table for a plain-HTTP `host`, with extra raw lines.
fn registry_block(host: &str, extra: &str) -> String {
    format!(
        "\n[[registry]]\nhost = {}\ninsecure = true\n{extra}",
        q(host)
    )
}

/// Writes `cfg` (plus raw TOML tables in `tail`) as `work/<file>`, with its own `state_dir`.
fn write_cfg(work: &Work, file: &str, cfg: &Config, tail: &str) -> PathBuf {
    let state = work.path().join("state");
    work.write_config(
        file,
        &format!(
            "state_dir = {}\n{}{tail}",
            q(state.to_str().unwrap()),
            cfg.render()
        ),
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes `text` to `path` atomically (temp file + rename), as editors do.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-edit");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Runs `bootsync GLOBAL... --config FILE ARGS...` with extra environment variables.
fn run_env(config: &Path, global: &[&str], args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut all: Vec<String> = global.iter().map(|s| s.to_string()).collect();
    all.extend(["--config".to_string(), path_str(config).to_string()]);
    all.extend(args.iter().map(|s| s.to_string()));
    let mut cmd = Command::new(BIN);
    cmd.args(&all).envs(env.iter().copied());
    run_command(cmd, all, Duration::from_secs(60))
}

fn post(base: &str, path: &str, authorization: Option<&str>) -> http::Response {
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http::request(
        "POST",
        &format!("{base}{path}"),
        &headers,
        &[],
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("POST {base}{path}: {e}"))
}

/// `POST /targets/NAME/sync` until it is accepted (a sync already running answers 409).
fn trigger(d: &Daemon, name: &str, authorization: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = post(&d.base, &format!("/targets/{name}/sync"), authorization);
        match r.status {
            202 => return,
            409 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => panic!(
                "POST /targets/{name}/sync: {} {}\nlog:\n{}",
                r.status,
                r.text(),
                d.log_tail()
            ),
        }
    }
}

fn scrape(d: &Daemon) -> Scrape {
    let r = d.get("/metrics").expect("GET /metrics");
    assert_eq!(r.status, 200, "/metrics: {}", r.text());
    Scrape::parse(&r.text())
}

/// Polls `/metrics` until `cond` holds.
fn wait_metrics(d: &Daemon, what: &str, limit: Duration, cond: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + limit;
    loop {
        let s = scrape(d);
        if cond(&s) {
            return s;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what} in /metrics:\n{}\nlog:\n{}",
                s.text,
                d.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn target_is(name: &'static str, cond: impl Fn(&Value) -> bool) -> impl Fn(&Value) -> bool {
    move |s: &Value| status_target(s, name).is_some_and(&cond)
}

fn serving(digest: &str) -> impl Fn(&Value) -> bool + '_ {
    move |t: &Value| t["state"] == "ok" && t["published"]["digest"] == digest
}

/// Unix seconds of an RFC 3339 time `YYYY-MM-DDTHH:MM:SSZ` (as `/status` writes them).
fn unix_seconds(s: &str) -> i64 {
    let n = |a: usize, b: usize| -> i64 {
        s.get(a..b)
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("{s:?} is not YYYY-MM-DDTHH:MM:SSZ"))
    };
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11, 13) * 3600 + n(14, 16) * 60 + n(17, 19)
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A registry with one image at `TAG`, and a proxy in front of it.
struct Proxied {
    reg: Registry,
    proxy: Proxy,
    reference: String,
}

impl Proxied {
    fn new() -> Proxied {
        let reg = Registry::start();
        let proxy = Proxy::start(&reg.host());
        let reference = format!("{}/{REPO}:{TAG}", proxy.host());
        Proxied {
            reg,
            proxy,
            reference,
        }
    }

    fn heads(&self) -> Vec<Exchange> {
        let path = format!("/v2/{REPO}/manifests/{TAG}");
        self.proxy
            .log()
            .into_iter()
            .filter(|e| e.method == "HEAD" && e.path == path)
            .collect()
    }

    fn head_rule(&self) -> Rule {
        Rule::head(&format!("/v2/{REPO}/manifests/{TAG}"))
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Retry-After
// ---------------------------------------------------------------------------------------------

/// A 429 with `Retry-After: 2` on the first HEAD of the tag is waited out inside the request:
/// the retry reaches the registry at least 2 s after the 429 (proxy timestamps), and the sync
/// publishes.
#[test]
fn retry_after_on_manifest_head_is_waited_out() {
    let p = Proxied::new();
    let b = boot(1);
    let img = p.reg.push_image(REPO, &image(1, &b), Some(TAG));
    p.proxy
        .add(p.head_rule().nth(1).fault(Fault::too_many_requests(2)));
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new()
        .registry(&p.proxy.host())
        .target(target(NAME, &p.reference, &dest));
    work.sync_once(&work.config(&cfg)).assert_success();
    assert_serving(&dest, NAME, &p.reference, &img, &img.digest, &b);

    let log = p.proxy.dump();
    let heads = p.heads();
    assert_eq!(heads.len(), 2, "one 429, then one retry:\n{log}");
    assert_eq!(heads[0].status, Some(429), "{log}");
    assert_eq!(heads[1].status, Some(200), "{log}");
    let gap = heads[1].started_after(&heads[0]);
    assert!(
        gap >= Duration::from_secs(2),
        "Retry-After: 2 not honoured: retried after {gap:?}\n{log}"
    );
    assert!(
        gap < Duration::from_secs(8),
        "retried only after {gap:?} (Retry-After said 2 s)\n{log}"
    );
}

/// A `Retry-After` beyond 30 s is not slept on inside a sync: `sync --once` fails at once
/// saying so, and the daemon schedules the next sync no sooner than asked, even though its
/// backoff (1 s) would come back much earlier.
#[test]
fn long_retry_after_postpones_the_next_sync() {
    let p = Proxied::new();
    let b = boot(2);
    p.reg.push_image(REPO, &image(2, &b), Some(TAG));
    let work = Work::new();
    let dest = work.dest("talos");

    // sync --once: no 45 s sleep.
    p.proxy
        .add(p.head_rule().nth(1).fault(Fault::too_many_requests(45)));
    let cfg = Config::new()
        .interval("1h")
        .extra_top("backoff_start = \"1s\"\nbackoff_max = \"2s\"")
        .registry(&p.proxy.host())
        .target(target(NAME, &p.reference, &dest));
    let config = work.config(&cfg);
    let started = Instant::now();
    work.sync_once(&config)
        .assert_code(1)
        .assert_stderr_has(&["429", "retry after 45s"]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "sync --once waited {:?} on a 45 s Retry-After",
        started.elapsed()
    );
    assert_eq!(p.heads().len(), 1, "{}", p.proxy.dump());
    assert_nothing_published(&dest);

    // The daemon: the next check is >= 45 s away, and nothing is asked in the meantime.
    p.proxy.clear_rules();
    p.proxy.clear_log();
    p.proxy
        .add(p.head_rule().nth(1).fault(Fault::too_many_requests(45)));
    let mut d = work.spawn_run(&config, &cfg.listen);
    let st = d.wait_status(
        "failed with a next_check",
        Duration::from_secs(20),
        target_is(NAME, |t| {
            t["state"] == "failed" && t["next_check"].is_string()
        }),
    );
    let t = status_target(&st, NAME).unwrap();
    let err = t["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("429") && err.contains("retry after 45s"),
        "{t}"
    );
    let wait = unix_seconds(t["next_check"].as_str().unwrap())
        - unix_seconds(t["last_check"].as_str().unwrap());
    assert!(
        (44..=47).contains(&wait),
        "next check {wait} s after the 429 with Retry-After: 45 (backoff is 1 s): {t}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        p.heads().len(),
        1,
        "the registry was asked again before Retry-After ran out:\n{}",
        p.proxy.dump()
    );
}

/// After failures the next sync waits `backoff_start`, doubling up to `backoff_max`, and never
/// longer than `interval` (each +-10%): measured between the HEADs the proxy saw.
#[test]
fn backoff_doubles_up_to_backoff_max_and_interval() {
    let run = |interval: &str, backoff_max: &str| {
        let p = Proxied::new();
        let reference = format!("{}/{REPO}:missing", p.proxy.host());
        let work = Work::new();
        let cfg = Config::new()
            .interval(interval)
            .extra_top(&format!(
                "backoff_start = \"1s\"\nbackoff_max = {}",
                q(backoff_max)
            ))
            .registry(&p.proxy.host())
            .target(target(NAME, &reference, &work.dest("talos")));
        let config = work.config(&cfg);
        let d = work.spawn_run(&config, &cfg.listen);
        (p, work, d)
    };
    // Doubling capped by backoff_max (4 s); capped by the interval (2 s).
    let by_max = run("1h", "4s");
    let by_interval = run("2s", "1h");
    let heads = |p: &Proxied| -> Vec<Exchange> {
        let log = p.proxy.log();
        log.into_iter().filter(|e| e.method == "HEAD").collect()
    };
    let gaps = |p: &Proxied, n: usize| -> Vec<f64> {
        let deadline = Instant::now() + Duration::from_secs(25);
        loop {
            let heads = heads(p);
            if heads.len() > n {
                return heads
                    .windows(2)
                    .take(n)
                    .map(|w| w[1].started_after(&w[0]).as_secs_f64())
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "too few retries:\n{}",
                p.proxy.dump()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Never sooner than the backoff less its jitter; the upper slack (for a busy machine)
    // still tells a capped delay from an uncapped one (4 s vs 8 s, 2 s vs 4 s).
    let check = |what: &str, p: &Proxied, got: Vec<f64>, want: &[f64]| {
        for (g, w) in got.iter().zip(want) {
            assert!(
                *g >= w * 0.88 && *g <= w * 1.1 + 1.2,
                "{what}: gaps between retries {got:?} s, want {want:?} s (+-10%):\n{}",
                p.proxy.dump()
            );
        }
    };
    let (a, b) = (&by_max.0, &by_interval.0);
    check("backoff_max 4s", a, gaps(a, 4), &[1.0, 2.0, 4.0, 4.0]);
    check("interval 2s", b, gaps(b, 3), &[1.0, 2.0, 2.0]);
    // Every answered HEAD is the registry's 404 (one may still be in flight as the test ends).
    assert!(
        heads(&by_max.0)
            .iter()
            .all(|h| h.status.is_none_or(|s| s == 404)),
        "{}",
        by_max.0.proxy.dump()
    );
}

/// At most `max_concurrent_syncs` targets sync at once (default 2): with every HEAD held
/// 1.5 s by the proxy, three targets overlap two at a time; with 1, one at a time.
#[test]
fn at_most_max_concurrent_syncs_run_at_once() {
    let run = |limit: Option<u32>| {
        let p = Proxied::new();
        let b = boot(5);
        p.reg.push_image(REPO, &image(5, &b), Some(TAG));
        p.proxy.add(
            p.head_rule()
                .every()
                .fault(Fault::Delay(Duration::from_millis(1500))),
        );
        let work = Work::new();
        let mut cfg = Config::new().interval("1h").registry(&p.proxy.host());
        if let Some(n) = limit {
            cfg = cfg.extra_top(&format!("max_concurrent_syncs = {n}"));
        }
        for t in ["t1", "t2", "t3"] {
            cfg = cfg.target(target(t, &p.reference, &work.dest(t)));
        }
        let config = work.config(&cfg);
        let d = work.spawn_run(&config, &cfg.listen);
        (p, work, d)
    };
    let default = run(None);
    let one = run(Some(1));
    // Most HEADs in flight at once, from the proxy's log.
    let overlap = |p: &Proxied| -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        let heads = loop {
            let heads = p.heads();
            if heads.len() == 3 && p.proxy.wait_idle(Duration::from_secs(10)) {
                break p.heads();
            }
            assert!(Instant::now() < deadline, "{}", p.proxy.dump());
            std::thread::sleep(Duration::from_millis(100));
        };
        heads
            .iter()
            .map(|h| {
                let at = h.started_at();
                heads
                    .iter()
                    .filter(|o| o.started_at() <= at && at < o.started_at() + o.elapsed)
                    .count()
            })
            .max()
            .unwrap()
    };
    assert_eq!(
        overlap(&default.0),
        2,
        "default limit 2:\n{}",
        default.0.proxy.dump()
    );
    assert_eq!(
        overlap(&one.0),
        1,
        "max_concurrent_syncs = 1:\n{}",
        one.0.proxy.dump()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Bearer tokens: refresh on 401, cache across syncs, refused token endpoint
// ---------------------------------------------------------------------------------------------

fn registry_line(r: &authfront::FrontRequest) -> String {
    format!(
        "{} {} {:?} -> {}",
        r.method, r.path, r.authorization, r.status
    )
}

/// The token-auth front hands out a token per realm request; the daemon fetches one, keeps it
/// across syncs, and after the front expires it fetches exactly one new token on the 401.
#[test]
fn expired_token_is_refreshed_once_and_cached_across_syncs() {
    let reg = Registry::start();
    let front = AuthFront::start(&reg.host(), "tok-a41f");
    let b1 = boot(10);
    let v1 = reg.push_image(REPO, &image(10, &b1), Some(TAG));
    let reference = format!("{}/{REPO}:{TAG}", front.host());
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new()
        .interval("1h")
        .registry(&front.host())
        .target(target(NAME, &reference, &dest));
    let config = work.config(&cfg);
    let mut d = work.spawn_run(&config, &cfg.listen);
    d.wait_status(
        "v1 published",
        Duration::from_secs(30),
        target_is(NAME, serving(&v1.digest)),
    );
    assert_serving(&dest, NAME, &reference, &v1, &v1.digest, &b1);

    // First sync: anonymous HEAD -> 401 -> one token -> everything with it.
    let log = front.dump();
    let tokens = front.token_requests();
    assert_eq!(tokens.len(), 1, "one token for the first sync:\n{log}");
    let t = &tokens[0];
    assert_eq!(t.status, 200, "{log}");
    assert_eq!(
        t.query("scope").as_deref(),
        Some(&*format!("repository:{REPO}:pull")),
        "{log}"
    );
    assert_eq!(
        t.query("service").as_deref(),
        Some(authfront::SERVICE),
        "{log}"
    );
    assert_eq!(t.authorization, None, "anonymous token request: {log}");
    let regs = front.registry_requests();
    assert_eq!(regs[0].status, 401, "{log}");
    assert_eq!(regs[0].authorization, None, "{log}");
    for r in &regs[1..] {
        assert_eq!(
            r.bearer(),
            Some("tok-a41f-1"),
            "{}\n{log}",
            registry_line(r)
        );
        assert!(matches!(r.status, 200 | 206), "{}\n{log}", registry_line(r));
    }
    assert!(
        regs.len() >= 4,
        "HEAD, HEAD, manifest, blob at least:\n{log}"
    );

    // The token "expires"; a new version is pushed: one refetch, then the new token throughout.
    front.expire();
    front.clear_log();
    let b2 = boot(11);
    let v2 = reg.push_image(REPO, &image(11, &b2), Some(TAG));
    trigger(&d, NAME, None);
    d.wait_status(
        "v2 published",
        Duration::from_secs(30),
        target_is(NAME, serving(&v2.digest)),
    );
    assert_serving(&dest, NAME, &reference, &v2, &v2.digest, &b2);
    let log = front.dump();
    let tokens = front.token_requests();
    assert_eq!(tokens.len(), 1, "exactly one token refetch:\n{log}");
    assert_eq!(tokens[0].status, 200, "{log}");
    let regs = front.registry_requests();
    let refused: Vec<_> = regs.iter().filter(|r| r.status == 401).collect();
    assert_eq!(refused.len(), 1, "one 401 (the stale token):\n{log}");
    assert_eq!(refused[0].seq, regs[0].seq, "{log}");
    assert_eq!(refused[0].bearer(), Some("tok-a41f-1"), "{log}");
    assert!(tokens[0].seq > refused[0].seq, "{log}");
    for r in regs.iter().filter(|r| r.seq > tokens[0].seq) {
        assert_eq!(
            r.bearer(),
            Some("tok-a41f-2"),
            "{}\n{log}",
            registry_line(r)
        );
        assert!(matches!(r.status, 200 | 206), "{}\n{log}", registry_line(r));
    }

    // A third sync (nothing changed): the cached token, no realm request at all.
    front.clear_log();
    trigger(&d, NAME, None);
    wait_metrics(&d, "an up_to_date sync", Duration::from_secs(30), |s| {
        s.value(
            "bootsync_syncs_total",
            &[("target", NAME), ("result", "up_to_date")],
        ) == Some(1.0)
    });
    let log = front.dump();
    assert!(front.token_requests().is_empty(), "token refetched:\n{log}");
    let regs = front.registry_requests();
    assert!(!regs.is_empty(), "{log}");
    for r in &regs {
        assert_eq!(
            r.bearer(),
            Some("tok-a41f-2"),
            "{}\n{log}",
            registry_line(r)
        );
        assert_eq!(r.status, 200, "{log}");
    }

    // The token endpoint refuses: a clear error naming the token request, the realm and the
    // status, both from `sync --once` and in the daemon's /status; v2 keeps serving.
    front.expire();
    front.refuse_tokens(Some(403));
    front.clear_log();
    let other = work.dest("other");
    let once = write_cfg(
        &work,
        "once.toml",
        &Config::new()
            .registry(&front.host())
            .target(target("other", &reference, &other)),
        "",
    );
    work.sync_once(&once)
        .assert_code(1)
        .assert_stderr_has(&["token", &front.realm(), "403"]);
    assert_eq!(front.token_requests().len(), 1, "{}", front.dump());
    assert_nothing_published(&other);

    trigger(&d, NAME, None);
    let st = d.wait_status(
        "failed on the refused token",
        Duration::from_secs(30),
        target_is(NAME, |t| t["state"] == "failed"),
    );
    let t = status_target(&st, NAME).unwrap();
    let err = t["last_error"].as_str().unwrap();
    for needle in ["token", front.realm().as_str(), "403"] {
        assert!(err.contains(needle), "last_error lacks {needle:?}: {t}");
    }
    assert_eq!(t["published"]["digest"], v2.digest.as_str(), "{t}");
    assert_serving(&dest, NAME, &reference, &v2, &v2.digest, &b2);
}

// ---------------------------------------------------------------------------------------------
// 3. Reloads: config file changes, SIGHUP, drop-ins
// ---------------------------------------------------------------------------------------------

/// The main config with `targets`, each syncing `reference` into `work/assets/<name>`.
fn reload_config(
    work: &Work,
    reg: &Registry,
    listen: &str,
    targets: &[&str],
    extra: &str,
) -> String {
    let reference = format!("{}/{REPO}:{TAG}", reg.host());
    let mut cfg = Config::new().interval("1h").registry(&reg.host());
    cfg.listen = listen.to_string();
    if !extra.is_empty() {
        cfg = cfg.extra_top(extra);
    }
    for t in targets {
        cfg = cfg.target(target(t, &reference, &work.dest(t)));
    }
    let state = work.path().join("state");
    format!("state_dir = {}\n{}", q(path_str(&state)), cfg.render())
}

fn names(st: &Value) -> Vec<String> {
    st["targets"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| t["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Editing the config file reloads it (debounced): an added target appears and syncs; an
/// invalid edit is rejected with `config_error` while the running config keeps syncing; a
/// valid edit clears the error (and a removed target goes away).
#[test]
fn config_file_changes_reload_and_invalid_ones_are_rejected() {
    let reg = Registry::start();
    let b1 = boot(20);
    let v1 = reg.push_image(REPO, &image(20, &b1), Some(TAG));
    let work = Work::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let config = work.write_config(
        "bootsync.toml",
        &reload_config(&work, &reg, &listen, &["a"], ""),
    );
    let mut d = work.spawn_run(&config, &listen);
    d.wait_status(
        "a published",
        Duration::from_secs(30),
        target_is("a", serving(&v1.digest)),
    );

    // Valid: target b added.
    replace_file(
        &config,
        &reload_config(&work, &reg, &listen, &["a", "b"], ""),
    );
    let st = d.wait_status(
        "b added by the reload and published",
        Duration::from_secs(20),
        target_is("b", serving(&v1.digest)),
    );
    assert!(st["config_error"].is_null(), "{st}");
    assert_eq!(names(&st), ["a", "b"], "{st}");

    // Invalid: an unknown key. Rejected, reported, the old config keeps running.
    replace_file(
        &config,
        &reload_config(&work, &reg, &listen, &["a", "b", "c"], "colour = \"blue\""),
    );
    let st = d.wait_status("config_error", Duration::from_secs(20), |s| {
        s["config_error"].is_string()
    });
    let err = st["config_error"].as_str().unwrap();
    assert!(
        err.contains("colour") && err.contains(path_str(&config)),
        "{st}"
    );
    assert_eq!(
        names(&st),
        ["a", "b"],
        "the rejected config's target c must not appear: {st}"
    );
    assert!(
        fs::read_to_string(&d.log_path).unwrap().contains("colour"),
        "the rejection is not logged:\n{}",
        d.log_tail()
    );

    // Syncs go on under the old config: a new version reaches both targets.
    let b2 = boot(21);
    let v2 = reg.push_image(REPO, &image(21, &b2), Some(TAG));
    let r = post(&d.base, "/sync", None);
    assert_eq!(r.status, 202, "POST /sync: {}", r.text());
    let mut started: Vec<String> = r.json()["started"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    started.sort();
    assert_eq!(started, ["a", "b"], "{}", r.text());
    let st = d.wait_status("v2 on a and b", Duration::from_secs(30), |s| {
        target_is("a", serving(&v2.digest))(s) && target_is("b", serving(&v2.digest))(s)
    });
    assert!(st["config_error"].is_string(), "{st}");
    let reference = format!("{}/{REPO}:{TAG}", reg.host());
    assert_serving(&work.dest("b"), "b", &reference, &v2, &v2.digest, &b2);

    // Valid again (b removed): the error clears and b leaves /status.
    replace_file(&config, &reload_config(&work, &reg, &listen, &["a"], ""));
    let st = d.wait_status("error cleared, b removed", Duration::from_secs(20), |s| {
        s["config_error"].is_null() && names(s) == ["a"]
    });
    assert!(target_is("a", serving(&v2.digest))(&st), "{st}");
}

fn send_sighup(d: &Daemon) {
    // SAFETY: plain kill(2) on the pid of a child we spawned and still own.
    let rc = unsafe { libc::kill(d.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill -HUP {}", d.pid());
}

/// Overwrites `path` in place (same inode), through whatever name it is given.
fn overwrite_in_place(path: &Path, text: &str) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    f.sync_all().unwrap();
}

/// SIGHUP reloads. The config is edited through a hard link in another directory, which the
/// daemon's file watcher (on the config's own directory) does not see, so only the signal can
/// make the edit take effect.
#[test]
fn sighup_reloads_and_rejects_an_invalid_config() {
    let reg = Registry::start();
    let b1 = boot(25);
    let v1 = reg.push_image(REPO, &image(25, &b1), Some(TAG));
    let work = Work::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let etc = work.path().join("etc");
    let elsewhere = work.path().join("elsewhere");
    fs::create_dir_all(&etc).unwrap();
    fs::create_dir_all(&elsewhere).unwrap();
    let config = etc.join("bootsync.toml");
    fs::write(&config, reload_config(&work, &reg, &listen, &["a"], "")).unwrap();
    let link = elsewhere.join("same-inode.toml");
    fs::hard_link(&config, &link).unwrap();
    let mut d = work.spawn_run(&config, &listen);
    d.wait_status(
        "a published",
        Duration::from_secs(30),
        target_is("a", serving(&v1.digest)),
    );

    overwrite_in_place(&link, &reload_config(&work, &reg, &listen, &["a", "b"], ""));
    assert_eq!(
        fs::metadata(&config).unwrap().ino(),
        fs::metadata(&link).unwrap().ino()
    );
    // Longer than the watcher's debounce: no reload without the signal.
    std::thread::sleep(Duration::from_millis(2500));
    let st = d.status().expect("/status");
    assert_eq!(
        names(&st),
        ["a"],
        "the watcher reloaded an edit made through a hard link elsewhere (the SIGHUP test \
         cannot isolate the signal): {st}"
    );

    send_sighup(&d);
    let st = d.wait_status(
        "b added by SIGHUP and published",
        Duration::from_secs(20),
        target_is("b", serving(&v1.digest)),
    );
    assert!(st["config_error"].is_null(), "{st}");

    // Invalid (a duplicate target name) + SIGHUP: rejected, both targets keep running.
    let dup = reload_config(&work, &reg, &listen, &["a", "b"], "")
        + &format!(
            "\n[[target]]\nname = \"a\"\nreference = {}\ndest = {}\npreset = \"demo\"\n",
            q(&format!("{}/{REPO}:{TAG}", reg.host())),
            q(path_str(&work.dest("dup")))
        );
    overwrite_in_place(&link, &dup);
    send_sighup(&d);
    let st = d.wait_status("config_error after SIGHUP", Duration::from_secs(20), |s| {
        s["config_error"].is_string()
    });
    let err = st["config_error"].as_str().unwrap();
    assert!(err.contains("duplicate") && err.contains("\"a\""), "{st}");
    assert_eq!(names(&st), ["a", "b"], "{st}");
    let b2 = boot(26);
    let v2 = reg.push_image(REPO, &image(26, &b2), Some(TAG));
    trigger(&d, "b", None);
    d.wait_status(
        "b syncs on",
        Duration::from_secs(30),
        target_is("b", serving(&v2.digest)),
    );

    // Fixed + SIGHUP: the error clears.
    overwrite_in_place(&link, &reload_config(&work, &reg, &listen, &["a", "b"], ""));
    send_sighup(&d);
    d.wait_status("config_error cleared", Duration::from_secs(20), |s| {
        s["config_error"].is_null()
    });
    let log = fs::read_to_string(&d.log_path).unwrap();
    assert!(
        log.contains("SIGHUP"),
        "no SIGHUP in the log:\n{}",
        d.log_tail()
    );
}

/// Raw TOML of a `[[target]]` table for the drop-in tests.
fn target_toml(name: &str, reference: &str, dest: &Path, platform: &str) -> String {
    format!(
        "\n[[target]]\nname = {}\nreference = {}\ndest = {}\nplatform = {}\npreset = \"demo\"\n",
        q(name),
        q(reference),
        q(path_str(dest)),
        q(platform)
    )
}

/// `config.d/*.toml` drop-ins are applied in name order: a later one's top-level keys replace
/// earlier ones, `[[target]]` entries with a known name merge key by key, new names are added;
/// other files in `config.d` are ignored.
#[test]
fn drop_ins_merge_in_name_order() {
    let work = Work::new();
    let reference = "127.0.0.1:5000/talos/demo:stable";
    let cfg = Config::new()
        .interval("1h")
        .registry("127.0.0.1:5000")
        .target(TargetCfg::new("a", reference, &work.dest("a")).preset("demo"));
    let config = work.config(&cfg);
    let dropins = work.path().join("config.d");
    fs::create_dir_all(&dropins).unwrap();
    let first = format!(
        "interval = \"2h\"\n{}",
        target_toml(
            "b",
            "127.0.0.1:5000/talos/b:1",
            &work.dest("b"),
            "linux/arm64"
        )
    );
    // Only a name and the keys it changes: merged into b (from the other drop-in) and a.
    let second = format!(
        "interval = \"3h\"\nretain = 7\n\n[[target]]\nname = \"b\"\nplatform = \"linux/amd64\"\n\n[[target]]\nname = \"a\"\ndest = {}\n",
        q(path_str(&work.dest("a2")))
    );
    fs::write(dropins.join("10-first.toml"), &first).unwrap();
    fs::write(dropins.join("20-second.toml"), &second).unwrap();
    // Not drop-ins: would be invalid if read.
    fs::write(dropins.join("30-old.toml.bak"), "interval = \"nonsense\"\n").unwrap();
    fs::write(dropins.join("README"), "not toml [[\n").unwrap();

    let out = work.check_config(&config);
    out.assert_success();
    let text = &out.stdout;
    assert!(
        text.contains("interval 3h") && text.contains("retain 7"),
        "{}",
        out.describe()
    );
    let a = format!(
        "target a: {reference} [linux/arm64] -> {}",
        path_str(&work.dest("a2"))
    );
    let b = format!(
        "target b: 127.0.0.1:5000/talos/b:1 [linux/amd64] -> {}",
        path_str(&work.dest("b"))
    );
    let (ia, ib) = (text.find(&a), text.find(&b));
    assert!(
        ia.is_some() && ib.is_some() && ia < ib,
        "want {a:?} then {b:?}: {}",
        out.describe()
    );

    // Renamed so that the second sorts first: now the first one's keys win.
    fs::rename(
        dropins.join("20-second.toml"),
        dropins.join("05-second.toml"),
    )
    .unwrap();
    let out = work.check_config(&config);
    out.assert_success();
    let b = format!(
        "target b: 127.0.0.1:5000/talos/b:1 [linux/arm64] -> {}",
        path_str(&work.dest("b"))
    );
    assert!(out.stdout.contains("interval 2h"), "{}", out.describe());
    assert!(out.stdout.contains("retain 7"), "{}", out.describe());
    assert!(out.stdout.contains(&b), "want {b:?}: {}", out.describe());
    assert!(out.stdout.contains(&a), "want {a:?}: {}", out.describe());

    // A broken drop-in: the file is named in the error.
    fs::write(dropins.join("40-broken.toml"), "interval = \"soon\"\n").unwrap();
    work.check_config(&config)
        .assert_code(2)
        .assert_stderr_has(&["interval"]);
}

/// In the daemon: adding or changing a drop-in reloads, like the main file.
#[test]
fn drop_in_changes_reload_the_daemon() {
    let reg = Registry::start();
    let b1 = boot(30);
    let v1 = reg.push_image(REPO, &image(30, &b1), Some(TAG));
    let work = Work::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let reference = format!("{}/{REPO}:{TAG}", reg.host());
    let config = work.write_config(
        "bootsync.toml",
        &reload_config(&work, &reg, &listen, &["a"], ""),
    );
    let dropins = work.path().join("config.d");
    fs::create_dir_all(&dropins).unwrap();
    let mut d = work.spawn_run(&config, &listen);
    d.wait_status(
        "a published",
        Duration::from_secs(30),
        target_is("a", serving(&v1.digest)),
    );

    replace_file(
        &dropins.join("50-b.toml"),
        &target_toml("b", &reference, &work.dest("b"), "linux/arm64"),
    );
    d.wait_status(
        "b added by a new drop-in",
        Duration::from_secs(20),
        target_is("b", serving(&v1.digest)),
    );
    // A later drop-in that breaks b: rejected, b stays.
    replace_file(
        &dropins.join("60-b.toml"),
        "[[target]]\nname = \"b\"\nplatform = \"linux\"\n",
    );
    let st = d.wait_status(
        "config_error from a drop-in",
        Duration::from_secs(20),
        |s| s["config_error"].is_string(),
    );
    assert!(
        st["config_error"].as_str().unwrap().contains("platform"),
        "{st}"
    );
    assert_eq!(names(&st), ["a", "b"], "{st}");
    fs::remove_file(dropins.join("60-b.toml")).unwrap();
    d.wait_status(
        "error cleared by removing the drop-in",
        Duration::from_secs(20),
        |s| s["config_error"].is_null() && names(s) == ["a", "b"],
    );
}

/// A `config.d` created after the daemon started is watched too.
#[test]
fn drop_in_dir_created_after_start_is_watched() {
    let reg = Registry::start();
    let b1 = boot(31);
    let v1 = reg.push_image(REPO, &image(31, &b1), Some(TAG));
    let work = Work::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let reference = format!("{}/{REPO}:{TAG}", reg.host());
    let config = work.write_config(
        "bootsync.toml",
        &reload_config(&work, &reg, &listen, &["a"], ""),
    );
    let mut d = work.spawn_run(&config, &listen);
    d.wait_status(
        "a published",
        Duration::from_secs(30),
        target_is("a", serving(&v1.digest)),
    );

    let dropins = work.path().join("config.d");
    fs::create_dir_all(&dropins).unwrap();
    // Let the reload for the new directory itself pass.
    std::thread::sleep(Duration::from_millis(2000));
    replace_file(
        &dropins.join("50-b.toml"),
        &target_toml("b", &reference, &work.dest("b"), "linux/arm64"),
    );
    d.wait_status(
        "b added by a drop-in in a config.d made after start",
        Duration::from_secs(10),
        target_is("b", serving(&v1.digest)),
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The API token
// ---------------------------------------------------------------------------------------------

/// `listen` off loopback needs `token_file`: `check-config` exits 2 and `run` refuses to start.
/// With a token, every POST needs `Authorization: Bearer <token>`; GETs stay open; 409 while a
/// target syncs, 404 for an unknown one.
#[test]
fn api_token_is_required_off_loopback() {
    let p = Proxied::new();
    let b = boot(40);
    let img = p.reg.push_image(REPO, &image(40, &b), Some(TAG));
    let work = Work::new();
    let dest = work.dest("talos");
    let port = free_port();
    let mut cfg = Config::new()
        .interval("1h")
        .registry(&p.proxy.host())
        .target(target(NAME, &p.reference, &dest));
    cfg.listen = format!("0.0.0.0:{port}");
    let config = work.config(&cfg);
    work.check_config(&config)
        .assert_code(2)
        .assert_stderr_has(&["token_file", "0.0.0.0", "loopback"]);
    let started = Instant::now();
    work.run(&config, &["run"])
        .assert_code(2)
        .assert_stderr_has(&["token_file"]);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_nothing_published(&dest);

    let token = "api-7Qm2x9Lk4w";
    let token_file = work.path().join("api.token");
    fs::write(&token_file, format!("{token}\n")).unwrap();
    let cfg = cfg.extra_top(&format!("token_file = {}", q(path_str(&token_file))));
    let config = work.config(&cfg);
    work.check_config(&config).assert_success();
    let mut d = work.spawn_run(&config, &format!("127.0.0.1:{port}"));
    d.wait_status(
        "published",
        Duration::from_secs(30),
        target_is(NAME, serving(&img.digest)),
    );

    let right = format!("Bearer {token}");
    let refused = [
        None,
        Some("Bearer wrong-token".to_string()),
        Some(format!("Bearer {token}x")),
        Some(format!("Bearer {}", &token[..token.len() - 1])),
        Some(format!("Basic {token}")),
        Some(token.to_string()),
    ];
    for path in [
        "/sync",
        &format!("/targets/{NAME}/sync"),
        "/targets/nope/sync",
    ] {
        for auth in &refused {
            let r = post(&d.base, path, auth.as_deref());
            assert_eq!(
                r.status,
                401,
                "POST {path} with {auth:?}: {} {}",
                r.status,
                r.text()
            );
        }
    }
    for path in ["/status", "/healthz", "/readyz", "/metrics"] {
        let r = d.get(path).unwrap_or_else(|| panic!("GET {path}"));
        assert_eq!(r.status, 200, "GET {path} needs no token: {}", r.text());
    }
    let r = post(&d.base, "/targets/nope/sync", Some(&right));
    assert_eq!(r.status, 404, "unknown target: {}", r.text());

    // A sync held up by a slow registry: 409s while it runs.
    let heads = p.heads().len();
    p.proxy.add(
        p.head_rule()
            .nth(1)
            .fault(Fault::Delay(Duration::from_secs(4))),
    );
    let r = post(&d.base, "/sync", Some(&right));
    assert_eq!(r.status, 202, "{}", r.text());
    let body = r.json();
    assert_eq!(body["started"], serde_json::json!([NAME]), "{body}");
    assert_eq!(body["already_running"], serde_json::json!([]), "{body}");
    d.wait_status(
        "syncing",
        Duration::from_secs(10),
        target_is(NAME, |t| t["state"] == "syncing"),
    );
    let r = post(&d.base, "/sync", Some(&right));
    assert_eq!(r.status, 409, "every target busy: {}", r.text());
    let body = r.json();
    assert_eq!(body["started"], serde_json::json!([]), "{body}");
    assert_eq!(body["already_running"], serde_json::json!([NAME]), "{body}");
    let r = post(&d.base, &format!("/targets/{NAME}/sync"), Some(&right));
    assert_eq!(r.status, 409, "{}", r.text());
    let r = post(&d.base, &format!("/targets/{NAME}/sync"), None);
    assert_eq!(
        r.status,
        401,
        "a busy target still needs the token: {}",
        r.text()
    );
    d.wait_status(
        "ok again",
        Duration::from_secs(20),
        target_is(NAME, serving(&img.digest)),
    );
    assert_eq!(p.heads().len(), heads + 1, "{}", p.proxy.dump());
    let r = post(&d.base, &format!("/targets/{NAME}/sync"), Some(&right));
    assert_eq!(r.status, 202, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// 5. /metrics
// ---------------------------------------------------------------------------------------------

const FAMILIES: &[(&str, &str)] = &[
    ("bootsync_syncs", "counter"),
    ("bootsync_sync_duration_seconds", "histogram"),
    ("bootsync_downloaded_bytes", "counter"),
    ("bootsync_last_success_timestamp_seconds", "gauge"),
    ("bootsync_consecutive_failures", "gauge"),
    ("bootsync_published_info", "gauge"),
    ("bootsync_self_repairs", "counter"),
    ("bootsync_hook_failures", "counter"),
    ("bootsync_registry_requests", "counter"),
];

#[track_caller]
fn assert_histogram(s: &Scrape, target: &str, count: f64) {
    let h = s
        .histogram("bootsync_sync_duration_seconds", &[("target", target)])
        .unwrap_or_else(|| panic!("no duration histogram for {target}:\n{}", s.text));
    assert_eq!(h.count, count, "{h:?}");
    let last = h.buckets.last().unwrap();
    assert!(last.0.is_infinite() && last.1 == count, "+Inf bucket {h:?}");
    assert!(
        h.buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "buckets not cumulative: {h:?}"
    );
    assert!(h.sum > 0.0 && h.sum < 60.0 * count, "{h:?}");
}

/// After a publish (one target) and failures (another), every family is declared with its
/// kind and the series carry the expected values; a second publish replaces published_info.
#[test]
fn metrics_after_publish_and_failure() {
    let reg = Registry::start();
    let b1 = boot(50);
    let v1 = reg.push_image(REPO, &image(50, &b1), Some(TAG));
    let work = Work::new();
    let good_ref = format!("{}/{REPO}:{TAG}", reg.host());
    let bad_ref = format!("{}/{REPO}:missing", reg.host());
    let cfg = Config::new()
        .interval("1h")
        .extra_top("backoff_start = \"30m\"\nbackoff_max = \"30m\"")
        .registry(&reg.host())
        .target(target("good", &good_ref, &work.dest("good")))
        .target(target("bad", &bad_ref, &work.dest("bad")));
    let config = work.config(&cfg);
    let t0 = now_unix();
    let mut d = work.spawn_run(&config, &cfg.listen);
    d.wait_status("good ok, bad failed", Duration::from_secs(30), |s| {
        target_is("good", serving(&v1.digest))(s) && target_is("bad", |t| t["state"] == "failed")(s)
    });
    let s = wait_metrics(&d, "both syncs counted", Duration::from_secs(10), |s| {
        s.value(
            "bootsync_syncs_total",
            &[("target", "bad"), ("result", "failed")],
        )
        .is_some()
            && s.value(
                "bootsync_syncs_total",
                &[("target", "good"), ("result", "published")],
            )
            .is_some()
    });
    let r = d.get("/metrics").unwrap();
    assert!(
        r.header("content-type").is_some_and(
            |c| c.starts_with("text/plain") || c.starts_with("application/openmetrics-text")
        ),
        "content type {:?}",
        r.header("content-type")
    );
    // Families without any series yet (no repair, no hook) may be left out, as
    // prometheus-client does; declared ones must have the right kind.
    for (family, kind) in FAMILIES {
        let optional = family.contains("self_repairs") || family.contains("hook_failures");
        if !(optional && s.kind(family).is_none()) {
            assert_eq!(s.kind(family), Some(*kind), "TYPE of {family}:\n{}", s.text);
        }
    }

    let top1 = v1.layers[1].blob.len() as f64;
    let host = reg.host();
    assert_eq!(
        s.must(
            "bootsync_syncs_total",
            &[("target", "good"), ("result", "published")]
        ),
        1.0
    );
    assert_eq!(
        s.sum("bootsync_syncs_total", &[("target", "good")]),
        1.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.must(
            "bootsync_syncs_total",
            &[("target", "bad"), ("result", "failed")]
        ),
        1.0
    );
    assert_eq!(
        s.sum("bootsync_syncs_total", &[("target", "bad")]),
        1.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.must(
            "bootsync_published_info",
            &[
                ("target", "good"),
                ("digest", &v1.digest),
                ("signed_by", "unverified")
            ]
        ),
        1.0
    );
    assert_eq!(
        s.find("bootsync_published_info", &[("target", "good")])
            .len(),
        1,
        "{}",
        s.text
    );
    assert!(
        s.find("bootsync_published_info", &[("target", "bad")])
            .is_empty(),
        "{}",
        s.text
    );
    assert_eq!(
        s.must("bootsync_consecutive_failures", &[("target", "good")]),
        0.0
    );
    assert_eq!(
        s.must("bootsync_consecutive_failures", &[("target", "bad")]),
        1.0
    );
    // Only the top layer holds wanted files: exactly its blob was downloaded.
    assert_eq!(
        s.must("bootsync_downloaded_bytes_total", &[("target", "good")]),
        top1
    );
    assert_eq!(
        s.value("bootsync_downloaded_bytes_total", &[("target", "bad")])
            .unwrap_or(0.0),
        0.0
    );
    let last = s.must(
        "bootsync_last_success_timestamp_seconds",
        &[("target", "good")],
    );
    assert!(
        last >= t0 - 1.0 && last <= now_unix() + 1.0,
        "last success {last}, started {t0}"
    );
    assert!(s
        .value(
            "bootsync_last_success_timestamp_seconds",
            &[("target", "bad")]
        )
        .is_none());
    assert_histogram(&s, "good", 1.0);
    assert_histogram(&s, "bad", 1.0);
    let req = |kind: &str, code: &str| {
        s.value(
            "bootsync_registry_requests_total",
            &[("host", &host), ("kind", kind), ("code", code)],
        )
        .unwrap_or(0.0)
    };
    assert!(req("head", "200") >= 1.0, "{}", s.text);
    assert!(
        req("head", "404") >= 1.0,
        "the missing tag's HEAD:\n{}",
        s.text
    );
    assert!(req("manifest", "200") >= 1.0, "{}", s.text);
    assert_eq!(req("blob", "200"), 1.0, "{}", s.text);
    for family in [
        "bootsync_self_repairs_total",
        "bootsync_hook_failures_total",
    ] {
        assert_eq!(s.sum(family, &[]), 0.0, "{}", s.text);
    }

    // Another failure and another publish.
    trigger(&d, "bad", None);
    let b2 = boot(51);
    let v2 = reg.push_image(REPO, &image(51, &b2), Some(TAG));
    trigger(&d, "good", None);
    d.wait_status(
        "v2 published",
        Duration::from_secs(30),
        target_is("good", serving(&v2.digest)),
    );
    let s = wait_metrics(&d, "second round counted", Duration::from_secs(10), |s| {
        s.value(
            "bootsync_syncs_total",
            &[("target", "bad"), ("result", "failed")],
        ) == Some(2.0)
            && s.value(
                "bootsync_syncs_total",
                &[("target", "good"), ("result", "published")],
            ) == Some(2.0)
    });
    assert_eq!(
        s.must(
            "bootsync_published_info",
            &[
                ("target", "good"),
                ("digest", &v2.digest),
                ("signed_by", "unverified")
            ]
        ),
        1.0
    );
    assert_eq!(
        s.find("bootsync_published_info", &[("target", "good")])
            .len(),
        1,
        "the old digest is still exported:\n{}",
        s.text
    );
    assert_eq!(
        s.must("bootsync_consecutive_failures", &[("target", "bad")]),
        2.0
    );
    let st = d.status().unwrap();
    assert_eq!(
        status_target(&st, "bad").unwrap()["consecutive_failures"],
        2,
        "{st}"
    );
    let top2 = v2.layers[1].blob.len() as f64;
    assert_eq!(
        s.must("bootsync_downloaded_bytes_total", &[("target", "good")]),
        top1 + top2
    );
    assert_histogram(&s, "good", 2.0);
    assert_histogram(&s, "bad", 2.0);
    assert!(
        s.must(
            "bootsync_last_success_timestamp_seconds",
            &[("target", "good")]
        ) >= last
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Registry credentials
// ---------------------------------------------------------------------------------------------

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Against a real registry with htpasswd auth: anonymous is refused with a 401 error;
/// `username` + `password_file` works; `docker_config` works (`auth` base64 and
/// `username`/`password` entries, keys with a scheme); a wrong password fails the same way.
#[test]
fn basic_credentials_against_an_htpasswd_registry() {
    let open = Registry::start();
    let b = boot(60);
    let img = open.push_image(REPO, &image(60, &b), Some(TAG));
    let auth = AuthRegistry::start(&open.root(), "robot", "pw-one-8c2d");
    let host = auth.host();
    let reference = format!("{host}/{REPO}:{TAG}");
    let work = Work::new();
    let base = || Config::new().interval("1h");

    // Anonymous.
    let anon = work.dest("anon");
    let config = write_cfg(
        &work,
        "anon.toml",
        &base()
            .registry(&host)
            .target(target(NAME, &reference, &anon)),
        "",
    );
    work.sync_once(&config)
        .assert_code(1)
        .assert_stderr_has(&["401", "unauthorized", &host]);
    assert_nothing_published(&anon);

    // username + password_file (with the usual trailing newline).
    let pw_file = work.path().join("registry.password");
    fs::write(&pw_file, "pw-one-8c2d\n").unwrap();
    let creds = format!(
        "username = \"robot\"\npassword_file = {}\n",
        q(path_str(&pw_file))
    );
    let dest = work.dest("password-file");
    let config = write_cfg(
        &work,
        "password.toml",
        &base().target(target(NAME, &reference, &dest)),
        &registry_block(&host, &creds),
    );
    work.sync_once(&config).assert_success();
    assert_serving(&dest, NAME, &reference, &img, &img.digest, &b);

    // A wrong password: 401, nothing more published.
    fs::write(&pw_file, "pw-wrong-1e5a\n").unwrap();
    let dest_wrong = work.dest("wrong");
    let config = write_cfg(
        &work,
        "wrong.toml",
        &base().target(target(NAME, &reference, &dest_wrong)),
        &registry_block(&host, &creds),
    );
    work.sync_once(&config)
        .assert_code(1)
        .assert_stderr_has(&["401"]);
    assert_nothing_published(&dest_wrong);

    // docker_config: `auth` (base64 user:password) under a key with a scheme, and
    // `username`/`password` under the bare host.
    let entries = [
        (
            "docker-auth",
            format!("http://{host}"),
            serde_json::json!({ "auth": b64("robot:pw-one-8c2d") }),
        ),
        (
            "docker-userpass",
            host.clone(),
            serde_json::json!({ "username": "robot", "password": "pw-one-8c2d" }),
        ),
    ];
    for (name, key, entry) in entries {
        let docker = work.path().join(format!("{name}.json"));
        let doc = serde_json::json!({
            "auths": { "other.example": { "auth": b64("x:y") }, key: entry }
        });
        fs::write(&docker, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
        let dest = work.dest(name);
        let config = write_cfg(
            &work,
            &format!("{name}.toml"),
            &base()
                .extra_top(&format!("docker_config = {}", q(path_str(&docker))))
                .registry(&host)
                .target(target(NAME, &reference, &dest)),
            "",
        );
        work.sync_once(&config).assert_success();
        assert_serving(&dest, NAME, &reference, &img, &img.digest, &b);
    }
}

/// The password file is re-read at each sync: the registry's password and the file change
/// while the daemon runs, and the next sync uses the new one (the sync in between, with the
/// old password, fails with a 401: the rotation was real).
#[test]
fn rotated_password_file_works_without_restart() {
    let open = Registry::start();
    let b1 = boot(61);
    let v1 = open.push_image(REPO, &image(61, &b1), Some(TAG));
    let auth = AuthRegistry::start(&open.root(), "robot", "pw-old-3f9a");
    let host = auth.host();
    let reference = format!("{host}/{REPO}:{TAG}");
    let work = Work::new();
    let dest = work.dest("talos");
    let pw_file = work.path().join("registry.password");
    fs::write(&pw_file, "pw-old-3f9a\n").unwrap();
    let cfg = Config::new()
        .interval("1h")
        .extra_top("backoff_start = \"30m\"\nbackoff_max = \"30m\"")
        .target(target(NAME, &reference, &dest));
    let config = write_cfg(
        &work,
        "bootsync.toml",
        &cfg,
        &registry_block(
            &host,
            &format!(
                "username = \"robot\"\npassword_file = {}\n",
                q(path_str(&pw_file))
            ),
        ),
    );
    let mut d = work.spawn_run(&config, &cfg.listen);
    d.wait_status(
        "v1",
        Duration::from_secs(30),
        target_is(NAME, serving(&v1.digest)),
    );

    auth.set_password("robot", "pw-new-71c4");
    assert_eq!(auth.login_status("robot", "pw-old-3f9a"), 401);
    let b2 = boot(62);
    let v2 = open.push_image(REPO, &image(62, &b2), Some(TAG));
    trigger(&d, NAME, None);
    let st = d.wait_status(
        "401 with the old password",
        Duration::from_secs(30),
        target_is(NAME, |t| t["state"] == "failed"),
    );
    let t = status_target(&st, NAME).unwrap();
    assert!(t["last_error"].as_str().unwrap().contains("401"), "{t}");
    assert_eq!(t["published"]["digest"], v1.digest.as_str(), "{t}");

    replace_file(&pw_file, "pw-new-71c4\n");
    trigger(&d, NAME, None);
    d.wait_status(
        "v2 with the new password",
        Duration::from_secs(30),
        target_is(NAME, serving(&v2.digest)),
    );
    assert_serving(&dest, NAME, &reference, &v2, &v2.digest, &b2);
}

/// `token_file`: the bearer token is sent as is on every request (no challenge round trip, no
/// token endpoint), and a rotated file is used by the next sync without a restart.
#[test]
fn token_file_is_sent_as_is_and_rotates() {
    let reg = Registry::start();
    let b1 = boot(63);
    let v1 = reg.push_image(REPO, &image(63, &b1), Some(TAG));
    let front = AuthFront::start_static(&reg.host(), "static-tok-one-55b1");
    let reference = format!("{}/{REPO}:{TAG}", front.host());
    let work = Work::new();
    let dest = work.dest("talos");
    let token_file = work.path().join("registry.token");
    fs::write(&token_file, "static-tok-one-55b1\n").unwrap();
    let cfg = Config::new()
        .interval("1h")
        .target(target(NAME, &reference, &dest));
    let config = write_cfg(
        &work,
        "bootsync.toml",
        &cfg,
        &registry_block(
            &front.host(),
            &format!("token_file = {}\n", q(path_str(&token_file))),
        ),
    );
    let mut d = work.spawn_run(&config, &cfg.listen);
    d.wait_status(
        "v1",
        Duration::from_secs(30),
        target_is(NAME, serving(&v1.digest)),
    );
    assert_serving(&dest, NAME, &reference, &v1, &v1.digest, &b1);
    let log = front.dump();
    assert!(front.token_requests().is_empty(), "{log}");
    let regs = front.registry_requests();
    assert!(regs.len() >= 3, "{log}");
    for r in &regs {
        assert_eq!(r.bearer(), Some("static-tok-one-55b1"), "{log}");
        assert!(matches!(r.status, 200 | 206), "{log}");
    }

    front.set_static_token("static-tok-two-9e07");
    replace_file(&token_file, "static-tok-two-9e07\n");
    front.clear_log();
    let b2 = boot(64);
    let v2 = reg.push_image(REPO, &image(64, &b2), Some(TAG));
    trigger(&d, NAME, None);
    d.wait_status(
        "v2",
        Duration::from_secs(30),
        target_is(NAME, serving(&v2.digest)),
    );
    let log = front.dump();
    for r in front.registry_requests() {
        assert_eq!(r.bearer(), Some("static-tok-two-9e07"), "{log}");
        assert!(matches!(r.status, 200 | 206), "{log}");
    }
}

/// `username` + `password_file` are also sent (as Basic) to a token endpoint, as GHCR and
/// Docker Hub need for private images.
#[test]
fn basic_credentials_are_sent_to_the_token_endpoint() {
    let reg = Registry::start();
    let b = boot(65);
    let img = reg.push_image(REPO, &image(65, &b), Some(TAG));
    let front = AuthFront::start(&reg.host(), "tok-b7");
    front.require_basic("robot", "pw-token-2b8e");
    let reference = format!("{}/{REPO}:{TAG}", front.host());
    let work = Work::new();
    let dest = work.dest("talos");
    let pw_file = work.path().join("registry.password");
    fs::write(&pw_file, "pw-wrong-0000\n").unwrap();
    let config = write_cfg(
        &work,
        "bootsync.toml",
        &Config::new().target(target(NAME, &reference, &dest)),
        &registry_block(
            &front.host(),
            &format!(
                "username = \"robot\"\npassword_file = {}\n",
                q(path_str(&pw_file))
            ),
        ),
    );
    work.sync_once(&config)
        .assert_code(1)
        .assert_stderr_has(&["token", "401"]);
    assert_nothing_published(&dest);

    fs::write(&pw_file, "pw-token-2b8e\n").unwrap();
    front.clear_log();
    work.sync_once(&config).assert_success();
    assert_serving(&dest, NAME, &reference, &img, &img.digest, &b);
    let log = front.dump();
    let tokens = front.token_requests();
    assert_eq!(tokens.len(), 1, "{log}");
    assert_eq!(
        tokens[0].authorization.as_deref(),
        Some(common::authreg::basic_header("robot", "pw-token-2b8e").as_str()),
        "{log}"
    );
    for r in front.registry_requests().iter().skip(1) {
        assert_eq!(r.bearer(), Some("tok-b7-1"), "{log}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Secrets never appear in output
// ---------------------------------------------------------------------------------------------

/// Every form in which `secret` could leak: as is, and base64-encoded at each of the three
/// byte alignments (so also inside `base64(user:secret)`), standard and URL-safe.
fn leak_forms(secret: &str) -> Vec<String> {
    let mut forms = vec![secret.to_string()];
    for k in 0..3usize {
        let mut raw = vec![0u8; k];
        raw.extend_from_slice(secret.as_bytes());
        let enc = base64::engine::general_purpose::STANDARD.encode(&raw);
        // Characters that depend on the secret's bytes only.
        let start = (8 * k).div_ceil(6);
        let end = (8 * (k + secret.len())) / 6;
        let inner = &enc[start..end];
        forms.push(inner.to_string());
        forms.push(inner.replace('+', "-").replace('/', "_"));
    }
    forms.sort();
    forms.dedup();
    forms
}

struct Leaks {
    secrets: Vec<(String, String)>,
    outputs: Vec<(String, String)>,
}

impl Leaks {
    fn add(&mut self, label: &str, text: &str) {
        assert!(!text.trim().is_empty(), "{label}: no output at all");
        self.outputs.push((label.to_string(), text.to_string()));
    }
    fn add_outcome(&mut self, label: &str, out: &Outcome) {
        self.add(label, &format!("{}\n{}", out.stdout, out.stderr));
    }
    fn secret(&mut self, what: &str, value: &str) {
        self.secrets.push((what.to_string(), value.to_string()));
    }

    #[track_caller]
    fn assert_none(&self) {
        let mut found = Vec::new();
        for (what, secret) in &self.secrets {
            for form in leak_forms(secret) {
                for (label, text) in &self.outputs {
                    if let Some(i) = text.find(&form) {
                        let from = text[..i].char_indices().rev().nth(80).map_or(0, |(j, _)| j);
                        let to = (i + form.len() + 80).min(text.len());
                        let to = (to..=text.len())
                            .find(|&j| text.is_char_boundary(j))
                            .unwrap();
                        found.push(format!(
                            "{what} ({form:?}) in {label}: ...{}...",
                            &text[from..to]
                        ));
                    }
                }
            }
        }
        assert!(found.is_empty(), "secrets leaked:\n{}", found.join("\n"));
    }
}

/// Debug logging was on, and JSON logs are JSON lines.
#[track_caller]
fn assert_debug_logs(label: &str, text: &str, json: bool) {
    if json {
        for line in text.lines().filter(|l| l.starts_with('{')) {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("{label}: not a JSON log line ({e}): {line}"));
        }
        assert!(
            text.contains("\"level\":\"DEBUG\""),
            "{label}: no DEBUG line:\n{text}"
        );
    } else {
        assert!(text.contains("DEBUG"), "{label}: no DEBUG line:\n{text}");
    }
}

/// Distinctive secrets (a registry password, a wrong one, a docker config password, a
/// `token_file` bearer token, the API token and the tokens a realm issues) never show up in
/// `sync --once` output (success and failure, text and JSON logs, `RUST_LOG=debug`), in the
/// daemon's log, `/status`, `/metrics` or API answers, in `check-config`, `status` or any
/// `--help`.
#[test]
fn secrets_never_appear_in_output() {
    const PW: &str = "pwQ7v9Xk2mZrSECRET";
    const PW_WRONG: &str = "pwWr0ngR4nd0mSECRET";
    const PW_NEXT: &str = "pwN3xtK8d2QpSECRET";
    const DK: &str = "dkHh3Lw8Tn5pSECRET";
    const TF: &str = "tfJq4Rn8Vd1sSECRET";
    const TF_WRONG: &str = "tfWr0ngX9b3cSECRET";
    const API: &str = "apiTb5Nc2Lx9wSECRET";
    const ISSUED: &str = "issZc6Wm3PbSECRET";

    let open = Registry::start();
    let b = boot(70);
    let img = open.push_image(REPO, &image(70, &b), Some(TAG));
    let basic = AuthRegistry::start(&open.root(), "robot-7", PW);
    let issuing = AuthFront::start(&open.host(), ISSUED);
    issuing.require_basic("robot-dk", DK);
    let bearer = AuthFront::start_static(&open.host(), TF);
    let work = Work::new();
    let file = |name: &str, text: &str| {
        let p = work.path().join(name);
        fs::write(&p, text).unwrap();
        p
    };
    let pw_file = file("registry.password", &format!("{PW}\n"));
    let tf_file = file("registry.token", &format!("{TF}\n"));
    let api_file = file("api.token", &format!("{API}\n"));
    let docker = file(
        "docker.json",
        &serde_json::json!({ "auths": {
            issuing.host(): { "auth": b64(&format!("robot-dk:{DK}")) },
        }})
        .to_string(),
    );
    let refs = [
        ("basic", format!("{}/{REPO}:{TAG}", basic.host())),
        ("docker", format!("{}/{REPO}:{TAG}", issuing.host())),
        ("bearer", format!("{}/{REPO}:{TAG}", bearer.host())),
    ];
    let config_with = |name: &str, pw: &Path, tf: &Path, docker: &Path, dests: &str| {
        let mut cfg = Config::new().interval("1h").extra_top(&format!(
            "token_file = {}\ndocker_config = {}\nbackoff_start = \"30m\"\nbackoff_max = \"30m\"",
            q(path_str(&api_file)),
            q(path_str(docker))
        ));
        for (t, reference) in &refs {
            cfg = cfg.target(target(t, reference, &work.dest(&format!("{dests}-{t}"))));
        }
        let tail = registry_block(
            &basic.host(),
            &format!(
                "username = \"robot-7\"\npassword_file = {}\n",
                q(path_str(pw))
            ),
        ) + &registry_block(&issuing.host(), "")
            + &registry_block(
                &bearer.host(),
                &format!("token_file = {}\n", q(path_str(tf))),
            );
        (write_cfg(&work, name, &cfg, &tail), cfg.listen)
    };
    let (config, listen) = config_with("bootsync.toml", &pw_file, &tf_file, &docker, "ok");

    let mut leaks = Leaks {
        secrets: Vec::new(),
        outputs: Vec::new(),
    };
    for (what, s) in [
        ("password", PW),
        ("wrong password", PW_WRONG),
        ("next password", PW_NEXT),
        ("docker config password", DK),
        ("token_file token", TF),
        ("wrong token_file token", TF_WRONG),
        ("API token", API),
        ("issued token prefix", ISSUED),
    ] {
        leaks.secret(what, s);
    }
    let debug = [("RUST_LOG", "debug")];

    let out = run_env(&config, &[], &["check-config"], &[]);
    out.assert_success();
    leaks.add_outcome("check-config", &out);

    // Success: text, then JSON logs (the second pass is up to date, but authenticates again).
    let out = run_env(&config, &[], &["sync", "--once"], &debug);
    out.assert_success();
    assert_debug_logs("sync --once", &out.stderr, false);
    leaks.add_outcome("sync --once, debug", &out);
    for (t, reference) in &refs {
        assert_serving(
            &work.dest(&format!("ok-{t}")),
            t,
            reference,
            &img,
            &img.digest,
            &b,
        );
    }
    let out = run_env(
        &config,
        &["--log-format", "json"],
        &["sync", "--once"],
        &debug,
    );
    out.assert_success();
    assert_debug_logs("sync --once json", &out.stderr, true);
    leaks.add_outcome("sync --once, json, debug", &out);
    let out = run_env(&config, &[], &["sync", "--once", "--dry-run"], &debug);
    out.assert_success();
    leaks.add_outcome("sync --once --dry-run, debug", &out);

    // Failures: a wrong password, a wrong bearer token, a docker config that is not JSON (with
    // the password in it).
    let bad_pw = file("wrong.password", &format!("{PW_WRONG}\n"));
    let bad_tf = file("wrong.token", &format!("{TF_WRONG}\n"));
    let bad_docker = file(
        "broken-docker.json",
        &format!(
            "{{\"auths\": {{\"{}\": {{\"auth\": \"{}\", \"password\": \"{DK}",
            issuing.host(),
            b64(&format!("robot-dk:{DK}"))
        ),
    );
    let (failing, _) = config_with("failing.toml", &bad_pw, &bad_tf, &bad_docker, "fail");
    for global in [&[][..], &["--log-format", "json"][..]] {
        let out = run_env(&failing, global, &["sync", "--once"], &debug);
        out.assert_code(1);
        out.assert_stderr_has(&["401", "docker_config"]);
        leaks.add_outcome(&format!("failing sync --once {global:?}"), &out);
        let out = run_env(&failing, global, &["sync", "--once", "--dry-run"], &debug);
        out.assert_code(1);
        leaks.add_outcome(&format!("failing dry run {global:?}"), &out);
    }

    // The daemon, JSON logs at debug, with API calls right and wrong.
    {
        let mut d = work.spawn_run_with(&config, &listen, &["--log-format", "json"], &debug);
        d.wait_status("all three ok", Duration::from_secs(30), |s| {
            refs.iter()
                .all(|(t, _)| target_is_dyn(s, t, |t| t["state"] == "ok"))
        });
        let right = format!("Bearer {API}");
        let r = post(&d.base, "/sync", Some(&right));
        assert_eq!(r.status, 202, "{}", r.text());
        leaks.add("POST /sync", &r.text());
        for wrong in [
            None,
            Some("Bearer nope"),
            Some(&*format!("Basic {}", b64(API))),
        ] {
            let r = post(&d.base, "/targets/basic/sync", wrong);
            assert_eq!(r.status, 401, "{}", r.text());
            leaks.add("POST refused", &r.text());
        }
        let r = post(&d.base, "/targets/none/sync", Some(&right));
        leaks.add("POST unknown target", &r.text());
        // The registry password rotates but the file does not: a failure in /status.
        basic.set_password("robot-7", PW_NEXT);
        issuing.expire();
        trigger(&d, "basic", Some(&right));
        trigger(&d, "docker", Some(&right));
        d.wait_status("basic failed", Duration::from_secs(30), |s| {
            target_is_dyn(s, "basic", |t| t["state"] == "failed")
                && target_is_dyn(s, "docker", |t| t["state"] == "ok")
        });
        for path in ["/status", "/metrics", "/readyz", "/healthz"] {
            leaks.add(&format!("GET {path}"), &d.get(path).unwrap().text());
        }
        let base = d.base.clone();
        let out = run_env(&config, &[], &["status", "--url", &base], &debug);
        leaks.add_outcome("status", &out);
        let out = run_env(&config, &[], &["status", "--url", &base, "--json"], &debug);
        leaks.add_outcome("status --json", &out);
        let log = fs::read_to_string(&d.log_path).unwrap();
        assert_debug_logs("daemon", &log, true);
        assert!(log.contains("401"), "the failure is not logged:\n{log}");
        leaks.add("daemon log (json, debug)", &log);
    }
    assert!(
        issuing.issued().len() >= 2,
        "the realm issued too few tokens to check: {}",
        issuing.dump()
    );

    // --help everywhere, with the config in the environment too.
    let env = [
        ("BOOTSYNC_CONFIG", path_str(&config)),
        ("RUST_LOG", "debug"),
    ];
    for args in [
        &["--help"][..],
        &["--version"],
        &["help"],
        &["run", "--help"],
        &["sync", "--help"],
        &["rollback", "--help"],
        &["unpin", "--help"],
        &["check-config", "--help"],
        &["status", "--help"],
        &["help", "sync"],
    ] {
        let out = run_env(&config, &[], args, &env);
        out.assert_success();
        leaks.add_outcome(&format!("{args:?}"), &out);
    }
    // The matcher itself: a Basic header carrying the password would be caught.
    let header = common::authreg::basic_header("robot-7", PW);
    assert!(leak_forms(PW).iter().any(|f| header.contains(f.as_str())));
    leaks.assert_none();
}

fn target_is_dyn(s: &Value, name: &str, cond: impl Fn(&Value) -> bool) -> bool {
    status_target(s, name).is_some_and(cond)
}

// ---------------------------------------------------------------------------------------------
// 8. Hooks
// ---------------------------------------------------------------------------------------------

/// An index over arm64 (ours) and amd64 images at `TAG`: (index digest, arm64 image).
fn push_index(reg: &Registry, seed: u64, b: &Boot) -> (String, BuiltImage) {
    let amd = Image::oci("amd64")
        .label(&format!("amd64-v{seed}"))
        .layer(Layer::gzip().file(
            "etc/os-release",
            format!("ID=talos\nARCH=amd64\nV={seed}\n"),
        ));
    let (index, built) = reg.push_index(REPO, Format::Oci, &[amd, image(seed, b)], TAG);
    (index, built[1].clone())
}

/// The environment a hook got (`env -0` output).
fn read_env(path: &Path) -> BTreeMap<String, String> {
    let raw = fs::read(path).unwrap_or_else(|e| panic!("hook output {path:?}: {e}"));
    raw.split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// A shell script in the work directory.
fn script(work: &Work, name: &str, body: &str) -> PathBuf {
    let p = work.path().join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
    p
}

fn hook_line(argv: &[&str]) -> String {
    let parts: Vec<String> = argv.iter().map(|a| q(a)).collect();
    format!("hook = [{}]", parts.join(", "))
}

/// The hook runs after the publish (`current` already switched) with every documented variable;
/// the file paths exist and hash to what was published; an up-to-date sync runs no hook.
#[test]
fn hook_gets_the_published_version_in_its_environment() {
    let reg = Registry::start();
    let b = boot(80);
    let (index, img) = push_index(&reg, 80, &b);
    let reference = format!("{}/{REPO}:{TAG}", reg.host());
    let work = Work::new();
    let dest = work.dest("talos");
    let out = work.path().join("hook-out");
    let hook = script(
        &work,
        "hook.sh",
        "env -0 > \"$1.env\"\nreadlink \"$BOOTSYNC_DEST/current\" > \"$1.current\"\necho run >> \"$1.runs\"\n",
    );
    let cfg = Config::new().registry(&reg.host()).target(
        target(NAME, &reference, &dest).extra(&hook_line(&[
            "/bin/sh",
            path_str(&hook),
            path_str(&out),
        ])),
    );
    let config = work.config(&cfg);
    work.sync_once(&config).assert_success();
    assert_serving(&dest, NAME, &reference, &img, &index, &b);

    let env = read_env(&out.with_extension("env"));
    let vdir = dest.join("versions").join(img.hex());
    let expect = [
        ("BOOTSYNC_TARGET", NAME.to_string()),
        ("BOOTSYNC_REFERENCE", reference.clone()),
        ("BOOTSYNC_PLATFORM", "linux/arm64".to_string()),
        ("BOOTSYNC_DIGEST", img.digest.clone()),
        ("BOOTSYNC_TAG_DIGEST", index.clone()),
        ("BOOTSYNC_DEST", path_str(&dest).to_string()),
        ("BOOTSYNC_VERSION_DIR", path_str(&vdir).to_string()),
        (
            "BOOTSYNC_FILE_VMLINUZ_ARM64",
            path_str(&vdir.join("vmlinuz-arm64")).to_string(),
        ),
        (
            "BOOTSYNC_FILE_INITRAMFS_ARM64_XZ",
            path_str(&vdir.join("initramfs-arm64.xz")).to_string(),
        ),
    ];
    for (k, v) in &expect {
        assert_eq!(
            env.get(*k),
            Some(v),
            "{k} in the hook's environment: {env:#?}"
        );
    }
    let per_file: Vec<&String> = env
        .keys()
        .filter(|k| k.starts_with("BOOTSYNC_FILE_"))
        .collect();
    assert_eq!(per_file.len(), 2, "{per_file:?}");
    let mut files: Vec<&str> = env["BOOTSYNC_FILES"].split('\n').collect();
    files.sort();
    let mut want = vec![expect[8].1.as_str(), expect[7].1.as_str()];
    want.sort();
    assert_eq!(files, want, "BOOTSYNC_FILES");
    let meta = read_meta(&dest, &img.digest);
    for path in files {
        let name = Path::new(path).file_name().unwrap().to_str().unwrap();
        let data = fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let m = meta["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {meta}"));
        assert_eq!(m["sha256"], sha256_hex(&data), "{path} vs {meta}");
        let pushed = if name.starts_with("vmlinuz") {
            &b.kernel
        } else {
            &b.initramfs
        };
        assert_eq!(sha256_hex(&data), sha256_hex(pushed), "{path}");
    }
    assert_eq!(
        fs::read_to_string(out.with_extension("current"))
            .unwrap()
            .trim(),
        format!("versions/{}", img.hex()),
        "the hook ran before `current` pointed at the new version"
    );

    // Up to date: no hook.
    work.sync_once(&config).assert_success();
    assert_eq!(
        fs::read_to_string(out.with_extension("runs")).unwrap(),
        "run\n"
    );
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

fn wait_gone(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn read_pid(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{path:?} not written by the hook"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills `pid` if it still runs (a process our hook script started).
fn reap(pid: i32) {
    if alive(pid) {
        // SAFETY: kill(2) on a pid our own hook script wrote; checked alive just now.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// A hook that outlives `hook_timeout = "1s"` is killed, and one that exits 3 fails; both are
/// counted (`/status`, metric) and logged, and neither undoes the publish.
#[test]
fn slow_and_failing_hooks_are_counted_and_do_not_undo_the_publish() {
    let reg = Registry::start();
    let b = boot(81);
    let img = reg.push_image(REPO, &image(81, &b), Some(TAG));
    let reference = format!("{}/{REPO}:{TAG}", reg.host());
    let work = Work::new();
    let marks = work.path().join("marks");
    fs::create_dir_all(&marks).unwrap();
    let slow = script(
        &work,
        "slow.sh",
        "echo $$ > \"$1/hook.pid.tmp\" && mv \"$1/hook.pid.tmp\" \"$1/hook.pid\"\n\
         sleep 20 &\n\
         echo $! > \"$1/sleep.pid.tmp\" && mv \"$1/sleep.pid.tmp\" \"$1/sleep.pid\"\n\
         wait\n\
         echo finished > \"$1/finished\"\n",
    );
    let cfg = Config::new()
        .interval("1h")
        .registry(&reg.host())
        .target(
            target("slow", &reference, &work.dest("slow"))
                .extra(&hook_line(&["/bin/sh", path_str(&slow), path_str(&marks)]))
                .extra("hook_timeout = \"1s\""),
        )
        .target(
            target("fail", &reference, &work.dest("fail")).extra(&hook_line(&[
                "/bin/sh",
                "-c",
                "echo hook-broke-on-purpose >&2; exit 3",
            ])),
        );
    let config = work.config(&cfg);
    let started = Instant::now();
    let mut d = work.spawn_run(&config, &cfg.listen);
    let hook_pid = read_pid(&marks.join("hook.pid"));
    let sleep_pid = read_pid(&marks.join("sleep.pid"));
    let st = d.wait_status("both hooks failed", Duration::from_secs(30), |s| {
        ["slow", "fail"]
            .iter()
            .all(|n| target_is_dyn(s, n, |t| t["hook_failures"] == 1))
    });
    let took = started.elapsed();
    // Its own child outlives it (see `timed_out_hook_leaves_no_process_behind`): clean up.
    reap(sleep_pid);

    assert!(
        took < Duration::from_secs(15),
        "the 1 s hook timeout took {took:?}"
    );
    let slow_t = status_target(&st, "slow").unwrap();
    let err = slow_t["last_hook_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("timed out") && err.contains("killed"),
        "{slow_t}"
    );
    let fail_t = status_target(&st, "fail").unwrap();
    let err = fail_t["last_hook_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("exit status: 3") && err.contains("hook-broke-on-purpose"),
        "{fail_t}"
    );
    for (name, t) in [("slow", slow_t), ("fail", fail_t)] {
        assert_eq!(
            t["state"], "ok",
            "a hook failure is not a sync failure: {t}"
        );
        assert!(t["last_error"].is_null(), "{t}");
        assert_eq!(t["published"]["digest"], img.digest.as_str(), "{t}");
        assert_serving(&work.dest(name), name, &reference, &img, &img.digest, &b);
    }
    assert!(
        wait_gone(hook_pid, Duration::from_secs(5)),
        "the timed-out hook (pid {hook_pid}) still runs"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marks.join("finished").exists(), "the killed hook ran on");
    let s = scrape(&d);
    assert_eq!(
        s.must("bootsync_hook_failures_total", &[("target", "slow")]),
        1.0
    );
    assert_eq!(
        s.must("bootsync_hook_failures_total", &[("target", "fail")]),
        1.0
    );
    let log = fs::read_to_string(&d.log_path).unwrap();
    assert!(
        log.contains("timed out") && log.contains("hook-broke-on-purpose"),
        "{log}"
    );
}

/// One target whose hook runs `body` (`$1` = a marks directory) with `hook_timeout = "1s"`;
/// `sync --once` publishes it. Returns the work dir, the marks dir and the outcome.
fn sync_with_hook(seed: u64, body: &str) -> (Work, PathBuf, Outcome, Duration) {
    let reg = Registry::start();
    let b = boot(seed);
    reg.push_image(REPO, &image(seed, &b), Some(TAG));
    let reference = format!("{}/{REPO}:{TAG}", reg.host());
    let work = Work::new();
    let marks = work.path().join("marks");
    fs::create_dir_all(&marks).unwrap();
    let hook = script(&work, "hook.sh", body);
    let cfg = Config::new().registry(&reg.host()).target(
        target(NAME, &reference, &work.dest("talos"))
            .extra(&hook_line(&["/bin/sh", path_str(&hook), path_str(&marks)]))
            .extra("hook_timeout = \"1s\""),
    );
    let config = work.config(&cfg);
    let started = Instant::now();
    let out = work.sync_once(&config);
    let took = started.elapsed();
    (work, marks, out, took)
}

/// A hook killed for its timeout takes its children with it (its process group).
#[test]
fn timed_out_hook_leaves_no_process_behind() {
    let (_work, marks, out, _) = sync_with_hook(
        82,
        "echo $$ > \"$1/hook.pid\"\nsleep 20 &\necho $! > \"$1/sleep.pid\"\nwait\n",
    );
    out.assert_success();
    let hook_pid = read_pid(&marks.join("hook.pid"));
    let sleep_pid = read_pid(&marks.join("sleep.pid"));
    let hook_gone = wait_gone(hook_pid, Duration::from_secs(5));
    let child_gone = wait_gone(sleep_pid, Duration::from_secs(2));
    reap(sleep_pid);
    assert!(hook_gone, "the timed-out hook (pid {hook_pid}) still runs");
    assert!(
        child_gone,
        "the timed-out hook's child `sleep 20` (pid {sleep_pid}) outlived the kill; {}",
        out.describe()
    );
}

/// A hook that succeeds at once but leaves a background process behind is a success.
#[test]
fn hook_that_leaves_a_background_process_succeeds() {
    let (_work, marks, out, took) =
        sync_with_hook(83, "sleep 5 &\necho $! > \"$1/sleep.pid\"\nexit 0\n");
    let sleep_pid = read_pid(&marks.join("sleep.pid"));
    reap(sleep_pid);
    out.assert_success();
    assert!(
        !out.stderr.contains("timed out"),
        "the hook exited 0 at once, but bootsync reports it timed out (after {took:?}): {}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Dry run
// ---------------------------------------------------------------------------------------------

/// Every entry under `dir` with its kind, size, mtime and link target.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let link = fs::read_link(&p)
                .map(|l| l.display().to_string())
                .unwrap_or_default();
            out.insert(
                rel,
                format!(
                    "{:?} {} {} {link}",
                    m.file_type(),
                    m.len(),
                    m.mtime_nsec() + m.mtime() * 1_000_000_000
                ),
            );
            if m.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `sync --once --dry-run` resolves the tag and lists the layers it would read (top first),
/// downloads no blob and writes nothing; after a real sync it says "up to date", and for a
/// moved tag it names the new version, leaving what is served untouched.
#[test]
fn dry_run_lists_layers_and_writes_nothing() {
    let reg = Registry::start();
    let b1 = boot(90);
    let (index, v1) = push_index(&reg, 90, &b1);
    let reference = format!("{}/{REPO}:{TAG}", reg.host());
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new()
        .registry(&reg.host())
        .target(target(NAME, &reference, &dest));
    let config = work.config(&cfg);
    let dry = |work: &Work| work.run(&config, &["sync", "--once", "--dry-run"]);

    let out = dry(&work);
    out.assert_success();
    let text = &out.stdout;
    assert!(
        text.contains(&format!("would download {} (tag {index})", v1.digest)),
        "{}",
        out.describe()
    );
    let top = text.find(&v1.layers[1].digest);
    let base = text.find(&v1.layers[0].digest);
    assert!(
        top.is_some() && base.is_some() && top < base,
        "layers, top first: {}",
        out.describe()
    );
    assert!(
        !dest.exists(),
        "dry run created {dest:?}: {:?}",
        snapshot(&dest)
    );
    assert!(!work.path().join("state").exists(), "dry run wrote state");
    assert_eq!(reg.blob_gets(REPO), 0, "dry run downloaded blobs");

    work.sync_once(&config).assert_success();
    assert_serving(&dest, NAME, &reference, &v1, &index, &b1);
    let before = snapshot(&dest);
    let gets = reg.blob_gets(REPO);

    let out = dry(&work);
    out.assert_success();
    assert!(
        out.stdout
            .contains(&format!("{NAME}: up to date ({})", v1.digest)),
        "{}",
        out.describe()
    );

    let b2 = boot(91);
    let (index2, v2) = push_index(&reg, 91, &b2);
    let out = dry(&work);
    out.assert_success();
    assert!(
        out.stdout
            .contains(&format!("would download {} (tag {index2})", v2.digest)),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains(&v2.layers[1].digest),
        "{}",
        out.describe()
    );
    assert_eq!(snapshot(&dest), before, "dry run changed {dest:?}");
    assert_eq!(reg.blob_gets(REPO), gets, "dry run downloaded blobs");
    assert_serving(&dest, NAME, &reference, &v1, &index, &b1);
}

// ---------------------------------------------------------------------------------------------
// One epilogue: rollback and unpin, from the CLI and the API, end like every publish
// ---------------------------------------------------------------------------------------------

/// The digests the hook was called with, in order.
fn hook_calls(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The `bootsync_published_info` series of `name`: (digest, value).
fn published_series(s: &Scrape, name: &str) -> Vec<(String, f64)> {
    s.find("bootsync_published_info", &[("target", name)])
        .into_iter()
        .map(|x| {
            (
                x.labels["digest"].clone(),
                scalar(&x.value).unwrap_or(f64::NAN),
            )
        })
        .collect()
}

/// A rollback or unpin changes what is served like a publish does: the hook runs with the new
/// digest and `/metrics` keeps one `bootsync_published_info` series per target, whether the CLI
/// did it without a daemon, the API did it, or the CLI asked a running daemon.
#[test]
fn rollback_and_unpin_end_in_the_same_epilogue_from_the_cli_and_the_api() {
    let reg = Registry::start();
    let (b1, b2) = (boot(120), boot(121));
    let (_, v1) = push_index(&reg, 120, &b1);
    let reference = format!("{}/{REPO}:{TAG}", reg.host());
    let work = Work::new();
    let dest = work.dest("talos");
    let calls = work.path().join("hook-calls");
    let hook = script(&work, "hook.sh", "echo \"$BOOTSYNC_DIGEST\" >> \"$1\"\n");
    let cfg = Config::new().registry(&reg.host()).target(
        target(NAME, &reference, &dest).extra(&hook_line(&[
            "/bin/sh",
            path_str(&hook),
            path_str(&calls),
        ])),
    );
    let config = work.config(&cfg);
    work.sync_once(&config).assert_success();
    let (_, v2) = push_index(&reg, 121, &b2);
    work.sync_once(&config).assert_success();
    assert_eq!(hook_calls(&calls), [v1.digest.clone(), v2.digest.clone()]);

    // CLI, no daemon: the rollback runs the hook; the unpin syncs and runs it again.
    work.run(&config, &["rollback", NAME]).assert_success();
    assert_eq!(hook_calls(&calls).last(), Some(&v1.digest));
    let out = work.run(&config, &["unpin", NAME]);
    out.assert_success();
    assert!(out.stdout.contains("reactivated"), "{}", out.describe());
    assert_eq!(hook_calls(&calls).last(), Some(&v2.digest));
    assert_eq!(hook_calls(&calls).len(), 4);

    // The API, through the target's loop.
    let mut d = work.spawn_run(&config, &cfg.listen);
    d.wait_status(
        "v2 served",
        Duration::from_secs(30),
        target_is(NAME, serving(&v2.digest)),
    );
    let r = post(&d.base, &format!("/targets/{NAME}/rollback"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["digest"], v1.digest.as_str());
    d.wait_status(
        "v1 served and pinned",
        Duration::from_secs(30),
        target_is(NAME, |t| {
            t["published"]["digest"] == v1.digest.as_str() && t["pinned"] == v1.digest.as_str()
        }),
    );
    let s = wait_metrics(
        &d,
        "v1 alone in published_info",
        Duration::from_secs(10),
        |s| published_series(s, NAME) == [(v1.digest.clone(), 1.0)],
    );
    assert_eq!(
        s.must(
            "bootsync_syncs_total",
            &[("target", NAME), ("result", "rolled_back")]
        ),
        1.0
    );
    assert_eq!(hook_calls(&calls).last(), Some(&v1.digest));
    let r = post(&d.base, &format!("/targets/{NAME}/unpin"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["was_pinned"], true);
    d.wait_status(
        "v2 served again",
        Duration::from_secs(30),
        target_is(NAME, |t| serving(&v2.digest)(t) && t["pinned"].is_null()),
    );
    wait_metrics(
        &d,
        "v2 alone in published_info",
        Duration::from_secs(10),
        |s| published_series(s, NAME) == [(v2.digest.clone(), 1.0)],
    );
    assert_eq!(hook_calls(&calls).last(), Some(&v2.digest));

    // The CLI with a daemon running asks it: the daemon's metrics and status follow.
    let out = work.run(&config, &["rollback", NAME]);
    out.assert_success();
    wait_metrics(
        &d,
        "v1 alone after the CLI asked the daemon",
        Duration::from_secs(10),
        |s| published_series(s, NAME) == [(v1.digest.clone(), 1.0)],
    );
    d.wait_status(
        "the CLI's rollback in /status",
        Duration::from_secs(10),
        target_is(NAME, |t| t["pinned"] == v1.digest.as_str()),
    );
    assert_eq!(hook_calls(&calls).last(), Some(&v1.digest));
    let out = work.run(&config, &["unpin", NAME]);
    out.assert_success();
    assert!(
        out.stdout.contains("the daemon syncs it now"),
        "{}",
        out.describe()
    );
    d.wait_status(
        "v2 after the CLI's unpin",
        Duration::from_secs(30),
        target_is(NAME, serving(&v2.digest)),
    );
    assert_eq!(hook_calls(&calls).len(), 8, "{:?}", hook_calls(&calls));
}

/// The dry run reads a pin without touching it, even one made under another config (a sync
/// would remove it), and does not call a damaged current version up to date.
#[test]
fn dry_run_leaves_a_stale_pin_and_sees_a_damaged_current_version() {
    let reg = Registry::start();
    let (b1, b2) = (boot(130), boot(131));
    let (_, v1) = push_index(&reg, 130, &b1);
    let reference = format!("{}/{REPO}:{TAG}", reg.host());
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new()
        .registry(&reg.host())
        .target(target(NAME, &reference, &dest));
    let config = work.config(&cfg);
    work.sync_once(&config).assert_success();
    let (_, v2) = push_index(&reg, 131, &b2);
    work.sync_once(&config).assert_success();
    work.run(&config, &["rollback", NAME]).assert_success();
    let pin = work.path().join("state/pins").join(format!("{NAME}.json"));
    assert!(pin.is_file());

    // Another config of the target (one more file): the pin is stale.
    let changed = work.config(&Config {
        listen: cfg.listen.clone(),
        ..Config::new()
            .registry(&reg.host())
            .target(target(NAME, &reference, &dest).file("etc/os-release", "os-release"))
    });
    let before = fs::read(&pin).unwrap();
    let out = work.run(&changed, &["sync", "--once", "--dry-run"]);
    out.assert_success();
    assert!(
        out.stdout.contains("made under another config"),
        "{}",
        out.describe()
    );
    assert_eq!(
        fs::read(&pin).unwrap(),
        before,
        "the dry run changed the pin"
    );

    // Back to the config of the pin; unpin and serve v2; then damage it on disk.
    let config = work.config(&cfg);
    work.run(&config, &["unpin", NAME]).assert_success();
    let kernel = dest
        .join("versions")
        .join(v2.digest.trim_start_matches("sha256:"))
        .join("vmlinuz-arm64");
    let len = fs::metadata(&kernel).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&kernel)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = work.run(&config, &["sync", "--once", "--dry-run"]);
    out.assert_success();
    assert!(
        out.stdout.contains("would download") && !out.stdout.contains("up to date"),
        "{}",
        out.describe()
    );
    let _ = v1;
}
