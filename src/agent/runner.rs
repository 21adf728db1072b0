//! The operations on one target — recover, sync (publish, reactivate, retag, serve the pin),
//! repair, rollback, unpin — and the one epilogue each of them ends in: the matchbox profile,
//! the target's state (what `/status` shows), the metrics, the hook when what is served
//! changed, a log line. The daemon's loops and the CLI (without a daemon) run the same code.
//!
//! File-system work (hashing, fsyncs, renames, pruning) runs on blocking threads: the async
//! runtime's workers stay free for the API and the downloads.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Settings, Target};
use crate::digest::Digest;
use crate::pipeline::{self, PipelineError};
use crate::registry::{
    Access, Clients, Credentials, HelperCache, ImageManifest, Observer, Registry, RegistryError,
    TokenCache,
};
use crate::signature::{self, Policy, SignatureError, Signer};
use crate::store::pins::{self, PinState};
use crate::store::profile::{self, ProfileError};
use crate::store::{self, Recovery, Store, StoreError, VersionManifest};
use crate::text::{error_chain, printable};

use super::decide::{decide, Facts, Integrity, Pin, Step, Version};
use super::hook;
use super::state::{Phase, TargetState};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Pipeline(#[from] PipelineError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Profile(#[from] ProfileError),
    #[error("pinned to {digest}, but that version is not intact in the store: run `bootsync unpin {target}` or roll back to another version")]
    PinnedMissing { target: String, digest: Digest },
    #[error("{0}")]
    Signature(#[from] SignatureError),
    #[error("version {digest} is not signed as the target's [verify] policy asks ({why}): roll back to a version verified under it, or `bootsync unpin {target}`")]
    Unverified {
        target: String,
        digest: Digest,
        why: String,
    },
    #[error("pin state in {dir}: {source}")]
    Pin {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("internal error (a bug, please report it): {0}")]
    Internal(String),
}

impl SyncError {
    /// How long the registry asked us to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SyncError::Registry(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// Where a target reports: the status board and the metrics (the service implements it; the
/// CLI's one-shot commands use a quiet one).
pub trait Reporter: Send + Sync {
    /// The target's state, after every change of it.
    fn state(&self, _state: &TargetState) {}
    /// An operation ended: its label (`published`, `up_to_date`, `failed`, ...), how long it
    /// took, the failures in a row, the digest now served and the one served before.
    fn finished(
        &self,
        _target: &str,
        _label: &'static str,
        _took: Duration,
        _failures: u32,
        _serving: Option<&Digest>,
        _previous: Option<&Digest>,
    ) {
    }
    fn repaired(&self, _target: &str) {}
    /// The target's reference resolved to `digest`.
    fn tag_resolved(&self, _target: &str, _digest: &Digest) {}
    /// Free bytes of the target's dest file system, after an operation.
    fn free_space(&self, _target: &str, _bytes: u64) {}
    /// A signature check ended: `verified`, `unsigned` or `rejected`.
    fn signature_checked(&self, _target: &str, _result: &'static str) {}
    fn hook_failed(&self, _target: &str) {}
    /// An observer of this target's registry traffic.
    fn observer(&self, _target: &str) -> Option<Arc<dyn Observer>> {
        None
    }
}

/// A reporter that reports nothing (tests).
#[cfg(test)]
pub struct Quiet;

#[cfg(test)]
impl Reporter for Quiet {}

/// What the operations of every target share: the settings (replaced on reload), cached
/// registry tokens, the HTTP clients (their connections reused across polls), the reporter.
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub tokens: TokenCache,
    pub helpers: HelperCache,
    pub clients: Clients,
    pub reporter: Arc<dyn Reporter>,
}

impl Context {
    pub fn new(settings: Settings, reporter: Arc<dyn Reporter>) -> Context {
        Context {
            settings: Arc::new(settings),
            tokens: TokenCache::default(),
            helpers: HelperCache::default(),
            clients: Clients::default(),
            reporter,
        }
    }

    /// The same shared state with new settings (a reload).
    pub fn with_settings(&self, settings: Settings) -> Context {
        Context {
            settings: Arc::new(settings),
            ..self.clone()
        }
    }
}

/// What a successful operation did.
#[derive(Debug, Clone)]
pub struct Done {
    /// For logs, the CLI and metrics: `published`, `reactivated`, `up_to_date`, `pinned`,
    /// `rolled_back`, `repaired`, `recovered`, `fell_back`.
    pub label: &'static str,
    pub serving: Option<VersionManifest>,
    /// Whether what is served changed (then the hook runs).
    pub changed: bool,
}

/// Runs `f` on a blocking thread (file-system work stays off the async workers).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SyncError> + Send + 'static,
) -> Result<T, SyncError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SyncError::Internal(e.to_string()))?
}

