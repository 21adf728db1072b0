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
//! - `endpoint`: the mirrors, then the registry: which one a request goes to, falling back;
//!   the HTTP clients, kept across syncs;
//! - `client`: one request with its timeout, retries with backoff, capped bodies, errors;
//! - `manifest`: manifests and indexes checked and resolved for a platform (pure);
//! - `blob`: resumable blob streams;
//! - `signatures`: where cosign keeps the signatures of a digest, and fetching them.

mod auth;
mod blob;
mod client;
mod endpoint;
mod manifest;
mod signatures;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;

use crate::config::{Platform, RegistrySettings, Timeouts};
use crate::digest::{Digest, DigestError};
pub use crate::reference::Reference;
pub use auth::{Credentials, HelperCache, TokenCache};
use client::Req;
pub use endpoint::Clients;
use endpoint::{ClientSpec, Endpoint, Purpose};
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
    /// Blob bytes received from `host`.
    fn bytes(&self, _host: &str, _n: u64) {}
    /// A request to `host` (role `mirror` or `upstream`) succeeded (`None`) or failed.
    fn endpoint(&self, _host: &str, _role: &'static str, _error: Option<&str>) {}
    /// A blob download starts.
    fn blob_started(&self, _digest: &str, _size: u64) {}
}

/// A connection to one registry for one repository, through its mirrors.
pub struct Registry {
    /// The mirrors in order, then the registry itself (always last, never empty).
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) host: String,
    pub(crate) timeouts: Timeouts,
    pub(crate) tokens: TokenCache,
    pub(crate) observer: Option<Arc<dyn Observer>>,
    /// (mirror, blob) pairs skipped: the mirror sent bytes that failed the blob's digest.
    distrusted: Mutex<HashSet<(usize, Digest)>>,
    /// Which endpoints sent bytes of each blob in this sync.
    served: Mutex<HashMap<Digest, Vec<usize>>>,
}

/// How to reach a registry: its settings, and the credentials for a host (the registry's
/// own, each mirror's own).
pub struct Access<'a> {
    pub settings: &'a RegistrySettings,
    pub credentials: &'a dyn Fn(&str) -> Result<Credentials, RegistryError>,
    pub clients: &'a Clients,
}

impl Registry {
    /// A client for the registry that `reference` lives on, and its mirrors.
    pub fn connect(
        reference: &Reference,
        access: Access<'_>,
        timeouts: Timeouts,
    ) -> Result<Self, RegistryError> {
        let settings = access.settings;
        let host = reference.resolve_registry().to_string();
        let repository = reference.repository().to_string();
        let mut endpoints = Vec::new();
        for m in &settings.mirrors {
            let spec = ClientSpec {
                ca_file: m.ca_file.clone(),
                skip_verify: m.skip_verify,
                proxy: None,
                timeouts,
            };
            endpoints.push(Endpoint {
                label: m.host.clone(),
                base: m.base.clone(),
                repository: match &m.prefix {
                    Some(p) => format!("{p}/{repository}"),
                    None => repository.clone(),
                },
                http: access.clients.get(&m.host, &spec)?,
                credentials: (access.credentials)(&m.host)?,
                mirror: true,
                resolve: m.resolve,
                down: AtomicBool::new(false),
            });
        }
        let spec = ClientSpec {
            ca_file: settings.ca_file.clone(),
            skip_verify: false,
            proxy: settings.proxy.clone(),
            timeouts,
        };
        let scheme = if settings.insecure { "http" } else { "https" };
        endpoints.push(Endpoint {
            label: host.clone(),
            base: format!("{scheme}://{host}"),
            repository: repository.clone(),
            http: access.clients.get(&host, &spec)?,
            credentials: (access.credentials)(&host)?,
            mirror: false,
            resolve: true,
            down: AtomicBool::new(false),
        });
        Ok(Registry {
            endpoints,
            host,
            timeouts,
            tokens: TokenCache::default(),
            observer: None,
            distrusted: Mutex::default(),
            served: Mutex::default(),
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

    fn observe(&self, ep: &Endpoint, kind: &'static str, status: u16) {
        if let Some(o) = &self.observer {
            o.response(&ep.label, kind, status);
        }
    }

    /// The digest the reference points at now (index or manifest), from a HEAD request; a
    /// mirror may answer it only when its `resolve` allows.
    pub async fn resolve(&self, reference: &Reference) -> Result<Digest, RegistryError> {
        let what = format!("resolving {}", reference.whole());
        let tag = reference
            .digest()
            .or(reference.tag())
            .unwrap_or("latest")
            .to_string();
        let accept = ACCEPTED_MANIFESTS.join(", ");
        let purpose = match reference.digest() {
            // A digest-pinned reference is checked below whoever answers.
            Some(_) => Purpose::Content(None),
            None => Purpose::Resolve,
        };
        let digest = self
            .across(purpose, |ep| async {
                let head = manifest_request("head", Method::HEAD, &tag, &accept);
                let response = self.send(ep, &head, &what).await?;
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
                        let body = self
                            .fetch_small(ep, &get, &what, MAX_MANIFEST_BYTES)
                            .await?;
                        Digest::of(&body)
                    }
                };
                if let Some(pinned) = reference.digest() {
                    if pinned != digest.as_str() {
                        return Err(RegistryError::BadManifest {
                            what: what.clone(),
                            reason: format!(
                                "{} says {digest}, the reference pins {pinned}",
                                ep.label
                            ),
                        });
                    }
                }
                if ep.mirror {
                    tracing::debug!(mirror = %ep.label, %digest, "tag resolved by a mirror");
                }
                Ok(digest)
            })
            .await?;
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

    /// The body of the manifest at `digest` (size-capped), from the first endpoint whose
    /// answer matches the digest.
    async fn fetch_manifest(&self, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
        let accept = ACCEPTED_MANIFESTS.join(", ");
        let accept = &accept;
        self.across(Purpose::Content(Some(digest)), |ep| async move {
            let what = format!("manifest {digest} of {}/{}", ep.label, ep.repository);
            let req = manifest_request("manifest", Method::GET, digest.as_str(), accept);
            let body = self
                .fetch_small(ep, &req, &what, MAX_MANIFEST_BYTES)
                .await?;
            if &Digest::of(&body) == digest {
                return Ok(body);
            }
            if ep.mirror {
                return Err(RegistryError::BadManifest {
                    what,
                    reason: format!("content hashes to {}", Digest::of(&body)),
                });
            }
            // A body damaged in transit is fetched once more before the sync gives up on it.
            tracing::warn!(%digest, "manifest does not match its digest; fetching it again");
            self.fetch_small(ep, &req, &what, MAX_MANIFEST_BYTES).await
        })
        .await
    }
}

fn manifest_request<'a>(
    kind: &'static str,
    method: Method,
    reference: &str,
    accept: &'a str,
) -> Req<'a> {
    Req {
        kind,
        method,
        tail: format!("manifests/{reference}"),
        accept: Some(accept),
        range_from: 0,
    }
}
