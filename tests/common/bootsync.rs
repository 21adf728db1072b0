//! Writing bootsync configs, running the binary, and checking what it published.

use super::data::sha256_hex;
use super::http;
use super::registry::{free_port, tail};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_bootsync");

/// TOML basic string (JSON string escapes are valid TOML escapes).
pub fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

#[derive(Debug, Clone)]
pub enum FileSpec {
    File { source: String, name: String },
    Dir { source_dir: String, name: String },
}

#[derive(Debug, Clone)]
pub struct TargetCfg {
    pub name: String,
    pub reference: String,
    pub platform: Option<String>,
    pub dest: PathBuf,
    pub preset: Option<String>,
    pub files: Vec<FileSpec>,
    /// Raw TOML lines appended inside the `[[target]]` table (for invalid-config tests).
    pub extra: String,
}

impl TargetCfg {
    pub fn new(name: &str, reference: &str, dest: &Path) -> Self {
        TargetCfg {
            name: name.into(),
            reference: reference.into(),
            platform: None,
            dest: dest.to_path_buf(),
            preset: None,
            files: Vec::new(),
            extra: String::new(),
        }
    }
    pub fn platform(mut self, p: &str) -> Self {
        self.platform = Some(p.into());
        self
    }
    pub fn preset(mut self, p: &str) -> Self {
        self.preset = Some(p.into());
        self
    }
    pub fn file(mut self, source: &str, name: &str) -> Self {
        self.files.push(FileSpec::File {
            source: source.into(),
            name: name.into(),
        });
        self
    }
    pub fn dir(mut self, source_dir: &str, name: &str) -> Self {
        self.files.push(FileSpec::Dir {
            source_dir: source_dir.into(),
            name: name.into(),
        });
        self
    }
    pub fn extra(mut self, raw: &str) -> Self {
        self.extra.push_str(raw);
        self.extra.push('\n');
        self
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub interval: Option<String>,
    pub listen: String,
    pub retain: Option<u32>,
    /// Retention grace period (bootsync's default is 30m).
    pub grace: Option<String>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub stall_timeout: Option<String>,
    pub registries: Vec<String>,
    pub targets: Vec<TargetCfg>,
    /// Raw TOML lines appended at top level before any table.
    pub extra_top: String,
}

impl Config {
    /// A config with a free `listen` port and short timeouts.
    pub fn new() -> Self {
        Config {
            interval: None,
            listen: format!("127.0.0.1:{}", free_port()),
            retain: None,
            grace: None,
            connect_timeout: Some("3s".into()),
            request_timeout: Some("20s".into()),
            stall_timeout: Some("20s".into()),
            registries: Vec::new(),
            targets: Vec::new(),
            extra_top: String::new(),
        }
    }
    pub fn interval(mut self, i: &str) -> Self {
        self.interval = Some(i.into());
        self
    }
    pub fn retain(mut self, n: u32) -> Self {
        self.retain = Some(n);
        self
    }
    pub fn grace(mut self, g: &str) -> Self {
        self.grace = Some(g.into());
        self
    }
    /// An insecure (plain HTTP) registry.
    pub fn registry(mut self, host: &str) -> Self {
        self.registries.push(host.into());
        self
    }
    pub fn target(mut self, t: TargetCfg) -> Self {
        self.targets.push(t);
        self
    }
    pub fn extra_top(mut self, raw: &str) -> Self {
        self.extra_top.push_str(raw);
        self.extra_top.push('\n');
        self
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(i) = &self.interval {
            s += &format!("interval = {}\n", q(i));
        }
        s += &format!("listen = {}\n", q(&self.listen));
        if let Some(r) = self.retain {
            s += &format!("retain = {r}\n");
        }
        if let Some(g) = &self.grace {
            s += &format!("grace = {}\n", q(g));
        }
        if let Some(t) = &self.connect_timeout {
            s += &format!("connect_timeout = {}\n", q(t));
        }
        if let Some(t) = &self.request_timeout {
            s += &format!("request_timeout = {}\n", q(t));
        }
        if let Some(t) = &self.stall_timeout {
            s += &format!("stall_timeout = {}\n", q(t));
        }
        s += &self.extra_top;
        for h in &self.registries {
            s += &format!("\n[[registry]]\nhost = {}\ninsecure = true\n", q(h));
        }
        for t in &self.targets {
            s += &format!(
                "\n[[target]]\nname = {}\nreference = {}\ndest = {}\n",
                q(&t.name),
                q(&t.reference),
                q(t.dest.to_str().unwrap())
            );
            if let Some(p) = &t.platform {
                s += &format!("platform = {}\n", q(p));
            }
            if let Some(p) = &t.preset {
                s += &format!("preset = {}\n", q(p));
            }
            s += &t.extra;
            for f in &t.files {
                match f {
                    FileSpec::File { source, name } => {
                        s += &format!(
                            "[[target.files]]\nsource = {}\nname = {}\n",
                            q(source),
                            q(name)
                        )
                    }
                    FileSpec::Dir { source_dir, name } => {
                        s += &format!(
                            "[[target.files]]\nsource_dir = {}\nname = {}\n",
                            q(source_dir),
                            q(name)
                        )
                    }
                }
            }
        }
        s
    }
}

/// A scratch directory for one test: config files, dests, daemon logs.
pub struct Work {
    pub dir: tempfile::TempDir,
}

#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub args: Vec<String>,
}

