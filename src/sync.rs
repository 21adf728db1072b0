//! One sync of one target: resolve the reference, and when it moved, pull the platform's image
//! into a staging directory and publish it. Also the other operations on a target's store:
//! startup recovery, self-repair, rollback, and the dry-run plan.

use std::sync::Arc;
use std::time::{Duration, Instant};

use oci_client::Reference;

use crate::config::{Settings, Target};
use crate::metrics::Metrics;
use crate::pins;
use crate::pipeline::{self, PipelineError};
use crate::profile::{self, ProfileError};
use crate::registry::{Credentials, Observer, Registry, RegistryError, TokenCache};
use crate::store::{self, Recovery, Store, StoreError, VersionManifest};

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
    #[error("invalid reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("pinned to {digest}, but that version is not intact in the store: run `bootsync unpin {target}` or roll back to another version")]
    PinnedMissing { target: String, digest: String },
    #[error("pin state in {dir}: {source}")]
    Pin {
        dir: String,
        #[source]
        source: std::io::Error,
    },
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

/// What syncs share across runs: the settings, cached registry tokens, metrics.
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub tokens: TokenCache,
    pub metrics: Arc<Metrics>,
    /// An extra observer of registry traffic (the progress display of `sync --once`).
    pub progress: Option<Arc<dyn ProgressFactory>>,
}

/// Makes a per-target observer that also reports to `inner`.
pub trait ProgressFactory: Send + Sync {
    fn observer(&self, target: &str, inner: Arc<dyn Observer>) -> Arc<dyn Observer>;
}

impl Context {
    pub fn new(settings: Settings) -> Context {
        Context {
            settings: Arc::new(settings),
            tokens: TokenCache::default(),
            metrics: Metrics::new(),
            progress: None,
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

/// What a successful sync did.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The reference still points at the published version; nothing was downloaded.
    UpToDate(VersionManifest),
    /// A version already in the store became current again (no download).
    Reactivated(VersionManifest),
    /// A new version was downloaded, verified and published.
    Published(VersionManifest),
    /// The target is pinned (rolled back); the registry was not asked.
    Pinned(VersionManifest),
}

impl Outcome {
    pub fn manifest(&self) -> &VersionManifest {
        match self {
            Outcome::UpToDate(m)
            | Outcome::Reactivated(m)
            | Outcome::Published(m)
            | Outcome::Pinned(m) => m,
        }
    }

    /// The label used in logs, the CLI and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::UpToDate(_) => "up_to_date",
            Outcome::Reactivated(_) => "reactivated",
            Outcome::Published(_) => "published",
            Outcome::Pinned(_) => "pinned",
        }
    }

    /// True when what is served changed.
    pub fn changed(&self) -> bool {
        matches!(self, Outcome::Reactivated(_) | Outcome::Published(_))
    }
}

/// The names a version of `m`'s layout publishes at its top (files, or directories copied
/// whole), or none when `m` holds no layout the config asks for.
fn names_for(target: &Target, m: &VersionManifest) -> Option<Vec<String>> {
    store::names_of(m, &target.name_sets()).map(<[String]>::to_vec)
}

/// The version currently published for `target`, read from disk (no lock, no network).
pub fn published(target: &Target) -> Option<VersionManifest> {
    store::current_of(&target.dest)
}

fn parse_reference(target: &Target) -> Result<Reference, SyncError> {
    target
        .reference
        .parse()
        .map_err(|e: oci_client::ParseError| SyncError::Reference {
            reference: target.reference.clone(),
            reason: e.to_string(),
        })
}

fn connect(cx: &Context, target: &Target, reference: &Reference) -> Result<Registry, SyncError> {
    let settings = &cx.settings;
    let registry_settings = settings.registry(reference.resolve_registry());
    let credentials =
        Credentials::from_settings(&registry_settings, settings.docker_config.as_deref())?;
    let mut observer = cx.metrics.observer(&target.name);
    if let Some(p) = &cx.progress {
        observer = p.observer(&target.name, observer);
    }
    Ok(Registry::connect(
        reference,
        &registry_settings,
        credentials,
        settings.timeouts,
    )?
    .with_tokens(cx.tokens.clone())
    .with_observer(Some(observer)))
}