/// How long `open_waiting` waits for another bootsync process to release `dest`.
const LOCK_WAIT: Duration = Duration::from_secs(30);

fn open_store(target: &Target, settings: &Settings, wait: Duration) -> Result<Store, SyncError> {
    Ok(Store::open_waiting(&target.dest, &settings.modes, wait)?)
}

/// The names a version of `m`'s layout publishes, or none when `m` holds no layout the config
/// asks for.
fn names_for(target: &Target, m: &VersionManifest) -> Vec<String> {
    store::names_of(m, &target.name_sets())
        .map(<[String]>::to_vec)
        .unwrap_or_default()
}

fn version_of(m: &VersionManifest, intact: bool, policy: Option<&Policy>) -> Version {
    Version {
        digest: m.digest.clone(),
        tag_digest: m.tag_digest.clone(),
        integrity: if intact {
            Integrity::Intact
        } else {
            Integrity::Damaged
        },
        signed: trusted(policy, m),
    }
}

/// Whether version `m` may serve under `policy`: always without one; with one, only when its
/// record names a signer the policy still trusts.
fn trusted(policy: Option<&Policy>, m: &VersionManifest) -> bool {
    policy.is_none_or(|p| m.signature.as_ref().is_some_and(|s| p.accepts(s)))
}

/// Why version `m` does not satisfy `policy` (for errors).
fn untrusted_reason(m: &VersionManifest) -> String {
    match &m.signature {
        None => "it was published without a signature check".into(),
        Some(s) => format!("its signer, {s}, is no longer trusted"),
    }
}

/// What the store says before the registry is asked.
struct Local {
    facts: Facts,
    current: Option<VersionManifest>,
    pinned: Option<VersionManifest>,
    stale_pin: bool,
    /// Who signed the tag digest, once `Step::VerifySignature` verified it.
    signer: Option<Signer>,
}

/// Reads the local facts (pin, current and pinned versions with a cheap integrity check).
/// `dest` is read, never written.
fn local_facts(settings: &Settings, target: &Target, verify: bool) -> Local {
    let accepted = target.name_sets();
    let versions = target.dest.join("versions");
    let current = store::current_of(&target.dest);
    let (pin, pinned, stale_pin) = match pins::read(&settings.state_dir, target) {
        PinState::Active(p) => {
            let m = store::read_version(&versions, p.digest.hex());
            (Pin::Active(p.digest), m, false)
        }
        PinState::Stale(p) => (Pin::Stale(p.digest), None, true),
        PinState::None => (Pin::None, None, false),
    };
    let intact = |m: &VersionManifest| store::is_intact(&versions, m, &accepted);
    let policy = target.verify.as_deref();
    Local {
        facts: Facts {
            pin,
            current: current.as_ref().map(|m| version_of(m, intact(m), policy)),
            pinned: pinned.as_ref().map(|m| version_of(m, intact(m), policy)),
            verify,
            reference_digest: target
                .reference
                .digest()
                .and_then(|d| d.parse::<Digest>().ok()),
            tag: None,
            manifest: None,
            retained: None,
            policy: policy.is_some(),
            signed_tag: None,
        },
        current,
        pinned,
        stale_pin,
        signer: None,
    }
}

/// The version the target's matchbox profile names now, which pruning keeps until the
/// epilogue has rewritten the profile.
fn profile_keeps(target: &Target) -> Vec<String> {
    target
        .profile
        .as_ref()
        .and_then(profile::named_version)
        .into_iter()
        .collect()
}

/// A connection to the target's registry.
fn connect(cx: &Context, target: &Target) -> Result<Registry, SyncError> {
    let settings = &cx.settings;
    let registry_settings = settings.registry(target.reference.resolve_registry());
    let credentials = |host: &str| Credentials::for_host(Some(settings), host, &cx.helpers);
    Ok(Registry::connect(
        &target.reference,
        Access {
            settings: &registry_settings,
            credentials: &credentials,
            clients: &cx.clients,
        },
        settings.timeouts,
    )?
    .with_tokens(cx.tokens.clone())
    .with_observer(cx.reporter.observer(&target.name)))
}

/// The facts the registry gives, asked one step at a time until `decide` names an action or a
/// step `stop` says not to take (the dry run does not re-hash). Returns the step reached, the
/// platform manifest fetched, the retained version found for it, and the registry connection
/// (a download goes on with it: a mirror found unreachable stays skipped).
async fn resolve_steps(
    cx: &Context,
    target: &Target,
    local: &mut Local,
    stop: impl Fn(&Step) -> bool,
) -> Result<
    (
        Step,
        Option<ImageManifest>,
        Option<VersionManifest>,
        Option<Registry>,
    ),
    SyncError,
