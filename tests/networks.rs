//! Many sites, real networks: registry mirrors (a real pull-through cache, CNCF distribution in
//! `proxy` mode, in front of a real upstream), a real HTTP proxy (Debian's `tinyproxy`), and
//! Docker credential helpers (an executable on `PATH` that speaks the protocol).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

mod common;

use common::proxy::{blob_path, Fault, Proxy, Rule};
use common::served::Launch;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = "urmanac/talos-cozystack-demo";
const KERNEL: usize = 700_000;
const INITRAMFS: usize = 1_200_000;

struct Release {
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
}

fn release(seed: u64) -> Release {
    Release {
        kernel: fake_kernel("arm64", seed * 2, KERNEL),
        initramfs: fake_initramfs(seed * 2 + 1, INITRAMFS),
    }
}

fn image(seed: u64, r: &Release) -> Image {
    Image::new(Format::Oci, "arm64")
        .label(&format!("v{seed}"))
        .layer(Layer::new(Compression::Gzip).file("etc/os-release", "ID=talos\n"))
        .layer(
            Layer::new(Compression::Gzip)
                .file("boot/vmlinuz", r.kernel.clone())
                .file("boot/initramfs.xz", r.initramfs.clone()),
        )
}

fn target(name: &str, reference: &str, dest: &Path) -> TargetCfg {
    TargetCfg::new(name, reference, dest)
        .platform("linux/arm64")
        .file("boot/vmlinuz", "vmlinuz")
        .file("boot/initramfs.xz", "initramfs.xz")
}

fn assert_serves(dest: &Path, r: &Release) {
    assert_eq!(fs::read(dest.join("vmlinuz")).unwrap(), r.kernel, "vmlinuz");
    assert_eq!(
        fs::read(dest.join("initramfs.xz")).unwrap(),
        r.initramfs,
        "initramfs.xz"
    );
}

/// `[[registry]]` for `upstream` with `mirrors` (TOML inline tables) and extra keys.
fn registry_block(upstream: &str, mirrors: &[String], extra: &str) -> String {
    format!(
        "[[registry]]\nhost = {}\ninsecure = true\nmirrors = [{}]\n{extra}",
        q(upstream),
        mirrors.join(", ")
    )
}

fn mirror(url: &str) -> String {
    format!("{{ url = {}, insecure = true }}", q(url))
}

/// Access-log lines of `reg` for GETs of `digest` made by bootsync (not by a mirror).
fn bootsync_gets(reg: &Registry, digest: &str) -> usize {
    reg.requests("GET", &blob_path(REPO, digest))
        .iter()
        .filter(|l| l.contains("bootsync/"))
        .count()
}

/// GETs of `digest` that reached `reg` from anyone (bootsync or a mirror filling its cache).
fn all_gets(reg: &Registry, digest: &str) -> usize {
    reg.blob_gets_of(REPO, digest)
}