fn ensure_profile(
    settings: &Settings,
    target: &Target,
    m: &VersionManifest,
) -> Result<(), SyncError> {
    if let Some(p) = &target.profile {
        if profile::update(p, m, &settings.modes)? {
            tracing::info!(target = %target.name, profile = %p.path.display(), digest = %m.digest, "matchbox profile now points at this version");
        }
    }
    Ok(())
}

/// Syncs one target. With `verify`, versions already on disk are trusted only after their
/// files are re-hashed (used for self-repair), not just checked for size.
pub async fn sync_target(
    cx: &Context,
    target: &Target,
    verify: bool,
) -> Result<Outcome, SyncError> {
    let started = Instant::now();
    let settings = &cx.settings;
    let reference = parse_reference(target)?;
    let accepted = target.name_sets();
    let store = Store::open(&target.dest, &settings.modes)?;
    let usable =
        |m: &VersionManifest| store.is_intact(m, &accepted) && (!verify || store.verify(m).is_ok());
    let names = |m: &VersionManifest| names_for(target, m).unwrap_or_default();

    if let Some(pin) = pins::active(&settings.state_dir, target) {
        let pinned = store
            .version(store::digest_hex(&pin.digest))
            .filter(|m| usable(m))
            .ok_or_else(|| SyncError::PinnedMissing {
                target: target.name.clone(),
                digest: pin.digest.clone(),
            })?;
        let current = store.current();
        let m = if current.is_some_and(|c| c.digest == pinned.digest)
            && store.links_ok(&pinned, &names(&pinned))
        {
            pinned
        } else {
            store.activate(&pinned, &names(&pinned))?
        };
        ensure_profile(settings, target, &m)?;
        return Ok(Outcome::Pinned(m));
    }

    let current = store.current().filter(|m| usable(m));
    // A reference pinned by digest that is already published needs no network at all.
    if let (Some(pinned), Some(cur)) = (reference.digest(), &current) {
        if cur.tag_digest == pinned {
            if !store.links_ok(cur, &names(cur)) {
                store.make_current(cur, &names(cur))?;
            }
            ensure_profile(settings, target, cur)?;
            return Ok(Outcome::UpToDate(cur.clone()));
        }
    }

    let registry = connect(cx, target, &reference)?;
    let tag_digest = registry.resolve(&reference).await?;
    if let Some(cur) = &current {
        if cur.tag_digest == tag_digest {
            tracing::debug!(target = %target.name, digest = %tag_digest, "up to date");
            if !store.links_ok(cur, &names(cur)) {
                store.make_current(cur, &names(cur))?;
            }
            ensure_profile(settings, target, cur)?;
            return Ok(Outcome::UpToDate(cur.clone()));
        }
    }

    let image = registry
        .image_manifest(&tag_digest, &target.platform)
        .await?;
    let hex = store::digest_hex(&image.digest).to_string();
    let manifest_for = |files, boot| VersionManifest {
        target: target.name.clone(),
        reference: target.reference.clone(),
        platform: target.platform.to_string(),
        digest: image.digest.clone(),
        tag_digest: tag_digest.clone(),
        published_at: store::now_rfc3339(),
        files,
        boot,
    };

    // The same platform image may be current or retained already (an index that changed for
    // another platform, or a tag moved back): switch without downloading.
    // A retained version that is not the current one is re-hashed before it serves again: it
    // sat on disk unwatched (self-repair only watches what is served).
    let is_current = current
        .as_ref()
        .is_some_and(|c| store::digest_hex(&c.digest) == hex);
    let retained = store.version(&hex).filter(|m| {
        usable(m)
            && (is_current
                || store
                    .verify(m)
                    .map_err(|e| tracing::warn!(target = %target.name, "{e}; downloading it again"))
                    .is_ok())
    });
    if let Some(existing) = retained {
        let existing_names = names(&existing);
        let m = store.activate(
            &manifest_for(existing.files, existing.boot),
            &existing_names,
        )?;
        ensure_profile(settings, target, &m)?;
        store.prune(settings.retain, settings.grace)?;
        if current.is_some_and(|c| c.digest == m.digest) {
            return Ok(Outcome::UpToDate(m));
        }
        tracing::info!(target = %target.name, digest = %image.digest, "re-activated a retained version");
        return Ok(Outcome::Reactivated(m));
    }

    // A new version is about as large as the one it replaces, and at least its top layer.
    // Sizes come from the registry: add without overflowing.
    let current_size = current
        .iter()
        .flat_map(|c| &c.files)
        .fold(0u64, |sum, f| sum.saturating_add(f.size));
    let top_layer = image.layers.last().map_or(0, |l| l.size);
    let needed = current_size.max(top_layer);
    store.check_space(needed.saturating_add(needed / 10))?;

    let staging = store.stage(&hex)?;
    let extracted = pipeline::extract(
        &registry,
        &image.layers,
        &target.layouts,
        staging.path(),
        &settings.modes,
        &settings.limits,
    )
    .await?;
    let m = manifest_for(extracted.files, extracted.boot);
    // The manifest was stamped when committed: switching needs no second write (and fsync).
    store.commit(staging, &m)?;
    store.make_current(&m, &names(&m))?;
    ensure_profile(settings, target, &m)?;
    store.prune(settings.retain, settings.grace)?;
    tracing::info!(
        target = %target.name,
        digest = %m.digest,
        files = m.files.len(),
        bytes = m.files.iter().map(|f| f.size).sum::<u64>(),
        elapsed = ?started.elapsed(),
        "published new version"
    );
    Ok(Outcome::Published(m))
}