impl Outcome {
    pub fn describe(&self) -> String {
        format!(
            "`bootsync {}` exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit {code}; {}",
            self.describe()
        );
        self
    }
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        self.assert_code(0)
    }
    /// Case-insensitive check that stderr contains every needle.
    #[track_caller]
    pub fn assert_stderr_has(&self, needles: &[&str]) -> &Self {
        let lower = self.stderr.to_lowercase();
        for n in needles {
            assert!(
                lower.contains(&n.to_lowercase()),
                "stderr does not mention {n:?}; {}",
                self.describe()
            );
        }
        self
    }
    /// Case-insensitive check that stderr contains at least one of the needles.
    #[track_caller]
    pub fn assert_stderr_has_any(&self, needles: &[&str]) -> &Self {
        let lower = self.stderr.to_lowercase();
        assert!(
            needles.iter().any(|n| lower.contains(&n.to_lowercase())),
            "stderr mentions none of {needles:?}; {}",
            self.describe()
        );
        self
    }
}

impl Work {
    pub fn new() -> Self {
        Work {
            dir: tempfile::Builder::new()
                .prefix("bootsync-e2e-")
                .tempdir()
                .unwrap(),
        }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    /// `<work>/assets/<name>` (not created: bootsync should create it).
    pub fn dest(&self, name: &str) -> PathBuf {
        self.path().join("assets").join(name)
    }
    pub fn write_config(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        fs::write(&p, text).unwrap();
        p
    }
    /// Writes the config, with this work dir's own `state_dir` (pins) unless one is set.
    pub fn config(&self, cfg: &Config) -> PathBuf {
        let mut text = cfg.render();
        if !text.contains("state_dir") {
            let state = self.path().join("state");
            text = format!("state_dir = {}\n{text}", q(state.to_str().unwrap()));
        }
        self.write_config("bootsync.toml", &text)
    }

    /// Runs `bootsync --config FILE ARGS...` to completion (120 s cap).
    pub fn run(&self, config: &Path, args: &[&str]) -> Outcome {
        let mut all = vec!["--config".to_string(), config.to_str().unwrap().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        run_bin(&all, Duration::from_secs(120))
    }

    pub fn sync_once(&self, config: &Path) -> Outcome {
        self.run(config, &["sync", "--once"])
    }

    pub fn check_config(&self, config: &Path) -> Outcome {
        self.run(config, &["check-config"])
    }

    /// Starts `bootsync --config FILE run` in the background.
    pub fn spawn_run(&self, config: &Path, listen: &str) -> Daemon {
        self.spawn_run_with(config, listen, &[], &[])
    }
}

pub fn run_bin(args: &[String], limit: Duration) -> Outcome {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_BACKTRACE", "1");
    run_command(cmd, args.to_vec(), limit)
}

/// Runs `cmd` (a bootsync invocation; `args` for messages) to completion, `limit` at most,
/// collecting stdout and stderr on their own threads so neither pipe can fill up.
pub fn run_command(mut cmd: Command, args: Vec<String>, limit: Duration) -> Outcome {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
            panic!(
                "`bootsync {}` did not finish within {limit:?}; stderr:\n{stderr}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let outcome = Outcome {
        code: status.code(),
        stdout: String::from_utf8_lossy(&t_out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
        args,
    };
    // `BOOTSYNC_E2E_VERBOSE=1 cargo test --test e2e -- --nocapture` shows every run's output.
    if std::env::var_os("BOOTSYNC_E2E_VERBOSE").is_some() {
        eprintln!("{}", outcome.describe());
    }
    outcome
}

/// `bootsync run` in the background; killed on drop.
pub struct Daemon {
    child: Child,
    pub base: String,
    pub log_path: PathBuf,
}

impl Daemon {
    pub fn get(&self, path: &str) -> Option<http::Response> {
        http::request(
            "GET",
            &format!("{}{}", self.base, path),
            &[],
            &[],
            Duration::from_secs(5),
        )
        .ok()
    }

    pub fn status(&self) -> Option<Value> {
        let r = self.get("/status")?;
        if r.status != 200 {
            return None;
        }
        serde_json::from_slice(&r.body).ok()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log_path, 40)
    }

    /// Polls `/status` until `cond` holds (or panics after `limit` with the last status and log).
    pub fn wait_status(
        &mut self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        let mut last = None;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "bootsync run exited ({st}) while waiting for {what}; log:\n{}",
                    self.log_tail()
                );
            }
            if let Some(v) = self.status() {
                if cond(&v) {
                    return v;
                }
                last = Some(v);
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {limit:?} waiting for {what}; last /status:\n{}\nlog:\n{}",
                    last.map(|v| serde_json::to_string_pretty(&v).unwrap())
                        .unwrap_or_else(|| "<no answer>".into()),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The target object named `name` in a `/status` document.
pub fn status_target<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["targets"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == name)
}

// ---- checking what was published ----

/// One file bootsync should have published.
pub struct Want<'a> {
    pub name: &'a str,
    pub source: &'a str,
    pub data: &'a [u8],
}

pub struct Published<'a> {
    pub target: &'a str,
    pub reference: &'a str,
    pub platform: &'a str,
    /// `sha256:<hex>` of the platform image manifest.
    pub digest: &'a str,
    /// `sha256:<hex>` the tag (or pinned reference) resolved to.
    pub tag_digest: &'a str,
    pub files: &'a [Want<'a>],
}

