//! Registry access: tag -> digest (HEAD), manifests and indexes (verified by digest, parsed with
//! oci-spec's data model), platform selection, and blob downloads that resume where a broken
//! connection left off.
//!
//! The requests are made here with `reqwest`, because bootsync needs what a registry client
//! library's request layer hides: every status code (for metrics and errors), `Retry-After`, a
//! timeout on every call, a token refreshed on 401, and resumable blob streams that it hashes
//! itself.
//!
//! - `auth`: credentials (files, Docker `config.json`), Bearer tokens and their cache;
//! - `client`: one request with its timeout, retries with backoff, capped bodies, errors;
//! - `manifest`: manifests and indexes checked and resolved for a platform (pure);
//! - `blob`: resumable blob streams;
//! - `signatures`: where cosign keeps the signatures of a digest, and fetching them.

mod auth;
mod blob;
mod client;
mod manifest;
mod signatures;

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;

use crate::config::{Platform, RegistrySettings, Timeouts};
use crate::digest::{Digest, DigestError};
pub use crate::reference::Reference;
pub use auth::{Credentials, TokenCache};
use client::Req;
pub use manifest::{
    resolve_manifest, Descriptor, ImageManifest, Resolved, ACCEPTED_MANIFESTS, MAX_MANIFEST_BYTES,
};
pub use signatures::{bundle_layer, bundle_referrers, signature_layers};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{what}: timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("{what}: {reason}")]
    Network { what: String, reason: String },
    #[error(
        "{what}: registry answered {status}{}{}",
        detail_suffix(detail),
        retry_suffix(retry_after)
    )]
    Status {
        what: String,
        status: u16,
        detail: String,
        retry_after: Option<Duration>,
    },
    #[error("{what}: {reason}")]
    BadManifest { what: String, reason: String },
    #[error("platform {wanted} not found in index {digest}; it offers: {available}")]
    PlatformMissing {
        wanted: String,
        digest: String,
        available: String,
    },
    #[error("cannot build a client for registry {host}: {reason}")]
    Setup { host: String, reason: String },
    #[error("blob {digest}: {reason}")]
    Blob { digest: Digest, reason: String },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

fn retry_suffix(r: &Option<Duration>) -> String {
    r.map(|d| format!(" (retry after {}s)", d.as_secs()))
        .unwrap_or_default()
}

impl RegistryError {
    /// How long the registry asked us to wait (429/503 with `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub(crate) fn is_transient(&self) -> bool {
        match self {
            RegistryError::Timeout { .. } | RegistryError::Network { .. } => true,
            RegistryError::Status { status, .. } => matches!(status, 429 | 500 | 502 | 503 | 504),
            _ => false,
        }
    }
}

/// Told about registry traffic (metrics, progress display).
pub trait Observer: Send + Sync {
    /// After every response: status 0 means none came (network error or timeout).
    fn response(&self, _host: &str, _kind: &'static str, _status: u16) {}
    /// Blob bytes received.
    fn bytes(&self, _n: u64) {}
    /// A blob download starts.
    fn blob_started(&self, _digest: &str, _size: u64) {}
}

/// A connection to one registry for one repository.
pub struct Registry {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) host: String,
    pub(crate) repository: String,
    pub(crate) credentials: Credentials,
    pub(crate) timeouts: Timeouts,
    pub(crate) tokens: TokenCache,
    pub(crate) observer: Option<Arc<dyn Observer>>,
}

impl Registry {
    /// A client for the registry that `reference` lives on.
    pub fn connect(
        reference: &Reference,
        settings: &RegistrySettings,
        credentials: Credentials,
        timeouts: Timeouts,
    ) -> Result<Self, RegistryError> {
        let host = reference.resolve_registry().to_string();
        let setup = |reason: String| RegistryError::Setup {
            host: host.clone(),
            reason,
        };
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("bootsync/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(timeouts.connect)
            // A per-read limit: a stalled body fails instead of hanging.
            .read_timeout(timeouts.stall);
        if let Some(ca) = &settings.ca_file {
            let pem =
                std::fs::read(ca).map_err(|e| setup(format!("ca_file {}: {e}", ca.display())))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| setup(format!("ca_file {}: {e}", ca.display())))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| setup(e.to_string()))?;
        let scheme = if settings.insecure { "http" } else { "https" };
        Ok(Registry {
            http,
            base: format!("{scheme}://{host}"),
            host,
            repository: reference.repository().to_string(),
            credentials,
            timeouts,
            tokens: TokenCache::default(),
            observer: None,
        })
    }

