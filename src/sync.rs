//! One sync of one target: resolve the reference, and when it moved, pull the platform's image
//! into a staging directory and publish it.

use std::sync::Arc;
use std::time::Instant;

use oci_client::Reference;

use crate::config::{Settings, Target};
use crate::pipeline::{self, PipelineError};
use crate::registry::{Credentials, Observer, Registry, RegistryError, TokenCache};
use crate::store::{self, Store, StoreError, VersionManifest};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Pipeline(#[from] PipelineError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("invalid reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
}

/// What syncs share across runs: the settings, cached registry tokens, the request observer.
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub tokens: TokenCache,
    pub observer: Option<Observer>,
}

impl Context {
    pub fn new(settings: Settings) -> Context {
        Context {
            settings: Arc::new(settings),
            tokens: TokenCache::default(),
            observer: None,
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
}

impl Outcome {
    pub fn manifest(&self) -> &VersionManifest {
        match self {
            Outcome::UpToDate(m) | Outcome::Reactivated(m) | Outcome::Published(m) => m,
        }
    }
}

/// Names published at the top of a version (files, or directories copied whole).
pub fn published_names(target: &Target) -> Vec<String> {
    target.files.iter().map(|f| f.name.clone()).collect()
}

/// The version currently published for `target`, read from disk (no lock, no network).
pub fn published(target: &Target) -> Option<VersionManifest> {
    let link = std::fs::read_link(target.dest.join("current")).ok()?;
    let text = std::fs::read(target.dest.join(link).join(".bootsync.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

pub async fn sync_target(cx: &Context, target: &Target) -> Result<Outcome, SyncError> {
    let settings = &cx.settings;
    let started = Instant::now();
    let reference: Reference = target
        .reference
        .parse()
        .map_err(|e: oci_client::ParseError| SyncError::Reference {
            reference: target.reference.clone(),
            reason: e.to_string(),
        })?;
    let names = published_names(target);
    let store = Store::open(&target.dest)?;
    let current = store.current().filter(|m| store.is_intact(m, &names));

    // A reference pinned by digest that is already published needs no network at all.
    if let (Some(pinned), Some(cur)) = (reference.digest(), &current) {
        if cur.tag_digest == pinned {
            return Ok(Outcome::UpToDate(cur.clone()));
        }
    }

    let registry_settings = settings.registry(reference.resolve_registry());
    let credentials = Credentials::from_settings(&registry_settings)?;
    let registry = Registry::connect(
        &reference,
        &registry_settings,
        credentials,
        settings.timeouts,
    )?
    .with_tokens(cx.tokens.clone())
    .with_observer(cx.observer.clone());
    let tag_digest = registry.resolve(&reference).await?;
    if let Some(cur) = &current {
        if cur.tag_digest == tag_digest {
            tracing::debug!(target = %target.name, digest = %tag_digest, "up to date");
            return Ok(Outcome::UpToDate(cur.clone()));
        }
    }

    let image = registry
        .image_manifest(&tag_digest, &target.platform)
        .await?;
    let hex = store::digest_hex(&image.digest).to_string();
    let manifest_for = |files| VersionManifest {
        target: target.name.clone(),
        reference: target.reference.clone(),
        platform: target.platform.to_string(),
        digest: image.digest.clone(),
        tag_digest: tag_digest.clone(),
        published_at: store::now_rfc3339(),
        files,
    };

    // The same platform image may be current or retained already (an index that changed for
    // another platform, or a tag moved back): switch without downloading.
    if let Some(existing) = store.version(&hex).filter(|m| store.is_intact(m, &names)) {
        let m = manifest_for(existing.files);
        store.activate(&m, &names)?;
        let outcome = if current.as_ref().is_some_and(|c| c.digest == m.digest) {
            Outcome::UpToDate(m)
        } else {
            tracing::info!(target = %target.name, digest = %image.digest, "re-activated a retained version");
            Outcome::Reactivated(m)
        };
        store.prune(settings.retain)?;
        return Ok(outcome);
    }

    let staging = store.stage(&hex)?;
    let files = pipeline::extract(&registry, &image.layers, &target.files, staging.path()).await?;
    let m = manifest_for(files);
    store.commit(staging, &m)?;
    store.activate(&m, &names)?;
    store.prune(settings.retain)?;
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