> {
    let mut registry: Option<Registry> = None;
    let mut image: Option<ImageManifest> = None;
    let mut retained: Option<VersionManifest> = None;
    let versions = target.dest.join("versions");
    loop {
        let step = decide(&local.facts);
        if step.is_action() || stop(&step) {
            return Ok((step, image, retained, registry));
        }
        let verify_one = |m: Option<VersionManifest>| async {
            let Some(m) = m else {
                return Ok(Integrity::Damaged);
            };
            let dest = target.dest.clone();
            blocking(move || {
                Ok(match store::verify_at(&dest.join("versions"), &dest, &m) {
                    Ok(()) => Integrity::Verified,
                    Err(e) => {
                        tracing::warn!("{e}");
                        Integrity::Damaged
                    }
                })
            })
            .await
        };
        match step {
            Step::VerifyCurrent => {
                let i = verify_one(local.current.clone()).await?;
                if let Some(c) = &mut local.facts.current {
                    c.integrity = i;
                }
            }
            Step::VerifyPinned => {
                let i = verify_one(local.pinned.clone()).await?;
                if let Some(p) = &mut local.facts.pinned {
                    p.integrity = i;
                }
            }
            Step::VerifyRetained => {
                let i = verify_one(retained.clone()).await?;
                if i == Integrity::Damaged {
                    tracing::warn!(target = %target.name, "the retained version is damaged; downloading it again");
                }
                if let Some(r) = &mut local.facts.retained {
                    r.integrity = i;
                }
            }
            Step::Resolve => {
                let r = match registry.take() {
                    Some(r) => r,
                    None => connect(cx, target)?,
                };
                let tag = r.resolve(&target.reference).await?;
                cx.reporter.tag_resolved(&target.name, &tag);
                local.facts.tag = Some(tag);
                registry = Some(r);
            }
            Step::FetchManifest => {
                let r = match registry.take() {
                    Some(r) => r,
                    None => connect(cx, target)?,
                };
                let tag =
                    local.facts.tag.clone().ok_or_else(|| {
                        SyncError::Internal("manifest asked before the tag".into())
                    })?;
                let m = r.image_manifest(&tag, &target.platform).await?;
                let found = store::read_version(&versions, m.digest.hex());
                let accepted = target.name_sets();
                let policy = target.verify.as_deref();
                local.facts.retained = found
                    .as_ref()
                    .map(|v| version_of(v, store::is_intact(&versions, v, &accepted), policy));
                local.facts.manifest = Some(m.digest.clone());
                retained = found;
                image = Some(m);
                registry = Some(r);
            }
            Step::VerifySignature => {
                let r = match registry.take() {
                    Some(r) => r,
                    None => connect(cx, target)?,
                };
                let (tag, policy) = local
                    .facts
                    .tag
                    .clone()
                    .zip(target.verify.clone())
                    .ok_or_else(|| {
                        SyncError::Internal("signature asked without a tag or policy".into())
                    })?;
                let found = r.signatures(&tag).await?;
                let checked = signature::verify(&policy, &tag, &found.material, &found.searched);
                cx.reporter.signature_checked(
                    &target.name,
                    match &checked {
                        Ok(_) => "verified",
                        Err(SignatureError::Unsigned { .. }) => "unsigned",
                        Err(SignatureError::Rejected { .. }) => "rejected",
                    },
                );
                let signer = checked?;
                tracing::info!(target = %target.name, digest = %tag, signer = %signer, via = %signer.source, "signature verified");
                local.facts.signed_tag = Some(tag);
                local.signer = Some(signer);
                registry = Some(r);
            }
            _ => return Ok((step, image, retained, registry)),
        }
    }
}

/// The record of a version as published now: its files (new, or a retained version's), what
/// the tag resolved to, and who signed that (kept from the old record when not checked now).
fn record(
    target: &Target,
    digest: &Digest,
    tag: &Digest,
    old: Option<VersionManifest>,
    extracted: Option<(Vec<store::FileRecord>, Option<store::BootInfo>)>,
    signer: Option<Signer>,
) -> VersionManifest {
    let (files, boot, kept) = match (extracted, old) {
        (Some((files, boot)), _) => (files, boot, None),
        (None, Some(o)) => (
            o.files,
            o.boot,
            o.signature.filter(|_| o.tag_digest == *tag),
        ),
        (None, None) => (Vec::new(), None, None),
    };
    VersionManifest {
        target: target.name.clone(),
        reference: target.reference.whole(),
        platform: target.platform.to_string(),
        digest: digest.clone(),
        tag_digest: tag.clone(),
        published_at: store::now_rfc3339(),
        files,
        boot,
        signature: signer.or(kept),
    }
}