#[test]
fn two_sites_behind_pull_through_caches_fetch_one_copy_from_upstream_and_survive_either_outage() {
    let mut upstream = Registry::start();
    let r1 = release(1);
    let img = upstream.push_image(REPO, &image(1, &r1), Some("stable"));
    let layer = img.layers[1].digest.clone();
    let reference = format!("{}/{REPO}:stable", upstream.host());
    // One pull-through cache, three sites behind it (each its own bastion: own work dir).
    let cache = Registry::start_mirror(&upstream.url(""));
    let sites: Vec<Work> = (0..3).map(|_| Work::new()).collect();
    let upstream_host = upstream.host();
    let config = |w: &Work, mirrors: &[String]| {
        let cfg = Config::new()
            .extra_top(&registry_block(&upstream_host, mirrors, ""))
            .target(target("talos", &reference, &w.dest("talos")));
        w.config(&cfg)
    };
    let mut after_first = 0;
    for (i, site) in sites.iter().enumerate() {
        let cfg = config(site, &[mirror(&cache.url(""))]);
        site.sync_once(&cfg).assert_success();
        assert_serves(&site.dest("talos"), &r1);
        if i == 0 {
            after_first = all_gets(&upstream, &layer);
        }
    }
    // The top layer left the upstream for the cache's first miss only, never for bootsync and
    // never again for the other sites. Distribution 2.8 fetches a missed blob twice (one
    // stream to the client, one to its store; v3 has one: distribution/distribution#3569).
    let total = all_gets(&upstream, &layer);
    assert!((1..=2).contains(&after_first), "{after_first}");
    assert_eq!(
        total,
        after_first,
        "{:#?}",
        upstream.requests("GET", &blob_path(REPO, &layer))
    );
    assert_eq!(bootsync_gets(&upstream, &layer), 0);
    assert_eq!(bootsync_gets(&cache, &layer), 3, "{}", cache.log_tail(30));
    println!(
        "fleet: {} sites behind one cache, a top layer of {} bytes: upstream sent it {total} time(s) \
         ({} bytes), the cache sent it {} times",
        sites.len(),
        img.layers[1].blob.len(),
        total * img.layers[1].blob.len(),
        bootsync_gets(&cache, &layer)
    );

    // The upstream goes away: a third bastion still gets the release from the cache.
    upstream.stop();
    let late = Work::new();
    let cfg = config(&late, &[mirror(&cache.url(""))]);
    late.sync_once(&cfg).assert_success();
    assert_serves(&late.dest("talos"), &r1);
    assert_eq!(
        readlink(&late.dest("talos").join("current")),
        format!("versions/{}", hex_of(&img.digest))
    );
}

#[test]
fn a_stopped_mirror_falls_back_to_the_upstream_and_is_asked_once_per_sync() {
    let upstream = Registry::start();
    let r1 = release(2);
    let v1 = upstream.push_image(REPO, &image(2, &r1), Some("stable"));
    let reference = format!("{}/{REPO}:stable", upstream.host());
    // The site's cache, and behind it a second one whose own upstream is dead (it answers 5xx
    // for what it lacks).
    let mut cache = Registry::start_mirror(&upstream.url(""));
    let mut orphan_upstream = Registry::start();
    let orphan = Registry::start_mirror(&orphan_upstream.url(""));
    orphan_upstream.stop();
    let cache_url = cache.url("");
    let work = Work::new();
    let cfg = Config::new()
        .extra_top(&registry_block(
            &upstream.host(),
            &[mirror(&cache_url), mirror(&orphan.url(""))],
            "",
        ))
        .target(target("talos", &reference, &work.dest("talos")));
    let cfg = work.config(&cfg);
    work.sync_once(&cfg).assert_success();
    assert_serves(&work.dest("talos"), &r1);
    assert_eq!(bootsync_gets(&cache, &v1.layers[1].digest), 1);
    assert_eq!(bootsync_gets(&upstream, &v1.layers[1].digest), 0);

    // The cache goes down; a new release comes from the upstream itself.
    cache.stop();
    let r2 = release(12);
    let v2 = upstream.push_image(REPO, &image(12, &r2), Some("stable"));
    let out = work.sync_once(&cfg);
    out.assert_success();
    assert_serves(&work.dest("talos"), &r2);
    assert_eq!(
        readlink(&work.dest("talos").join("current")),
        format!("versions/{}", hex_of(&v2.digest))
    );
    // The unreachable mirror is named once, then left alone for the rest of the sync.
    let dead_host = cache_url.trim_start_matches("http://");
    let named = out.stderr.lines().filter(|l| l.contains(dead_host)).count();
    assert_eq!(named, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("not asking this mirror again"),
        "{}",
        out.stderr
    );
    // The orphaned cache was asked (and failed) too; the upstream answered.
    assert!(!orphan
        .requests("HEAD", &format!("/v2/{REPO}/manifests/"))
        .is_empty());
    assert_eq!(bootsync_gets(&upstream, &v2.layers[1].digest), 1);
}

