//! Serving-guarantee helpers: bootsync processes started with extra environment (the crash-test
//! pause hook) or a umask, killed with SIGKILL at will; and checks that what a dest serves is
//! one complete, verified version.

use super::bootsync::{run_command, status_target, Outcome, BIN};
use super::data::{bytes, cpio_entry, fake_kernel, sha256_hex};
use super::http;
use super::registry::tail;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How to start one bootsync process.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub env: Vec<(String, String)>,
    /// Run under this umask (through `sh -c 'umask N; exec bootsync ...'`).
    pub umask: Option<u32>,
}

impl Launch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    /// `BOOTSYNC_TEST_PAUSE_MS=ms` and debug logs of bootsync (which name each pause point).
    pub fn pause_ms(self, ms: u64) -> Self {
        self.env("BOOTSYNC_TEST_PAUSE_MS", &ms.to_string())
            .env("RUST_LOG", "info,bootsync=debug")
    }
    pub fn umask(mut self, mask: u32) -> Self {
        self.umask = Some(mask);
        self
    }

    /// `bootsync --config CONFIG ARGS...` as a command, not started.
    pub fn command(&self, config: &Path, args: &[&str]) -> Command {
        let mut cmd = match self.umask {
            None => Command::new(BIN),
            Some(mask) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("umask {mask:03o} && exec \"$0\" \"$@\""))
                    .arg(BIN);
                c
            }
        };
        cmd.arg("--config").arg(config).args(args);
        cmd.env("RUST_BACKTRACE", "1").stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs to completion (`limit` at most) and collects the output.
    pub fn run(&self, config: &Path, args: &[&str], limit: Duration) -> Outcome {
        let args_owned = args.iter().map(|s| s.to_string()).collect();
        run_command(self.command(config, args), args_owned, limit)
    }

    /// Starts in the background, stdout and stderr to `log`.
    pub fn spawn(&self, config: &Path, args: &[&str], log: &Path) -> Proc {
        let file = fs::File::create(log).unwrap();
        let child = self
            .command(config, args)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        Proc {
            child,
            log_path: log.to_path_buf(),
            base: String::new(),
        }
    }

    /// `bootsync run` in the background; `listen` is the config's API address.
    pub fn spawn_run(&self, config: &Path, listen: &str, log: &Path) -> Proc {
        let mut p = self.spawn(config, &["run"], log);
        p.base = format!("http://{listen}");
        p
    }
}

/// A background bootsync process; SIGKILLed on drop if still running.
pub struct Proc {
    child: Child,
    pub log_path: PathBuf,
    /// `http://LISTEN` for `run`.
    pub base: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// SIGKILL; true when the process was still running (false: it had exited by itself).
    pub fn kill9(&mut self) -> bool {
        if self.try_wait().is_some() {
            return false;
        }
        // SAFETY: kill(2) on our own, not yet reaped child: the pid cannot have been reused.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9: {}", std::io::Error::last_os_error());
        let st = self.child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        // It may have exited between try_wait and kill.
        st.signal() == Some(libc::SIGKILL)
    }