/// Startup recovery of one target: clear debris, verify `current` by content, fall back to an
/// intact retained version when it is damaged, repair links and the profile.
pub fn recover_target(settings: &Settings, target: &Target) -> Result<Recovery, SyncError> {
    let store = Store::open_waiting(&target.dest, &settings.modes, Duration::from_secs(30))?;
    let recovery = store.recover(&target.name_sets())?;
    match &recovery {
        Recovery::Intact(m) | Recovery::FellBack { to: m, .. } => {
            ensure_profile(settings, target, m)?
        }
        Recovery::Empty | Recovery::NothingIntact { .. } => {}
    }
    Ok(recovery)
}

/// What a self-repair check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    Healthy,
    /// Links (or the profile) were restored.
    Relinked,
    /// The current version's files are damaged: a verified re-download is needed.
    NeedsRefetch(String),
}

/// Checks what is served for `target` against the store and restores links. Damaged files are
/// reported, not patched: the caller re-downloads them through a verified sync.
pub fn repair_target(settings: &Settings, target: &Target) -> Result<Repair, SyncError> {
    let store = Store::open(&target.dest, &settings.modes)?;
    let accepted = target.name_sets();
    let Some(current) = store.current() else {
        // Only repairable if something is retained; recovery does the fallback.
        return Ok(match store.recover(&accepted)? {
            Recovery::FellBack { .. } => Repair::Relinked,
            Recovery::NothingIntact { reason } => Repair::NeedsRefetch(reason),
            Recovery::Empty | Recovery::Intact(_) => Repair::Healthy,
        });
    };
    if let Err(e) = store.verify(&current) {
        return Ok(Repair::NeedsRefetch(e.to_string()));
    }
    let Some(names) = names_for(target, &current) else {
        return Ok(Repair::NeedsRefetch(
            "the current version does not hold the configured files".into(),
        ));
    };
    let mut repaired = false;
    if !store.links_ok(&current, &names) {
        store.make_current(&current, &names)?;
        repaired = true;
    }
    if let Some(p) = &target.profile {
        repaired |= profile::update(p, &current, &settings.modes)?;
    }
    Ok(if repaired {
        Repair::Relinked
    } else {
        Repair::Healthy
    })
}

