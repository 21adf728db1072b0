//! What every target is doing, shared by the sync loop, the HTTP API and the CLI.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::Target;
use crate::store::VersionManifest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not checked yet since start.
    Pending,
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
    pub digest: String,
    pub tag_digest: String,
    pub published_at: String,
    pub files: Vec<PublishedFile>,
    /// What the UKI the boot files came from said about itself (Talos version, command line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<crate::store::BootInfo>,
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
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetStatus {
    pub name: String,
    pub reference: String,
    pub platform: String,
    pub dest: String,
    pub state: State,
    pub published: Option<Published>,
    pub last_check: Option<String>,
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub next_check: Option<String>,
    /// The digest a rollback pinned this target to.
    pub pinned: Option<String>,
    /// Served files or links restored after something else changed them.
    pub self_repairs: u64,
    /// What startup recovery found, when it had to act.
    pub recovery: Option<String>,
    pub hook_failures: u64,
    pub last_hook_error: Option<String>,
}

/// The `/status` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub version: String,
    pub ready: bool,
    /// Why the last config reload was rejected (the previous config keeps running).
    pub config_error: Option<String>,
    pub targets: Vec<TargetStatus>,
}

/// Shared, cheaply cloned status of all targets.
#[derive(Clone, Default)]
pub struct Board {
    inner: Arc<Mutex<Vec<TargetStatus>>>,
    config_error: Arc<Mutex<Option<String>>>,
}

fn fresh(t: &Target) -> TargetStatus {
    TargetStatus {
        name: t.name.clone(),
        reference: t.reference.clone(),
        platform: t.platform.to_string(),
        dest: t.dest.display().to_string(),
        state: State::Pending,
        published: crate::sync::published(t).as_ref().map(Published::from),
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

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Board {
    /// A board for `targets`, seeded with what is already published on disk.
    pub fn new(targets: &[Target]) -> Board {
        Board {
            inner: Arc::new(Mutex::new(targets.iter().map(fresh).collect())),
            config_error: Arc::default(),
        }
    }

    /// Follows a reloaded config: keeps the state of targets that stay, adds and drops others.
    pub fn reconcile(&self, targets: &[Target]) {
        let mut list = self.lock();
        let old = std::mem::take(&mut *list);
        for t in targets {
            let entry = match old.iter().find(|o| o.name == t.name) {
                Some(o) => TargetStatus {
                    reference: t.reference.clone(),
                    platform: t.platform.to_string(),
                    dest: t.dest.display().to_string(),
                    ..o.clone()
                },
                None => fresh(t),
            };
            list.push(entry);
        }
    }

    pub fn set_config_error(&self, error: Option<String>) {
        *self.config_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    pub fn is_syncing(&self, name: &str) -> bool {
        self.lock()
            .iter()
            .any(|t| t.name == name && t.state == State::Syncing)
    }

    pub fn set_pinned(&self, name: &str, digest: Option<String>) {
        self.update(name, |t| t.pinned = digest);
    }

    pub fn set_published(&self, name: &str, manifest: &VersionManifest) {
        self.update(name, |t| t.published = Some(Published::from(manifest)));
    }

    pub fn recovered(&self, name: &str, note: String) {
        self.update(name, |t| t.recovery = Some(note));
    }

    pub fn self_repaired(&self, name: &str) {
        self.update(name, |t| t.self_repairs += 1);
    }

    pub fn hook_result(&self, name: &str, result: &Result<(), String>) {
        self.update(name, |t| match result {
            Ok(()) => t.last_hook_error = None,
            Err(e) => {
                t.hook_failures += 1;
                t.last_hook_error = Some(e.clone());
            }
        });
    }

    /// A one-line summary for systemd's STATUS=.
    pub fn summary(&self) -> String {
        let list = self.lock();
        let syncing: Vec<&str> = list
            .iter()
            .filter(|t| t.state == State::Syncing)
            .map(|t| t.name.as_str())
            .collect();
        let mut parts = vec![if syncing.is_empty() {
            "idle".to_string()
        } else {
            format!("syncing {}", syncing.join(", "))
        }];
        for t in list.iter() {
            let what = match (&t.published, t.state) {
                (_, State::Failed) => {
                    format!("{} failing ({} in a row)", t.name, t.consecutive_failures)
                }
                (Some(p), _) => {
                    let hex = p.digest.strip_prefix("sha256:").unwrap_or(&p.digest);
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
                        "{} sha256:{}... published {} ago",
                        t.name,
                        &hex[..hex.len().min(12)],
                        if age.is_empty() { "0m".into() } else { age }
                    )
                }
                (None, _) => format!("{} nothing published yet", t.name),
            };
            parts.push(what);
        }
        parts.join("; ")
    }

    fn lock(&self) -> MutexGuard<'_, Vec<TargetStatus>> {
        // A panic while holding the lock cannot leave the plain data inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut TargetStatus)) {
        if let Some(t) = self.lock().iter_mut().find(|t| t.name == name) {
            f(t);
        }
    }

    pub fn syncing(&self, name: &str) {
        self.update(name, |t| t.state = State::Syncing);
    }

    pub fn succeeded(&self, name: &str, manifest: &VersionManifest, next: Option<SystemTime>) {
        let now = rfc3339(SystemTime::now());
        self.update(name, |t| {
            t.state = State::Ok;
            t.published = Some(Published::from(manifest));
            t.last_check = Some(now.clone());
            t.last_success = Some(now);
            t.last_error = None;
            t.consecutive_failures = 0;
            t.next_check = next.map(rfc3339);
        });
    }

    /// Records a failure; returns the number of consecutive failures.
    pub fn failed(&self, name: &str, error: &str, next: Option<SystemTime>) -> u32 {
        let mut count = 0;
        self.update(name, |t| {
            t.state = State::Failed;
            t.last_check = Some(rfc3339(SystemTime::now()));
            t.last_error = Some(error.to_string());
            t.consecutive_failures += 1;
            t.next_check = next.map(rfc3339);
            count = t.consecutive_failures;
        });
        count
    }

    pub fn set_next(&self, name: &str, next: SystemTime) {
        self.update(name, |t| t.next_check = Some(rfc3339(next)));
    }

    /// The digest `name` serves, as last recorded.
    pub fn published_digest(&self, name: &str) -> Option<String> {
        self.lock()
            .iter()
            .find(|t| t.name == name)
            .and_then(|t| t.published.as_ref().map(|p| p.digest.clone()))
    }

    pub fn consecutive_failures(&self, name: &str) -> u32 {
        self.lock()
            .iter()
            .find(|t| t.name == name)
            .map_or(0, |t| t.consecutive_failures)
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
        }
    }
}