/// One sync: decide, then act. Owns what it needs, so it can run as its own task (a panic is a
/// failed sync, not a dead loop).
async fn sync_task(cx: Context, target: Target, verify: bool) -> Result<Done, SyncError> {
    let started = Instant::now();
    let settings = cx.settings.clone();
    let mut local = {
        let (s, t) = (settings.clone(), target.clone());
        blocking(move || Ok(local_facts(&s, &t, verify))).await?
    };
    if local.stale_pin {
        tracing::info!(target = %target.name, "config changed since the pin was set: unpinning");
        let (dir, name) = (settings.state_dir.clone(), target.name.clone());
        blocking(move || {
            pins::clear(&dir, &name).map_err(|source| SyncError::Pin {
                dir: dir.display().to_string(),
                source,
            })
        })
        .await?;
    }
    let (step, image, retained, registry) =
        resolve_steps(&cx, &target, &mut local, |_| false).await?;
    let (s, t) = (settings.clone(), target.clone());
    let store = Arc::new(blocking(move || open_store(&t, &s, Duration::ZERO)).await?);
    let current = local.current.clone();
    let tag = local.facts.tag.clone();
    match step {
        Step::UpToDate | Step::ServePinned { switch: false } => {
            let m = match step {
                Step::UpToDate => current,
                _ => local.pinned.clone(),
            }
            .ok_or_else(|| SyncError::Internal("up to date without a version".into()))?;
            let (t, st) = (target.clone(), store.clone());
            let m = blocking(move || {
                let names = names_for(&t, &m);
                if !st.links_ok(&m, &names) {
                    st.make_current(&m, &names)?;
                }
                Ok(m)
            })
            .await?;
            Ok(Done {
                label: if matches!(step, Step::UpToDate) {
                    "up_to_date"
                } else {
                    "pinned"
                },
                serving: Some(m),
                changed: false,
            })
        }
        Step::ServePinned { switch: true } => {
            let m = local
                .pinned
                .clone()
                .ok_or_else(|| SyncError::Internal("pinned without a version".into()))?;
            let (t, st) = (target.clone(), store.clone());
            let m = blocking(move || Ok(st.activate(&m, &names_for(&t, &m))?)).await?;
            Ok(Done {
                label: "pinned",
                serving: Some(m),
                changed: true,
            })
        }
        Step::PinnedUnverified => {
            let m = local
                .pinned
                .clone()
                .ok_or_else(|| SyncError::Internal("pinned without a version".into()))?;
            Err(SyncError::Unverified {
                target: target.name.clone(),
                why: untrusted_reason(&m),
                digest: m.digest,
            })
        }
        Step::PinnedMissing => {
            let digest = match &local.facts.pin {
                Pin::Active(d) => d.clone(),
                _ => return Err(SyncError::Internal("pinned without a pin".into())),
            };
            Err(SyncError::PinnedMissing {
                target: target.name.clone(),
                digest,
            })
        }
        Step::Retag | Step::Reactivate => {
            let tag = tag.ok_or_else(|| SyncError::Internal("reactivate without a tag".into()))?;
            let existing = match step {
                Step::Retag => current,
                _ => retained,
            }
            .ok_or_else(|| SyncError::Internal("reactivate without a version".into()))?;
            let digest = existing.digest.clone();
            let m = record(
                &target,
                &digest,
                &tag,
                Some(existing),
                None,
                local.signer.clone(),
            );
            let (t, st, s) = (target.clone(), store.clone(), settings.clone());
            let m = blocking(move || {
                let m = st.activate(&m, &names_for(&t, &m))?;
                st.prune(s.retain, s.grace, &profile_keeps(&t))?;
                Ok(m)
            })
            .await?;
            let reactivated = matches!(step, Step::Reactivate);
            if reactivated {
                tracing::info!(target = %target.name, digest = %m.digest, "re-activated a retained version");
            }
            Ok(Done {
                label: if reactivated {
                    "reactivated"
                } else {
                    "up_to_date"
                },
                serving: Some(m),
                changed: reactivated,
            })
        }
        Step::Download => {
            let (image, tag) = image
                .zip(tag)
                .ok_or_else(|| SyncError::Internal("download without a manifest".into()))?;
            // A new version is about as large as the one it replaces, and at least its top
            // layer. Sizes come from the registry: add without overflowing.
            let current_size = current
                .iter()
                .flat_map(|c| &c.files)
                .fold(0u64, |sum, f| sum.saturating_add(f.size));
            let top_layer = image.layers.last().map_or(0, |l| l.size);
            let needed = current_size.max(top_layer);
            let (st, hex) = (store.clone(), image.digest.hex().to_string());
            let staging = blocking(move || {
                st.check_space(needed.saturating_add(needed / 10))?;
                Ok(st.stage(&hex)?)
            })
            .await?;
            let registry = match registry {
                Some(r) => r,
                None => connect(&cx, &target)?,
            };
            let extracted = pipeline::extract(
                &registry,
                &image.layers,
                &target.layouts,
                staging.path(),
                &settings.modes,
                &settings.limits,
            )
            .await?;
            let layout = extracted.layout;
            let m = record(
                &target,
                &image.digest,
                &tag,
                None,
                Some((extracted.files, extracted.boot)),
                local.signer.clone(),
            );
            let (t, st, s) = (target.clone(), store.clone(), settings.clone());
            let m = blocking(move || {
                // The record was stamped when committed: switching needs no second write.
                st.commit(staging, &m)?;
                st.make_current(&m, &names_for(&t, &m))?;
                st.prune(s.retain, s.grace, &profile_keeps(&t))?;
                Ok(m)
            })
            .await?;
            tracing::info!(
                target = %target.name,
                digest = %m.digest,
                files = m.files.len(),
                layout = layout + 1,
                bytes = m.files.iter().map(|f| f.size).sum::<u64>(),
                elapsed = ?started.elapsed(),
                "published new version"
            );
            Ok(Done {
                label: "published",
                serving: Some(m),
                changed: true,
            })
        }
        other => Err(SyncError::Internal(format!("no action for {other:?}"))),
    }
}

