//! The `/status` document: a copy of every target's state, as its loop last reported it (the
//! loops own the state; this only shows it), plus what the config says of each target.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::agent::{Phase, TargetState};
use crate::config::Target;
use crate::digest::Digest;
use crate::store::{BootInfo, Signer, VersionManifest};

/// A target's health at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not checked yet since start.
    Pending,
    /// An operation is running.
    Syncing,
    Ok,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishedFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    pub digest: Digest,
    pub tag_digest: Digest,
    pub published_at: String,
    pub files: Vec<PublishedFile>,
    /// What the UKI the boot files came from said about itself (Talos version, command line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootInfo>,
    /// Who signed what the tag resolved to, as verified before this version was served
    /// (`null`: published without a signature policy).
    #[serde(default)]
    pub signature: Option<Signer>,
}

impl From<&VersionManifest> for Published {
    fn from(m: &VersionManifest) -> Self {
        Published {
            digest: m.digest.clone(),
            tag_digest: m.tag_digest.clone(),
            published_at: m.published_at.clone(),
            files: m
                .files
                .iter()
                .map(|f| PublishedFile {
                    name: f.name.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                })
                .collect(),
            boot: m.boot.clone(),
            signature: m.signature.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetStatus {
    pub name: String,
    pub reference: String,
    pub platform: String,
    pub dest: String,
    /// The signature policy: `unverified` (no `[target.verify]`), or who must have signed.
    #[serde(default)]
    pub verify: String,
    pub state: State,
    /// What the target's loop is doing: starting, idle, syncing, repairing, rolling_back,
    /// unpinning.
    #[serde(default)]
    pub phase: String,
    pub published: Option<Published>,
    pub last_check: Option<String>,
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub next_check: Option<String>,
    /// The digest a rollback pinned this target to.
    pub pinned: Option<Digest>,
    /// Served files or links restored after something else changed them.
    pub self_repairs: u64,
    /// What startup recovery found, when it had to act.
    pub recovery: Option<String>,
    pub hook_failures: u64,
    pub last_hook_error: Option<String>,
}

/// What bootsync knows of one host it fetches from: a registry or one of its mirrors.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostStatus {
    pub host: String,
    /// `upstream` or `mirror`.
    pub role: String,
    /// `ok` when its last request succeeded, else `failing`.
    pub state: String,
    pub last_ok: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Requests it answered successfully / that failed (since the start).
    pub successes: u64,
    pub failures: u64,
}

/// The `/status` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub version: String,
    pub ready: bool,
    /// Why the last config reload was rejected (the previous config keeps running).
    pub config_error: Option<String>,
    pub targets: Vec<TargetStatus>,
    /// Every registry and mirror asked so far, by host.
    #[serde(default)]
    pub hosts: Vec<HostStatus>,
}

/// Shared, cheaply cloned copy of every target's state.
#[derive(Clone)]
pub struct Board {
    inner: Arc<Mutex<Vec<TargetStatus>>>,
    config_error: Arc<Mutex<Option<String>>>,
    hosts: Arc<Mutex<std::collections::BTreeMap<String, HostStatus>>>,
    /// Bumped at every change (the systemd notifier and the readiness wait watch it).
    changes: Arc<watch::Sender<u64>>,
}

fn fresh(t: &Target) -> TargetStatus {
    TargetStatus {
        name: t.name.clone(),
        reference: t.reference.whole(),
        platform: t.platform.to_string(),
        dest: t.dest.display().to_string(),
        verify: verify_of(t),
        state: State::Pending,
        phase: Phase::Starting.as_str().to_string(),
        published: None,
        last_check: None,
        last_success: None,
        last_error: None,
        consecutive_failures: 0,
        next_check: None,
        pinned: None,
        self_repairs: 0,
        recovery: None,
        hook_failures: 0,
        last_hook_error: None,
    }
}

fn verify_of(t: &Target) -> String {
    t.verify
        .as_ref()
        .map_or_else(|| "unverified".to_string(), |p| p.describe())
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Board {
    /// A board for `targets`, each pending until its loop reports.
    pub fn new(targets: &[Target]) -> Board {
        Board {
            inner: Arc::new(Mutex::new(targets.iter().map(fresh).collect())),
            config_error: Arc::default(),
            hosts: Arc::default(),
            changes: Arc::new(watch::Sender::new(0)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<TargetStatus>> {
        // A panic while holding the lock cannot leave the plain data inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// A receiver told about every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Follows a reloaded config: keeps the state of targets that stay, adds and drops others.
    pub fn reconcile(&self, targets: &[Target]) {
        {
            let mut list = self.lock();
            let old = std::mem::take(&mut *list);
            for t in targets {
                let entry = match old.iter().find(|o| o.name == t.name) {
                    Some(o) => TargetStatus {
                        reference: t.reference.whole(),
                        platform: t.platform.to_string(),
                        dest: t.dest.display().to_string(),
                        verify: verify_of(t),
                        ..o.clone()
                    },
                    None => fresh(t),
                };
                list.push(entry);
            }
        }
        self.changed();
    }

    pub fn set_config_error(&self, error: Option<String>) {
        *self.config_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
        self.changed();
    }

    /// Copies a target's state in (what its loop reports).
    pub fn apply(&self, s: &TargetState) {
        {
            let mut list = self.lock();
            let Some(t) = list.iter_mut().find(|t| t.name == s.name) else {
                return;
            };
            t.phase = s.phase.as_str().to_string();
            t.state = match s.phase {
                Phase::Starting | Phase::Idle if s.last_error.is_some() => State::Failed,
                Phase::Starting | Phase::Idle if s.last_check.is_none() => State::Pending,
                Phase::Starting | Phase::Idle => State::Ok,
                _ => State::Syncing,
            };
            t.published = s.serving.as_ref().map(Published::from);
            t.last_check = s.last_check.map(rfc3339);
            t.last_success = s.last_success.map(rfc3339);
            t.last_error = s.last_error.clone();
            t.consecutive_failures = s.consecutive_failures;
            t.next_check = s.next_check.map(rfc3339);
            t.pinned = s.pin.clone();
            t.self_repairs = s.self_repairs;
            t.recovery = s.recovery.clone();
            t.hook_failures = s.hook_failures;
            t.last_hook_error = s.last_hook_error.clone();
        }
        self.changed();
    }

    /// A request to `host` succeeded (`error` = `None`) or failed.
    pub fn host_answered(&self, host: &str, role: &'static str, error: Option<&str>) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let h = hosts.entry(host.to_string()).or_insert_with(|| HostStatus {
            host: host.to_string(),
            role: role.to_string(),
            ..HostStatus::default()
        });
        let now = rfc3339(SystemTime::now());
        match error {
            None => {
                h.state = "ok".into();
                h.last_ok = Some(now);
                h.successes += 1;
            }
            Some(e) => {
                h.state = "failing".into();
                h.last_error = Some(e.to_string());
                h.last_error_at = Some(now);
                h.failures += 1;
            }
        }
    }

    /// Whether an operation of `name` is running.
    pub fn is_busy(&self, name: &str) -> bool {
        self.lock()
            .iter()
            .any(|t| t.name == name && t.state == State::Syncing)
    }

    /// Whether every target's startup recovery is done.
    pub fn recovered(&self) -> bool {
        self.lock()
            .iter()
            .all(|t| t.phase != Phase::Starting.as_str())
    }

    /// A one-line summary for systemd's STATUS=.
    pub fn summary(&self) -> String {
        let list = self.lock();
        let busy: Vec<&str> = list
            .iter()
            .filter(|t| t.state == State::Syncing)
            .map(|t| t.name.as_str())
            .collect();
        let mut parts = vec![if busy.is_empty() {
            "idle".to_string()
        } else {
            format!("syncing {}", busy.join(", "))
        }];
        for t in list.iter() {
            let what = match (&t.published, t.state) {
                (_, State::Failed) => {
                    format!("{} failing ({} in a row)", t.name, t.consecutive_failures)
                }
                (Some(p), _) => {
                    let age = humantime::parse_rfc3339(&p.published_at)
                        .ok()
                        .and_then(|at| SystemTime::now().duration_since(at).ok())
                        .map(|d| {
                            humantime::format_duration(std::time::Duration::from_secs(
                                d.as_secs() / 60 * 60,
                            ))
                            .to_string()
                        })
                        .unwrap_or_default();
                    format!(
                        "{} {}... published {} ago",
                        t.name,
                        p.digest.short(),
                        if age.is_empty() { "0m".into() } else { age }
                    )
                }
                (None, _) => format!("{} nothing published yet", t.name),
            };
            parts.push(what);
        }
        parts.join("; ")
    }

    pub fn report(&self) -> Report {
        let targets = self.lock().clone();
        Report {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: targets.iter().all(|t| t.published.is_some()),
            config_error: self
                .config_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            targets,
            hosts: self
                .hosts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect(),
        }
    }
}