    pub fn with_tokens(mut self, tokens: TokenCache) -> Self {
        self.tokens = tokens;
        self
    }

    pub fn with_observer(mut self, observer: Option<Arc<dyn Observer>>) -> Self {
        self.observer = observer;
        self
    }

    fn observe(&self, kind: &'static str, status: u16) {
        if let Some(o) = &self.observer {
            o.response(&self.host, kind, status);
        }
    }

    /// The digest the reference points at now (index or manifest), from a HEAD request.
    pub async fn resolve(&self, reference: &Reference) -> Result<Digest, RegistryError> {
        let what = format!("resolving {}", reference.whole());
        let tag = reference
            .digest()
            .or(reference.tag())
            .unwrap_or("latest")
            .to_string();
        let accept = ACCEPTED_MANIFESTS.join(", ");
        let head = self.manifest_request("head", Method::HEAD, &tag, &accept);
        let response = self.send(&head, &what).await?;
        let digest: Digest = match response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            Some(d) => d
                .parse()
                .map_err(|e: DigestError| RegistryError::BadManifest {
                    what: what.clone(),
                    reason: e.to_string(),
                })?,
            None => {
                // Some registries omit the header on HEAD: hash the manifest instead.
                let get = Req {
                    kind: "manifest",
                    method: Method::GET,
                    ..head
                };
                let body = self.fetch_small(&get, &what, MAX_MANIFEST_BYTES).await?;
                Digest::of(&body)
            }
        };
        if let Some(pinned) = reference.digest() {
            if pinned != digest.as_str() {
                return Err(RegistryError::BadManifest {
                    what,
                    reason: format!("registry says {digest}, the reference pins {pinned}"),
                });
            }
        }
        Ok(digest)
    }

    /// Fetches the manifest at `digest` (index or image) and returns the image manifest for
    /// `platform`, each document verified against the digest it was fetched by.
    pub async fn image_manifest(
        &self,
        digest: &Digest,
        platform: &Platform,
    ) -> Result<ImageManifest, RegistryError> {
        let body = self.fetch_manifest(digest).await?;
        match resolve_manifest(&body, digest, platform, false)? {
            Resolved::Image(m) => Ok(m),
            Resolved::Follow(inner) => {
                let body = self.fetch_manifest(&inner).await?;
                match resolve_manifest(&body, &inner, platform, true)? {
                    Resolved::Image(m) => Ok(m),
                    Resolved::Follow(_) => Err(RegistryError::BadManifest {
                        what: format!("manifest {inner}"),
                        reason: "an index inside an index".into(),
                    }),
                }
            }
        }
    }

    /// The platforms the index at `digest` offers (`None` when it is an image manifest).
    pub async fn offered(&self, digest: &Digest) -> Result<Option<Vec<String>>, RegistryError> {
        let body = self.fetch_manifest(digest).await?;
        Ok(manifest::offered_platforms(&body))
    }

    /// The body of the manifest at `digest` (size-capped).
    async fn fetch_manifest(&self, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
        let what = format!("manifest {digest} of {}/{}", self.host, self.repository);
        let accept = ACCEPTED_MANIFESTS.join(", ");
        let req = self.manifest_request("manifest", Method::GET, digest.as_str(), &accept);
        // A body damaged in transit is fetched once more before the sync gives up on it.
        let body = self.fetch_small(&req, &what, MAX_MANIFEST_BYTES).await?;
        if &Digest::of(&body) == digest {
            return Ok(body);
        }
        tracing::warn!(%digest, "manifest does not match its digest; fetching it again");
        self.fetch_small(&req, &what, MAX_MANIFEST_BYTES).await
    }

    fn manifest_request<'a>(
        &self,
        kind: &'static str,
        method: Method,
        reference: &str,
        accept: &'a str,
    ) -> Req<'a> {
        Req {
            kind,
            method,
            path: format!("/v2/{}/manifests/{reference}", self.repository),
            accept: Some(accept),
            range_from: 0,
        }
    }
}