/// What a dry run found: the step a sync would take, and what it knows of it.
#[derive(Debug)]
pub struct Plan {
    pub step: Step,
    pub tag: Option<Digest>,
    pub manifest: Option<Digest>,
    /// A pin made under another config, which a sync would remove.
    pub stale_pin: Option<Digest>,
    /// For a download: the layers, and what is certain before a byte is read.
    pub preview: Option<pipeline::Preview>,
    /// For a download: space the sync would find missing.
    pub no_space: Option<String>,
    /// Who signed the tag digest, when the policy asked and it was verified.
    pub signer: Option<Signer>,
}

/// What a sync would do, without writing anything (the same decision, stopping short of any
/// re-hash: those are reported).
pub async fn plan(cx: &Context, target: &Target) -> Result<Plan, SyncError> {
    let mut local = {
        let (s, t) = (cx.settings.clone(), target.clone());
        blocking(move || Ok(local_facts(&s, &t, false))).await?
    };
    let stale_pin = match &local.facts.pin {
        Pin::Stale(d) => Some(d.clone()),
        _ => None,
    };
    let (step, image, _, _) = resolve_steps(cx, target, &mut local, |s| {
        matches!(
            s,
            Step::VerifyCurrent | Step::VerifyPinned | Step::VerifyRetained
        )
    })
    .await?;
    let (mut preview, mut no_space) = (None, None);
    if let (Step::Download, Some(image)) = (&step, &image) {
        preview = Some(pipeline::preview(
            &image.layers,
            &target.layouts,
            &cx.settings.limits,
        ));
        let current_size = local
            .current
            .iter()
            .flat_map(|c| &c.files)
            .fold(0u64, |sum, f| sum.saturating_add(f.size));
        let top = image.layers.last().map_or(0, |l| l.size);
        let needed = current_size.max(top);
        let needed = needed.saturating_add(needed / 10);
        if let Ok(free) = store::fs::free_space(&target.dest) {
            if free < needed {
                no_space = Some(format!(
                    "{}: only {free} bytes free, about {needed} needed",
                    target.dest.display()
                ));
            }
        }
    }
    let served = match step {
        Step::UpToDate => local.current.as_ref().map(|c| c.digest.clone()),
        Step::ServePinned { .. } => local.pinned.as_ref().map(|c| c.digest.clone()),
        _ => None,
    };
    Ok(Plan {
        step,
        tag: local.facts.tag,
        manifest: local.facts.manifest.or(image.map(|i| i.digest)).or(served),
        stale_pin,
        preview,
        no_space,
        signer: local.signer,
    })
}

/// One target's operations, over its state.
pub struct Runner {
    cx: Context,
    target: Target,
    state: TargetState,
}

/// A failed operation, as the loop sees it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub text: String,
    pub retry_after: Option<Duration>,
}

impl Runner {
    /// A runner for `target`, its state seeded with what `dest` serves.
    pub async fn new(cx: Context, target: Target) -> Runner {
        let dest = target.dest.clone();
        let serving = tokio::task::spawn_blocking(move || store::current_of(&dest))
            .await
            .ok()
            .flatten();
        let mut state = TargetState::new(&target.name, serving);
        let (dir, t) = (cx.settings.state_dir.clone(), target.clone());
        state.pin = tokio::task::spawn_blocking(move || match pins::read(&dir, &t) {
            PinState::Active(p) => Some(p.digest),
            _ => None,
        })
        .await
        .ok()
        .flatten();
        cx.reporter.state(&state);
        Runner { cx, target, state }
    }