/// Switches `target` to a retained version (the one before the current, or `to`: a digest or
/// a unique prefix of its hex) after re-hashing its files, and pins it there.
pub fn rollback(
    settings: &Settings,
    target: &Target,
    to: Option<&str>,
) -> Result<VersionManifest, SyncError> {
    let store = Store::open_waiting(&target.dest, &settings.modes, Duration::from_secs(30))?;
    let current = store.current().map(|m| m.digest);
    let versions = store.versions()?;
    let available = || {
        versions
            .iter()
            .map(|m| m.digest.clone())
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
            let hex = store::digest_hex(want);
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
    let Some(names) =
        names_for(target, chosen).filter(|_| store.is_intact(chosen, &target.name_sets()))
    else {
        return Err(StoreError::Damaged {
            dest: target.dest.clone(),
            digest: chosen.digest.clone(),
            reason: "it does not hold the files the config asks for".into(),
        }
        .into());
    };
    store.verify(chosen)?;
    let m = store.activate(chosen, &names)?;
    ensure_profile(settings, target, &m)?;
    pins::set(&settings.state_dir, target, &m.digest).map_err(|source| SyncError::Pin {
        dir: settings.state_dir.display().to_string(),
        source,
    })?;
    Ok(m)
}

/// What a sync would do, without writing anything.
#[derive(Debug, Clone)]
pub struct Plan {
    pub tag_digest: String,
    pub manifest_digest: String,
    pub action: PlanAction,
}

#[derive(Debug, Clone)]
pub enum PlanAction {
    UpToDate,
    Pinned(String),
    Reactivate,
    /// A download. `layers`, top first, with what their descriptors say, are read in this
    /// order until a layout is complete.
    Download {
        layers: Vec<(String, u64, String)>,
        /// Failures certain before a byte is read: the sync would fail with these.
        problems: Vec<String>,
        /// Whether the layers are artifact files, so what they hold is known already.
        known: bool,
    },
}

pub async fn plan_target(cx: &Context, target: &Target) -> Result<Plan, SyncError> {
    let reference = parse_reference(target)?;
    let current = published(target);
    if let Some(pin) = pins::active(&cx.settings.state_dir, target) {
        return Ok(Plan {
            tag_digest: String::new(),
            manifest_digest: pin.digest.clone(),
            action: PlanAction::Pinned(pin.digest),
        });
    }
    let registry = connect(cx, target, &reference)?;
    let tag_digest = registry.resolve(&reference).await?;
    let image = registry
        .image_manifest(&tag_digest, &target.platform)
        .await?;
    let action = if current.as_ref().is_some_and(|c| c.digest == image.digest) {
        PlanAction::UpToDate
    } else if target
        .dest
        .join("versions")
        .join(store::digest_hex(&image.digest))
        .is_dir()
    {
        PlanAction::Reactivate
    } else {
        let preview = pipeline::preview(&image.layers, &target.layouts, &cx.settings.limits);
        let mut problems = preview.problems;
        // The same space check the sync makes before it downloads.
        let current_size = current
            .iter()
            .flat_map(|c| &c.files)
            .fold(0u64, |sum, f| sum.saturating_add(f.size));
        let top = image.layers.last().map_or(0, |l| l.size);
        let needed = current_size.max(top);
        let needed = needed.saturating_add(needed / 10);
        match store::free_space(&target.dest) {
            Ok(free) if free < needed => problems.push(format!(
                "{}: only {free} bytes free, about {needed} needed",
                target.dest.display()
            )),
            _ => {}
        }
        PlanAction::Download {
            layers: preview.layers,
            problems,
            known: preview.known,
        }
    };
    Ok(Plan {
        tag_digest,
        manifest_digest: image.digest,
        action,
    })
}