pub fn entries(dir: &Path) -> BTreeSet<String> {
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

pub fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

pub fn readlink(path: &Path) -> String {
    fs::read_link(path)
        .unwrap_or_else(|e| panic!("{path:?} is not a symlink: {e}"))
        .to_string_lossy()
        .into_owned()
}

pub fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

pub fn read_meta(dest: &Path, digest: &str) -> Value {
    let p = dest
        .join("versions")
        .join(hex_of(digest))
        .join(".bootsync.json");
    let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {p:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{p:?} is not JSON ({e}): {text}"))
}

/// Checks one published version (its files, modes and `.bootsync.json`), without looking at
/// `current` or the stable links.
#[track_caller]
pub fn assert_version(dest: &Path, p: &Published) {
    let vdir = dest.join("versions").join(hex_of(p.digest));
    assert!(
        vdir.is_dir(),
        "version dir {vdir:?} missing; versions present: {:?}",
        entries(&dest.join("versions"))
    );
    for w in p.files {
        let f = vdir.join(w.name);
        let got = fs::read(&f).unwrap_or_else(|e| panic!("read {f:?}: {e}"));
        assert!(
            got == w.data,
            "{f:?}: content differs from what was pushed ({} bytes, sha256 {}; want {} bytes, sha256 {})",
            got.len(),
            sha256_hex(&got),
            w.data.len(),
            sha256_hex(w.data)
        );
        assert_eq!(mode(&f), 0o644, "{f:?} mode");
    }
    let meta = read_meta(dest, p.digest);
    assert_eq!(meta["target"], p.target, "target in {meta}");
    assert_eq!(meta["reference"], p.reference, "reference in {meta}");
    assert_eq!(meta["platform"], p.platform, "platform in {meta}");
    assert_eq!(meta["digest"], p.digest, "digest in {meta}");
    assert_eq!(meta["tag_digest"], p.tag_digest, "tag_digest in {meta}");
    let published_at = meta["published_at"]
        .as_str()
        .unwrap_or_else(|| panic!("published_at in {meta}"));
    assert!(
        looks_rfc3339(published_at),
        "published_at {published_at:?} is not RFC 3339"
    );
    let files = meta["files"]
        .as_array()
        .unwrap_or_else(|| panic!("files in {meta}"));
    for w in p.files {
        let m = files
            .iter()
            .find(|f| f["name"] == w.name)
            .unwrap_or_else(|| panic!("no files[] entry for {} in {meta}", w.name));
        assert_eq!(
            m["size"],
            w.data.len() as u64,
            "size of {} in {meta}",
            w.name
        );
        assert_eq!(
            m["sha256"],
            sha256_hex(w.data),
            "sha256 of {} in {meta}",
            w.name
        );
        assert_eq!(m["source"], w.source, "source of {} in {meta}", w.name);
    }
}

/// Checks that `p` is the current version of `dest`: the version itself, `current`, the stable
/// links, and that `dest` holds nothing else.
#[track_caller]
pub fn assert_current(dest: &Path, p: &Published) {
    assert_version(dest, p);
    let hex = hex_of(p.digest);
    assert_eq!(
        readlink(&dest.join("current")),
        format!("versions/{hex}"),
        "current link"
    );
    let mut expected: BTreeSet<String> = ["versions".to_string(), "current".to_string()].into();
    for w in p.files {
        let link = dest.join(w.name);
        assert_eq!(
            readlink(&link),
            format!("current/{}", w.name),
            "stable link {link:?}"
        );
        let got = fs::read(&link).unwrap_or_else(|e| panic!("read through {link:?}: {e}"));
        assert!(
            got == w.data,
            "{link:?} does not resolve to the pushed bytes"
        );
        expected.insert(w.name.to_string());
    }
    assert_only_entries(dest, &expected);
}

/// `dest` holds exactly `expected` (no staging or temp debris).
#[track_caller]
pub fn assert_only_entries(dest: &Path, expected: &BTreeSet<String>) {
    let got = entries(dest);
    assert_eq!(&got, expected, "entries of {dest:?} (debris?)");
}

/// The version directories under `dest/versions`.
pub fn versions(dest: &Path) -> BTreeSet<String> {
    entries(&dest.join("versions"))
}

/// Nothing published: no `current`, no stable links, no version directories.
#[track_caller]
pub fn assert_nothing_published(dest: &Path) {
    assert!(
        fs::symlink_metadata(dest.join("current")).is_err(),
        "{dest:?}/current exists although nothing should be published"
    );
    assert!(
        versions(dest).is_empty(),
        "versions published: {:?}",
        versions(dest)
    );
    let leftover: Vec<String> = entries(dest)
        .into_iter()
        .filter(|e| e != "versions")
        .collect();
    assert!(
        leftover.is_empty(),
        "unexpected entries in {dest:?}: {leftover:?}"
    );
}

fn looks_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b't' || b[10] == b' ')
        && b[13] == b':'
        && b[16] == b':'
        && (s.ends_with('Z') || s.ends_with('z') || s[19..].contains('+') || s[19..].contains('-'))
}

impl Work {
    /// Like [`Work::spawn_run`], with global options before `run` (e.g. `--log-format json`)
    /// and extra environment variables (e.g. `RUST_LOG=debug`).
    pub fn spawn_run_with(
        &self,
        config: &Path,
        listen: &str,
        global: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let log_path = self.path().join(format!("daemon-{}.log", free_port()));
        let log = fs::File::create(&log_path).unwrap();
        let child = Command::new(BIN)
            .args(global)
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("RUST_BACKTRACE", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        Daemon {
            child,
            base: format!("http://{listen}"),
            log_path,
        }
    }
}

impl Daemon {
    /// The daemon's process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}