    /// SIGTERM and wait (10 s, then SIGKILL).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        if let Some(st) = self.try_wait() {
            return Some(st);
        }
        // SAFETY: as in kill9.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log_path, 40)
    }

    pub fn status(&self) -> Option<Value> {
        let r = http::request(
            "GET",
            &format!("{}/status", self.base),
            &[],
            &[],
            Duration::from_secs(5),
        )
        .ok()?;
        (r.status == 200)
            .then(|| serde_json::from_slice(&r.body).ok())
            .flatten()
    }

    /// Polls `/status` until target `name` satisfies `cond`; panics after `limit` with the last
    /// status and the log.
    #[track_caller]
    pub fn wait_target(
        &mut self,
        name: &str,
        what: &str,
        limit: Duration,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        let mut last = None;
        loop {
            if let Some(st) = self.try_wait() {
                panic!(
                    "bootsync exited ({st}) while waiting for {what}; log:\n{}",
                    self.log_tail()
                );
            }
            if let Some(v) = self.status() {
                if let Some(t) = status_target(&v, name) {
                    if cond(t) {
                        return t.clone();
                    }
                    last = Some(t.clone());
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {limit:?} waiting for {what}; last status of {name}:\n{}\nlog:\n{}",
                    last.map(|v| serde_json::to_string_pretty(&v).unwrap())
                        .unwrap_or_else(|| "<no answer>".into()),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until target `name` is `ok` with `digest` published.
    #[track_caller]
    pub fn wait_published(&mut self, name: &str, digest: &str, limit: Duration) -> Value {
        self.wait_target(name, &format!("{name} ok at {digest}"), limit, |t| {
            t["state"] == "ok" && t["published"]["digest"] == digest
        })
    }

    /// POST `path` (with an optional JSON body).
    pub fn post(&self, path: &str, body: Option<&Value>) -> http::Response {
        let data = body
            .map(|b| serde_json::to_vec(b).unwrap())
            .unwrap_or_default();
        let headers: &[(&str, &str)] = if body.is_some() {
            &[("Content-Type", "application/json")]
        } else {
            &[]
        };
        http::request(
            "POST",
            &format!("{}{path}", self.base),
            headers,
            &data,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("POST {path}: {e}; log:\n{}", self.log_tail()))
    }

    /// `POST /targets/NAME/sync`, retried while it answers 409 (a sync is running).
    pub fn trigger_sync(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.post(&format!("/targets/{name}/sync"), None);
            match r.status {
                202 => return,
                409 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                s => panic!("POST /targets/{name}/sync: {s} {}", r.text()),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- what a served tree must look like ----

/// Every version a test pushed: manifest hex -> published file name -> bytes.
pub type Catalog = HashMap<String, BTreeMap<String, Vec<u8>>>;

/// What `check_served` found.
#[derive(Debug, Clone)]
pub struct Served {
    /// The hex of the version `current` points at.
    pub hex: String,
    /// `.tmp-*` names inside that version's directory (transient debris of an interrupted
    /// manifest rewrite; not part of the version).
    pub stray: Vec<String>,
}

/// Checks that `dest` serves one complete version: `current` -> `versions/<hex>`, whose
/// `.bootsync.json` lists exactly the files present, each with its recorded size and sha256 and
/// byte-equal to what was pushed for that digest; every stable name in `names` is a link
/// `current/<name>` that resolves to the same bytes.
pub fn check_served(dest: &Path, names: &[&str], catalog: &Catalog) -> Result<Served, String> {
    let link = fs::read_link(dest.join("current"))
        .map_err(|e| format!("{dest:?}/current is not a readable symlink: {e}"))?;
    let link = link.to_string_lossy().into_owned();
    let hex = link
        .strip_prefix("versions/")
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .ok_or_else(|| format!("current -> {link:?}, not versions/<hex>"))?
        .to_string();
    let vdir = dest.join("versions").join(&hex);
    let meta_text = fs::read(vdir.join(".bootsync.json"))
        .map_err(|e| format!("current -> {link}: no readable .bootsync.json: {e}"))?;
    let meta: Value = serde_json::from_slice(&meta_text)
        .map_err(|e| format!("{vdir:?}/.bootsync.json is not JSON: {e}"))?;
    if meta["digest"] != format!("sha256:{hex}") {
        return Err(format!(
            "{vdir:?}/.bootsync.json names digest {}, not sha256:{hex}",
            meta["digest"]
        ));
    }
    let listed: BTreeMap<String, (u64, String)> = meta["files"]
        .as_array()
        .ok_or_else(|| format!("no files[] in {vdir:?}/.bootsync.json"))?
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap_or_default().to_string(),
                (
                    f["size"].as_u64().unwrap_or(u64::MAX),
                    f["sha256"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect();
    let mut present = BTreeSet::new();
    let mut stray = Vec::new();
    for e in fs::read_dir(&vdir).map_err(|e| format!("read {vdir:?}: {e}"))? {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name == ".bootsync.json" {
            continue;
        }
        if name.starts_with(".tmp-") {
            stray.push(name);
            continue;
        }
        present.insert(name);
    }
    let listed_names: BTreeSet<String> = listed.keys().cloned().collect();
    if present != listed_names {
        return Err(format!(
            "version {hex}: files present {present:?}, .bootsync.json lists {listed_names:?}"
        ));
    }
    let pushed = catalog
        .get(&hex)
        .ok_or_else(|| format!("current -> {hex}, which is no version the test pushed"))?;
    let pushed_names: BTreeSet<String> = pushed.keys().cloned().collect();
    if present != pushed_names {
        return Err(format!(
            "version {hex} holds {present:?}; the pushed image has {pushed_names:?}"
        ));
    }
    for (name, (size, sha)) in &listed {
        let data = fs::read(vdir.join(name)).map_err(|e| format!("read {hex}/{name}: {e}"))?;
        let got = sha256_hex(&data);
        if data.len() as u64 != *size || got != *sha {
            return Err(format!(
                "version {hex}: {name} has {} bytes, sha256 {got}; .bootsync.json says {size}, {sha}",
                data.len()
            ));
        }
        if data != pushed[name] {
            return Err(format!(
                "version {hex}: {name} differs from the pushed bytes"
            ));
        }
    }
    for name in names {
        let l = dest.join(name);
        let target = fs::read_link(&l).map_err(|e| format!("stable link {l:?}: {e}"))?;
        if target != Path::new("current").join(name) {
            return Err(format!(
                "stable link {l:?} -> {target:?}, not current/{name}"
            ));
        }
        let data = fs::read(&l).map_err(|e| format!("read through {l:?}: {e}"))?;
        if pushed.get(*name) != Some(&data) {
            return Err(format!("{l:?} does not resolve to {name} of version {hex}"));
        }
    }
    Ok(Served { hex, stray })
}

/// Checks that the matchbox profile points at one complete version under `url_prefix`: the
/// kernel URL and every initrd URL name files of the same `versions/<hex>`, and those files are
/// byte-equal to what was pushed for it. Returns the hex.
pub fn check_profile(
    profile: &Path,
    dest: &Path,
    url_prefix: &str,
    catalog: &Catalog,
) -> Result<String, String> {
    let text = fs::read(profile).map_err(|e| format!("read {profile:?}: {e}"))?;
    let doc: Value =
        serde_json::from_slice(&text).map_err(|e| format!("{profile:?} is not JSON: {e}"))?;
    let mut urls = vec![doc["boot"]["kernel"]
        .as_str()
        .unwrap_or_default()
        .to_string()];
    for u in doc["boot"]["initrd"].as_array().into_iter().flatten() {
        urls.push(u.as_str().unwrap_or_default().to_string());
    }
    let mut hexes = BTreeSet::new();
    for url in &urls {
        let rest = url
            .strip_prefix(url_prefix)
            .and_then(|r| r.strip_prefix("/versions/"))
            .ok_or_else(|| format!("profile URL {url:?} is not under {url_prefix}/versions/"))?;
        let (hex, name) = rest
            .split_once('/')
            .ok_or_else(|| format!("profile URL {url:?} has no file name"))?;
        hexes.insert(hex.to_string());
        let pushed = catalog
            .get(hex)
            .ok_or_else(|| format!("profile URL {url:?}: no version the test pushed"))?;
        let path = dest.join("versions").join(hex).join(name);
        let data = fs::read(&path).map_err(|e| format!("profile URL {url:?}: {path:?}: {e}"))?;
        if pushed.get(name) != Some(&data) {
            return Err(format!(
                "profile URL {url:?}: {path:?} differs from the pushed {name}"
            ));
        }
    }
    match hexes.len() {
        1 => Ok(hexes.into_iter().next().unwrap()),
        _ => Err(format!("profile {profile:?} mixes versions: {urls:?}")),
    }
}

/// Every `.staging-*` / `.tmp-*` entry in `dest`, `dest/versions` and inside each version
/// directory (all of which matchbox would serve).
pub fn debris(dest: &Path) -> Vec<PathBuf> {
    let is_debris = |p: &Path| {
        p.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n.starts_with(".staging-") || n.starts_with(".tmp-")
        })
    };
    let list = |d: &Path| -> Vec<PathBuf> {
        fs::read_dir(d)
            .map(|rd| rd.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    let mut found: Vec<PathBuf> = list(dest).into_iter().filter(|p| is_debris(p)).collect();
    for p in list(&dest.join("versions")) {
        if is_debris(&p) {
            found.push(p);
        } else if p.is_dir() {
            found.extend(list(&p).into_iter().filter(|q| is_debris(q)));
        }
    }
    found
}

// ---- test data that compresses well ----

/// An x86 bzImage that passes bootsync's kernel check (header and length) whose protected-mode
/// part is almost all zeros: `len` bytes on disk, a few KB in a gzip layer.
pub fn compressible_bzimage(seed: u64, len: usize) -> Vec<u8> {
    let mut k = fake_kernel("amd64", seed, len);
    let setup = 5 * 512;
    k[setup + 64..].fill(0);
    k
}

/// An uncompressed newc cpio initramfs (a raw cpio member) with one `init` of `len` bytes,
/// almost all zeros.
pub fn compressible_cpio(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    data[..64].copy_from_slice(&bytes(seed, 64));
    let mut out = Vec::new();
    cpio_entry(&mut out, "init", 0o100755, &data);
    cpio_entry(&mut out, "TRAILER!!!", 0, &[]);
    out
}