    pub fn state(&self) -> &TargetState {
        &self.state
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// New settings and target config (a reload).
    pub fn reconfigure(&mut self, cx: Context, target: Target) {
        self.cx = cx;
        self.target = target;
    }

    /// When the next check is due (shown in `/status`).
    pub fn set_next_check(&mut self, at: SystemTime) {
        self.state.next_check = Some(at);
        self.cx.reporter.state(&self.state);
    }

    fn enter(&mut self, phase: Phase) {
        self.state.phase = phase;
        self.cx.reporter.state(&self.state);
    }

    /// The epilogue every operation ends in.
    async fn finish(
        &mut self,
        result: Result<Done, SyncError>,
        started: Instant,
    ) -> Result<Done, Failure> {
        let previous = self.state.serving_digest().cloned();
        // The profile follows what is served, whatever the operation was.
        let result = match result {
            Ok(done) => match (&self.target.profile, &done.serving) {
                (Some(p), Some(m)) => {
                    let (p, m2, modes) = (p.clone(), m.clone(), self.cx.settings.modes);
                    let written =
                        tokio::task::spawn_blocking(move || profile::update(&p, &m2, &modes))
                            .await
                            .map_err(|e| SyncError::Internal(e.to_string()));
                    match written {
                        Ok(Ok(true)) => {
                            tracing::info!(target = %self.target.name, digest = %m.digest, "matchbox profile now points at this version");
                            Ok(done)
                        }
                        Ok(Ok(false)) => Ok(done),
                        Ok(Err(e)) => Err(SyncError::Profile(e)),
                        Err(e) => Err(e),
                    }
                }
                _ => Ok(done),
            },
            Err(e) => Err(e),
        };
        let now = SystemTime::now();
        self.state.phase = Phase::Idle;
        // Startup recovery looks at the disk only: it is no check of the reference.
        let checked = !matches!(&result, Ok(d) if matches!(d.label, "recovered" | "fell_back"));
        if checked {
            self.state.last_check = Some(now);
        }
        let took = started.elapsed();
        let outcome = match result {
            Ok(done) => {
                if checked {
                    self.state.last_success = Some(now);
                }
                self.state.last_error = None;
                self.state.consecutive_failures = 0;
                if done.serving.is_some() {
                    self.state.serving = done.serving.clone();
                }
                let serving = self.state.serving_digest().cloned();
                self.cx.reporter.finished(
                    &self.target.name,
                    done.label,
                    took,
                    0,
                    serving.as_ref(),
                    previous.as_ref(),
                );
                match (&done.serving, done.changed) {
                    (Some(m), true) => {
                        tracing::info!(target = %self.target.name, digest = %m.digest, previous = ?previous, "{}: now serving {}", done.label, m.digest)
                    }
                    (Some(m), false) => {
                        tracing::debug!(target = %self.target.name, digest = %m.digest, "{}", done.label)
                    }
                    (None, _) => tracing::debug!(target = %self.target.name, "{}", done.label),
                }
                Ok(done)
            }
            Err(e) => {
                // Causes quote names and bodies from the registry and the image: escape control
                // characters so they cannot forge lines or move the cursor.
                let text = printable(&format!(
                    "target {} ({}, {}): {}",
                    self.target.name,
                    self.target.reference,
                    self.target.platform,
                    error_chain(&e)
                ));
                self.state.last_error = Some(text.clone());
                self.state.consecutive_failures += 1;
                let failures = self.state.consecutive_failures;
                self.cx.reporter.finished(
                    &self.target.name,
                    "failed",
                    took,
                    failures,
                    previous.as_ref(),
                    previous.as_ref(),
                );
                tracing::error!(target = %self.target.name, failures, "{text}");
                Err(Failure {
                    text,
                    retry_after: e.retry_after(),
                })
            }
        };
        self.cx.reporter.state(&self.state);
        let dest = self.target.dest.clone();
        if let Ok(Ok(free)) =
            tokio::task::spawn_blocking(move || store::fs::free_bytes(&dest)).await
        {
            self.cx.reporter.free_space(&self.target.name, free);
        }
        if let Ok(Done {
            serving: Some(m),
            changed: true,
            ..
        }) = &outcome
        {
            self.run_hook(m.clone()).await;
        }
        outcome
    }

    async fn run_hook(&mut self, m: VersionManifest) {
        let Some(h) = self.target.hook.clone() else {
            return;
        };
        let result = hook::run(&h, &self.target, &m)
            .await
            .map_err(|e| printable(&e));
        match &result {
            Ok(()) => self.state.last_hook_error = None,
            Err(e) => {
                tracing::error!(target = %self.target.name, "{e}");
                self.cx.reporter.hook_failed(&self.target.name);
                self.state.hook_failures += 1;
                self.state.last_hook_error = Some(e.clone());
            }
        }
        self.cx.reporter.state(&self.state);
    }

    /// One sync. With `verify`, what is served is re-hashed before it is trusted (self-repair).
    pub async fn sync(&mut self, verify: bool) -> Result<Done, Failure> {
        self.enter(Phase::Syncing);
        let started = Instant::now();
        let task = tokio::spawn(sync_task(self.cx.clone(), self.target.clone(), verify));
        let result = task
            .await
            .unwrap_or_else(|e| Err(SyncError::Internal(e.to_string())));
        // A pin the sync removed (stale) or found is what the state shows.
        if let Ok(done) = &result {
            if done.label != "pinned" {
                self.state.pin = None;
            }
        }
        self.finish(result, started).await
    }

    /// Startup recovery: clear debris, verify `current` by content, fall back to an intact
    /// retained version when it is damaged, repair links and the profile.
    pub async fn recover(&mut self) {
        self.enter(Phase::Starting);
        let started = Instant::now();
        let (t, s) = (self.target.clone(), self.cx.settings.clone());
        let result = blocking(move || {
            let store = open_store(&t, &s, LOCK_WAIT)?;
            let policy = t.verify.as_deref();
            Ok(store.recover(&t.name_sets(), &|m| trusted(policy, m))?)
        })
        .await;
        let result = match result {
            Ok(Recovery::Empty) => Ok(Done {
                label: "recovered",
                serving: None,
                changed: false,
            }),
            Ok(Recovery::Intact(m)) => Ok(Done {
                label: "recovered",
                serving: Some(m),
                changed: false,
            }),
            Ok(Recovery::FellBack { from, reason, to }) => {
                let note = format!(
                    "current version {} was damaged ({reason}); fell back to {}",
                    from.as_ref()
                        .map_or("(none)".to_string(), Digest::to_string),
                    to.digest
                );
                tracing::warn!(target = %self.target.name, "{note}");
                self.state.recovery = Some(note);
                Ok(Done {
                    label: "fell_back",
                    serving: Some(to),
                    changed: true,
                })
            }
            Ok(Recovery::NothingIntact { reason }) => {
                let note =
                    format!("no intact version on disk ({reason}); the next sync downloads one");
                tracing::warn!(target = %self.target.name, "{note}");
                self.state.recovery = Some(note);
                self.state.serving = None;
                Ok(Done {
                    label: "recovered",
                    serving: None,
                    changed: false,
                })
            }
            Err(e) => {
                self.state.recovery = Some(format!("recovery failed: {}", error_chain(&e)));
                Err(e)
            }
        };
        let _ = self.finish(result, started).await;
    }

    /// Checks what is served against the store: links restored; damaged files downloaded again
    /// through a verified sync.
    pub async fn repair(&mut self) -> Result<Done, Failure> {
        self.enter(Phase::Repairing);
        let started = Instant::now();
        let (t, s) = (self.target.clone(), self.cx.settings.clone());
        let checked = blocking(move || {
            let store = open_store(&t, &s, Duration::ZERO)?;
            let accepted = t.name_sets();
            let Some(current) = store.current() else {
                // Only repairable if something is retained; recovery does the fallback.
                let policy = t.verify.as_deref();
                return Ok(match store.recover(&accepted, &|m| trusted(policy, m))? {
                    Recovery::FellBack { to, .. } => Repair::Relinked(to),
                    Recovery::NothingIntact { reason } => Repair::NeedsRefetch(reason),
                    Recovery::Empty | Recovery::Intact(_) => Repair::Healthy(None),
                });
            };
            if let Err(e) = store.verify(&current) {
                return Ok(Repair::NeedsRefetch(e.to_string()));
            }
            let names = names_for(&t, &current);
            if names.is_empty() {
                return Ok(Repair::NeedsRefetch(
                    "the current version does not hold the configured files".into(),
                ));
            }
            if !store.links_ok(&current, &names) {
                store.make_current(&current, &names)?;
                return Ok(Repair::Relinked(current));
            }
            Ok(Repair::Healthy(Some(current)))
        })
        .await;
        match checked {
            Ok(Repair::Healthy(serving)) => {
                // Nothing was wrong with the store; the epilogue still restores a profile
                // edited by hand.
                self.finish(
                    Ok(Done {
                        label: "healthy",
                        serving,
                        changed: false,
                    }),
                    started,
                )
                .await
            }
            Ok(Repair::Relinked(m)) => {
                tracing::warn!(target = %self.target.name, "restored links changed from outside");
                self.state.self_repairs += 1;
                self.cx.reporter.repaired(&self.target.name);
                self.finish(
                    Ok(Done {
                        label: "repaired",
                        serving: Some(m),
                        changed: false,
                    }),
                    started,
                )
                .await
            }
            Ok(Repair::NeedsRefetch(reason)) => {
                tracing::warn!(target = %self.target.name, "served files are damaged ({reason}); downloading them again");
                let synced = self.sync(true).await;
                if synced.is_ok() {
                    self.state.self_repairs += 1;
                    self.cx.reporter.repaired(&self.target.name);
                    self.cx.reporter.state(&self.state);
                }
                synced
            }
            Err(e) => self.finish(Err(e), started).await,
        }
    }

    /// Switches to a retained version (the one before the current, or `to`: a digest or a
    /// unique prefix of its hex) after re-hashing it, and pins it there.
    pub async fn rollback(&mut self, to: Option<String>) -> Result<VersionManifest, String> {
        self.enter(Phase::RollingBack);
        let started = Instant::now();
        let (t, s) = (self.target.clone(), self.cx.settings.clone());
        let result = blocking(move || rollback_blocking(&s, &t, to.as_deref())).await;
        if let Ok(m) = &result {
            self.state.pin = Some(m.digest.clone());
        }
        let done = self
            .finish(
                result.map(|m| Done {
                    label: "rolled_back",
                    serving: Some(m),
                    changed: true,
                }),
                started,
            )
            .await;
        match done {
            Ok(Done {
                serving: Some(m), ..
            }) => Ok(m),
            Ok(_) => Err("internal error: rollback without a version".into()),
            Err(f) => Err(f.text),
        }
    }

    /// Lifts the pin, then syncs: the target follows its reference again at once.
    pub async fn unpin(&mut self) -> Result<(bool, Result<Done, Failure>), String> {
        let was = self.lift_pin().await?;
        Ok((was, self.sync(false).await))
    }

    /// Lifts the pin (the caller syncs next); answers whether there was one.
    pub async fn lift_pin(&mut self) -> Result<bool, String> {
        self.enter(Phase::Unpinning);
        let (dir, name) = (self.cx.settings.state_dir.clone(), self.target.name.clone());
        let was = tokio::task::spawn_blocking(move || pins::clear(&dir, &name))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| {
                format!(
                    "removing the pin of {} in {}: {e}",
                    self.target.name,
                    self.cx.settings.state_dir.display()
                )
            });
        let was = match was {
            Ok(w) => w,
            Err(e) => {
                self.state.phase = Phase::Idle;
                self.cx.reporter.state(&self.state);
                return Err(e);
            }
        };
        self.state.pin = None;
        self.state.phase = Phase::Idle;
        self.cx.reporter.state(&self.state);
        tracing::info!(target = %self.target.name, was_pinned = was, "unpinned; following {}", self.target.reference);
        Ok(was)
    }
}