#[test]
fn a_mirror_serving_a_corrupt_blob_is_skipped_for_that_blob_and_the_upstream_serves_it() {
    let upstream = Registry::start();
    let r1 = release(3);
    let img = upstream.push_image(REPO, &image(3, &r1), Some("stable"));
    let layer = img.layers[1].digest.clone();
    let reference = format!("{}/{REPO}:stable", upstream.host());
    let cache = Registry::start_mirror(&upstream.url(""));
    // The site's mirror flips one byte of the top layer (same length: only the digest tells).
    let liar = Proxy::start(&cache.host());
    liar.add(Rule::get(&blob_path(REPO, &layer)).fault(Fault::FlipBits {
        at: 1000,
        mask: 0x5a,
    }));
    let work = Work::new();
    let cfg = Config::new()
        .extra_top(&registry_block(
            &upstream.host(),
            &[mirror(&format!("http://{}", liar.host()))],
            "",
        ))
        .target(target("talos", &reference, &work.dest("talos")));
    let out = work.sync_once(&work.config(&cfg));
    out.assert_success();
    assert_serves(&work.dest("talos"), &r1);
    out.assert_stderr_has(&["digest mismatch", "skipping the mirror for this blob"]);
    // The lying mirror was asked for the layer once; the upstream then sent it to bootsync.
    assert_eq!(liar.blob_gets(REPO, &layer).len(), 1);
    assert_eq!(
        bootsync_gets(&upstream, &layer),
        1,
        "{}",
        upstream.log_tail(20)
    );
    // Manifests and the other layer still came through the mirror.
    assert_eq!(bootsync_gets(&upstream, &img.layers[0].digest), 0);
}