/// What a repair check found.
enum Repair {
    Healthy(Option<VersionManifest>),
    /// Links were restored (or a fallback happened): the version now served.
    Relinked(VersionManifest),
    /// The current version's files are damaged: a verified re-download is needed.
    NeedsRefetch(String),
}

fn rollback_blocking(
    settings: &Settings,
    target: &Target,
    to: Option<&str>,
) -> Result<VersionManifest, SyncError> {
    let store = open_store(target, settings, LOCK_WAIT)?;
    let current = store.current().map(|m| m.digest);
    let versions = store.versions()?;
    let available = || {
        versions
            .iter()
            .map(|m| m.digest.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let no_such = |wanted: &str| StoreError::NoSuchVersion {
        dest: target.dest.clone(),
        wanted: wanted.to_string(),
        available: available(),
    };
    let chosen = match to {
        None => versions
            .iter()
            .find(|m| Some(&m.digest) != current.as_ref())
            .ok_or_else(|| no_such("older than the current one"))?,
        Some(want) => {
            let hex = want.strip_prefix("sha256:").unwrap_or(want);
            let matches: Vec<&VersionManifest> = versions
                .iter()
                .filter(|m| !hex.is_empty() && m.hex().starts_with(hex))
                .collect();
            match matches.as_slice() {
                [one] => *one,
                _ => return Err(no_such(want).into()),
            }
        }
    };
    if !store.is_intact(chosen, &target.name_sets()) {
        return Err(StoreError::Damaged {
            dest: target.dest.clone(),
            digest: chosen.digest.clone(),
            reason: "it does not hold the files the config asks for".into(),
        }
        .into());
    }
    if !trusted(target.verify.as_deref(), chosen) {
        return Err(SyncError::Unverified {
            target: target.name.clone(),
            digest: chosen.digest.clone(),
            why: untrusted_reason(chosen),
        });
    }
    store.verify(chosen)?;
    let m = store.activate(chosen, &names_for(target, chosen))?;
    pins::set(&settings.state_dir, target, &m.digest, &settings.modes).map_err(|source| {
        SyncError::Pin {
            dir: settings.state_dir.display().to_string(),
            source,
        }
    })?;
    Ok(m)
}