#[test]
fn tags_resolve_upstream_when_the_mirror_may_not_and_status_and_metrics_name_each_host() {
    let upstream = Registry::start();
    let r1 = release(4);
    let v1 = upstream.push_image(REPO, &image(4, &r1), Some("stable"));
    let reference = format!("{}/{REPO}:stable", upstream.host());
    let cache = Registry::start_mirror(&upstream.url(""));
    let work = Work::new();
    let mut cfg = Config::new()
        .interval("1h")
        .extra_top(&registry_block(
            &upstream.host(),
            &[format!(
                "{{ url = {}, insecure = true, resolve = false }}",
                q(&cache.url(""))
            )],
            "",
        ))
        .target(target("talos", &reference, &work.dest("talos")));
    let listen = cfg.listen.clone();
    cfg.listen = listen.clone();
    let cfg_path = work.config(&cfg);
    let log = work.path().join("daemon.log");
    let mut d = Launch::new().spawn_run(&cfg_path, &listen, &log);
    d.wait_published("talos", &v1.digest, Duration::from_secs(60));
    // The tag went to the upstream, the content to the mirror.
    let heads = |reg: &Registry| {
        reg.requests("HEAD", &format!("/v2/{REPO}/manifests/stable"))
            .iter()
            .filter(|l| l.contains("bootsync/"))
            .count()
    };
    assert_eq!(heads(&cache), 0);
    assert!(heads(&upstream) >= 1);
    assert_eq!(bootsync_gets(&upstream, &v1.layers[1].digest), 0);
    let status = d.status().unwrap();
    let hosts = status["hosts"].as_array().unwrap();
    let host = |h: &str| hosts.iter().find(|x| x["host"] == h).cloned();
    let m = host(&cache.host()).unwrap_or_else(|| panic!("{status:#}"));
    assert_eq!(m["role"], "mirror");
    assert_eq!(m["state"], "ok");
    let u = host(&upstream.host()).unwrap();
    assert_eq!(u["role"], "upstream");
    let metrics = http::request(
        "GET",
        &format!("http://{listen}/metrics"),
        &[],
        &[],
        Duration::from_secs(5),
    )
    .unwrap()
    .text();
    let mirror_bytes = metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "bootsync_registry_bytes_total{{host=\"{}\"}}",
                cache.host()
            ))
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    let n: u64 = mirror_bytes.rsplit(' ').next().unwrap().parse().unwrap();
    // Every series the alert rules name is in the real output (a counter by its TYPE line
    // until it has a sample).
    let rules = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/bootsync-rules.yml"),
    )
    .unwrap();
    let mut named: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("bootsync_"))
        .collect();
    named.sort();
    named.dedup();
    assert!(named.len() >= 6, "{named:?}");
    for name in named {
        if name == "bootsync_signature_checks_total" {
            // Only a target with a policy has its series: tests/signatures.rs reads it.
            continue;
        }
        let base = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            metrics.lines().any(|l| l.starts_with(&format!("{name}{{")))
                || metrics.contains(&format!("# TYPE {base} ")),
            "the rules name {name}, which /metrics does not have:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("bootsync_tag_behind{target=\"talos\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("bootsync_pinned{target=\"talos\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("bootsync_dest_free_bytes{target=\"talos\"} "),
        "{metrics}"
    );
    // Only the top layer holds what the target wants: it is all that was fetched.
    let layer = v1.layers[1].blob.len() as u64;
    assert_eq!(n, layer, "{mirror_bytes}");
    drop(d);
}

// ---- HTTP proxies ----

/// Debian's tinyproxy on a free port of 127.0.0.1, logging every request; with `auth`, it
/// demands those Basic credentials.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    fn start(auth: Option<(&str, &str)>) -> Tinyproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = dir.path().join("tinyproxy.log");
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Info\n\
             MaxClients 50\nAllow 127.0.0.1\nDisableViaHeader Yes\nConnectPort 443\n",
            log.display()
        );
        if let Some((u, p)) = auth {
            conf += &format!("BasicAuth {u} {p}\n");
        }
        let conf_path = dir.path().join("tinyproxy.conf");
        fs::write(&conf_path, conf).unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy (apt-get install -y tinyproxy)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tinyproxy did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Tinyproxy {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests it forwarded for `needle` (a URL part).
    fn forwarded(&self, needle: &str) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Request") && l.contains(needle))
            .count()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_environment_proxy_is_used_unless_no_proxy_names_the_registry() {
    let reg = Registry::start();
    let r1 = release(5);
    reg.push_image(REPO, &image(5, &r1), Some("stable"));
    let reference = format!("{}/{REPO}:stable", reg.host());
    let proxy = Tinyproxy::start(None);
    let work = Work::new();
    let cfg = Config::new().registry(&reg.host()).target(target(
        "talos",
        &reference,
        &work.dest("talos"),
    ));
    let cfg = work.config(&cfg);
    let sync = |env: &[(&str, &str)]| {
        let mut l = Launch::new();
        for (k, v) in env {
            l = l.env(k, v);
        }
        l.run(&cfg, &["sync", "--once"], Duration::from_secs(120))
    };
    sync(&[("HTTP_PROXY", &proxy.url()), ("NO_PROXY", "")]).assert_success();
    assert_serves(&work.dest("talos"), &r1);
    let via = proxy.forwarded(&format!("{}/v2/{REPO}/", reg.host()));
    assert!(
        via >= 3,
        "HEAD, manifest, blobs through the proxy:\n{}",
        proxy.log()
    );

    // NO_PROXY naming the registry: straight there (a fresh dest, so the layers are fetched).
    fs::remove_dir_all(work.dest("talos")).unwrap();
    sync(&[("HTTP_PROXY", &proxy.url()), ("NO_PROXY", "127.0.0.1")]).assert_success();
    assert_serves(&work.dest("talos"), &r1);
    assert_eq!(proxy.forwarded(&format!("{}/v2/{REPO}/", reg.host())), via);
}

#[test]
fn a_per_registry_proxy_with_credentials_from_a_file_never_shows_them() {
    let reg = Registry::start();
    let r1 = release(6);
    reg.push_image(REPO, &image(6, &r1), Some("stable"));
    let reference = format!("{}/{REPO}:stable", reg.host());
    let proxy = Tinyproxy::start(Some(("robot", "pr0xy-s3cret")));
    let work = Work::new();
    let creds = work.path().join("proxy-credentials");
    fs::write(&creds, "robot:pr0xy-s3cret\n").unwrap();
    let block = format!(
        "[[registry]]\nhost = {}\ninsecure = true\nproxy = {}\nproxy_credentials_file = {}\n",
        q(&reg.host()),
        q(&proxy.url()),
        q(creds.to_str().unwrap())
    );
    let cfg =
        Config::new()
            .extra_top(&block)
            .target(target("talos", &reference, &work.dest("talos")));
    let cfg = work.config(&cfg);
    // An explicit proxy wins over the environment's (which points nowhere here).
    let launch = Launch::new().env("HTTP_PROXY", "http://127.0.0.1:9");
    launch
        .run(&cfg, &["sync", "--once"], Duration::from_secs(120))
        .assert_success();
    assert_serves(&work.dest("talos"), &r1);
    assert!(
        proxy.forwarded(&format!("{}/v2/{REPO}/", reg.host())) >= 3,
        "{}",
        proxy.log()
    );

    // Wrong credentials: a clear error (the proxy's 407), the password nowhere in it.
    fs::write(&creds, "robot:wr0ng-pa55\n").unwrap();
    fs::remove_dir_all(work.dest("talos")).unwrap();
    // tinyproxy 1.11 answers wrong credentials with 401 and missing ones with 407.
    let out = launch.run(&cfg, &["sync", "--once"], Duration::from_secs(120));
    out.assert_code(1);
    out.assert_stderr_has(&["401"]);
    for secret in ["wr0ng-pa55", "pr0xy-s3cret"] {
        assert!(!out.stderr.contains(secret), "{}", out.stderr);
        assert!(!out.stdout.contains(secret), "{}", out.stdout);
    }
    let no_creds = Config::new()
        .extra_top(&format!(
            "[[registry]]\nhost = {}\ninsecure = true\nproxy = {}\n",
            q(&reg.host()),
            q(&proxy.url())
        ))
        .target(target("talos", &reference, &work.dest("talos")));
    let out = launch.run(
        &work.config(&no_creds),
        &["sync", "--once"],
        Duration::from_secs(120),
    );
    out.assert_code(1);
    out.assert_stderr_has(&["407", "the proxy wants credentials"]);
    // And a proxy URL with credentials in it is refused without repeating them.
    let bad = Config::new()
        .extra_top(&format!(
            "[[registry]]\nhost = {}\nproxy = \"http://robot:inl1ne-s3cret@127.0.0.1:3128\"\n",
            q(&reg.host())
        ))
        .target(target("talos", &reference, &work.dest("talos")));
    let out = work.check_config(&work.config(&bad));
    out.assert_code(2);
    out.assert_stderr_has(&["proxy_credentials_file"]);
    assert!(!out.stderr.contains("inl1ne-s3cret"), "{}", out.stderr);
}

// ---- credential helpers ----

/// Writes `docker-credential-<name>` into `dir`: it logs each call, answers with the password
/// in `secret_file`, and says something on stderr (with the secret, which must not be logged).
fn write_helper(dir: &Path, name: &str, user: &str, secret_file: &Path, calls: &Path) {
    let script = format!(
        "#!/bin/sh\n\
         [ \"$1\" = get ] || exit 1\n\
         read -r server\n\
         echo \"$server\" >> '{calls}'\n\
         secret=$(cat '{secret}')\n\
         echo \"fetching a token for $server (secret $secret)\" >&2\n\
         printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"%s\"}}\\n' \"$server\" \"$secret\"\n",
        calls = calls.display(),
        secret = secret_file.display(),
    );
    let path = dir.join(format!("docker-credential-{name}"));
    fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn calls(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_credential_helper_is_asked_once_and_again_only_when_the_registry_rejects_its_answer() {
    let open = Registry::start();
    let r1 = release(7);
    let v1 = open.push_image(REPO, &image(7, &r1), Some("stable"));
    let auth = common::authreg::AuthRegistry::start(&open.root(), "robot", "t0ken-one");
    // ECR answers an expired token with 403: a fault proxy plays that part in front.
    let front = Proxy::start(&auth.host());
    let reference = format!("{}/{REPO}:stable", front.host());
    let work = Work::new();
    let bin = work.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let secret = work.path().join("secret");
    fs::write(&secret, "t0ken-one").unwrap();
    let calls_log = work.path().join("calls");
    write_helper(&bin, "bstest", "robot", &secret, &calls_log);
    let docker_config = work.path().join("config.json");
    fs::write(
        &docker_config,
        format!(
            r#"{{"auths": {{"{0}": {{"auth": "bm9ib2R5Om5vdGhpbmc="}}}}, "credHelpers": {{"{0}": "bstest"}}}}"#,
            front.host()
        ),
    )
    .unwrap();
    let cfg = Config::new()
        .interval("1h")
        .extra_top(&format!(
            "docker_config = {}",
            q(docker_config.to_str().unwrap())
        ))
        .registry(&front.host())
        .target(target("talos", &reference, &work.dest("talos")));
    let listen = cfg.listen.clone();
    let cfg = work.config(&cfg);
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let log = work.path().join("daemon.log");
    let mut d = Launch::new()
        .env("PATH", &path)
        .spawn_run(&cfg, &listen, &log);
    d.wait_published("talos", &v1.digest, Duration::from_secs(60));
    assert_eq!(
        calls(&calls_log),
        vec![front.host()],
        "asked once, for the host"
    );

    // A new release: the cached answer still works, the helper is not asked.
    let r2 = release(8);
    let v2 = open.push_image(REPO, &image(8, &r2), Some("stable"));
    d.trigger_sync("talos");
    d.wait_published("talos", &v2.digest, Duration::from_secs(60));
    assert_eq!(calls(&calls_log).len(), 1);

    // The token rotates (the registry now wants the new one: 401 to the old): asked again.
    fs::write(&secret, "t0ken-two").unwrap();
    auth.set_password("robot", "t0ken-two");
    let r3 = release(9);
    let v3 = open.push_image(REPO, &image(9, &r3), Some("stable"));
    d.trigger_sync("talos");
    d.wait_published("talos", &v3.digest, Duration::from_secs(60));
    assert_eq!(calls(&calls_log).len(), 2, "{}", d.log_tail());

    // An ECR-style 403 to a cached answer: asked again, once, and the sync goes on.
    front.add(
        Rule::head(&format!("/v2/{REPO}/manifests/stable"))
            .with_header("Authorization")
            .first(1)
            .fault(Fault::status(403)),
    );
    let r4 = release(10);
    let v4 = open.push_image(REPO, &image(10, &r4), Some("stable"));
    d.trigger_sync("talos");
    d.wait_published("talos", &v4.digest, Duration::from_secs(60));
    assert_eq!(calls(&calls_log).len(), 3, "{}", d.log_tail());
    assert_serves(&work.dest("talos"), &r4);
    let log = d.log();
    assert!(
        log.contains("rejected the credential helper's answer"),
        "{log}"
    );
    assert!(log.contains("helper said"), "{log}");
    for s in ["t0ken-one", "t0ken-two"] {
        assert!(!log.contains(s), "a secret in the log:\n{log}");
    }
}

#[test]
fn a_missing_or_broken_credential_helper_is_a_clear_error() {
    let open = Registry::start();
    let r1 = release(11);
    open.push_image(REPO, &image(11, &r1), Some("stable"));
    let auth = common::authreg::AuthRegistry::start(&open.root(), "robot", "pw");
    let reference = format!("{}/{REPO}:stable", auth.host());
    let work = Work::new();
    let docker_config = work.path().join("config.json");
    fs::write(
        &docker_config,
        format!(
            r#"{{"credHelpers": {{"{}": "nonexistent-bootsync"}}}}"#,
            auth.host()
        ),
    )
    .unwrap();
    let cfg = Config::new()
        .extra_top(&format!(
            "docker_config = {}",
            q(docker_config.to_str().unwrap())
        ))
        .registry(&auth.host())
        .target(target("talos", &reference, &work.dest("talos")));
    let out = work.sync_once(&work.config(&cfg));
    out.assert_code(1);
    out.assert_stderr_has(&["docker-credential-nonexistent-bootsync", "cannot run it"]);
    assert_nothing_published(&work.dest("talos"));
}
