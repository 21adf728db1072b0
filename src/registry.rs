//! Registry access: tag -> digest (HEAD), manifests and indexes (verified by digest), platform
//! selection, and blob downloads that resume where a broken connection left off.
//!
//! Built on `oci-client` for references, the token dance and request plumbing. What it lacks is
//! added here: timeouts around every call, digest checks on what we parse, and explicit platform
//! selection with an error that lists what the index offers.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use oci_client::client::{
    BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::config::{Platform, RegistrySettings, Timeouts};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ACCEPTED_MANIFESTS: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// Manifests larger than this are refused: real ones are a few KiB.
const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// How often a broken blob download is resumed before giving up.
const BLOB_ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("{what}: {source}")]
    Client {
        what: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
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
    Blob { digest: String, reason: String },
}

/// A layer (or any blob) as described by a manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// The image manifest chosen for the target's platform.
#[derive(Debug, Clone)]
pub struct ImageManifest {
    /// Digest of the manifest bytes (the version id).
    pub digest: String,
    /// Layers, bottom first, as in the manifest.
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<u32>,
    media_type: Option<String>,
    manifests: Option<Vec<IndexEntry>>,
    layers: Option<Vec<Descriptor>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    #[serde(default)]
    media_type: String,
    digest: String,
    platform: Option<IndexPlatform>,
}

#[derive(Debug, Deserialize)]
struct IndexPlatform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

impl IndexPlatform {
    fn describe(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }

    fn matches(&self, p: &Platform) -> bool {
        self.os == p.os
            && self.architecture == p.architecture
            && (p.variant.is_none() || p.variant == self.variant)
    }
}

/// A connection to one registry for one repository reference.
pub struct Registry {
    client: Client,
    auth: RegistryAuth,
    timeouts: Timeouts,
}

impl Registry {
    /// Builds a client for the registry that `reference` lives on. Credentials are read now, so a
    /// rotated password file is picked up by the next sync.
    pub fn connect(
        reference: &Reference,
        settings: &RegistrySettings,
        timeouts: Timeouts,
    ) -> Result<Self, RegistryError> {
        let host = reference.resolve_registry().to_string();
        let setup = |reason: String| RegistryError::Setup {
            host: host.clone(),
            reason,
        };
        let mut config = ClientConfig {
            protocol: if settings.insecure {
                ClientProtocol::HttpsExcept(vec![host.clone()])
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(timeouts.connect),
            // A per-read limit: a stalled body fails instead of hanging.
            read_timeout: Some(timeouts.stall),
            // We pick the platform ourselves, with a useful error.
            platform_resolver: None,
            user_agent: concat!("bootsync/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        if let Some(ca) = &settings.ca_file {
            let data =
                std::fs::read(ca).map_err(|e| setup(format!("ca_file {}: {e}", ca.display())))?;
            config.extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        // `Client::new` silently falls back to a default config on error; `try_from` does not.
        let client = Client::try_from(config).map_err(|e| setup(e.to_string()))?;
        let auth = match (&settings.username, &settings.password_file) {
            (Some(user), Some(file)) => {
                let password = std::fs::read_to_string(file)
                    .map_err(|e| setup(format!("password_file {}: {e}", file.display())))?;
                RegistryAuth::Basic(
                    user.clone(),
                    password.trim_end_matches(['\r', '\n']).to_string(),
                )
            }
            _ => RegistryAuth::Anonymous,
        };
        Ok(Registry {
            client,
            auth,
            timeouts,
        })
    }

    async fn timed<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, oci_client::errors::OciDistributionError>>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(self.timeouts.request, fut).await {
            Err(_) => Err(RegistryError::Timeout {
                what: what.to_string(),
                after: self.timeouts.request,
            }),
            Ok(Err(source)) => Err(RegistryError::Client {
                what: what.to_string(),
                source,
            }),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// The digest the reference points at now (index or manifest), from a HEAD request.
    pub async fn resolve(&self, reference: &Reference) -> Result<String, RegistryError> {
        let what = format!("resolving {}", reference.whole());
        let digest = self
            .timed(
                &what,
                self.client.fetch_manifest_digest(reference, &self.auth),
            )
            .await?;
        check_sha256(&digest).map_err(|reason| RegistryError::BadManifest { what, reason })?;
        Ok(digest)
    }

    /// Fetches the manifest at `digest` (index or image) and returns the image manifest for
    /// `platform`, each document verified against the digest it was fetched by.
    pub async fn image_manifest(
        &self,
        reference: &Reference,
        digest: &str,
        platform: &Platform,
    ) -> Result<ImageManifest, RegistryError> {
        let top = self.fetch_manifest(reference, digest).await?;
        if let Some(entries) = top.manifests {
            let chosen: Vec<&IndexEntry> = entries
                .iter()
                .filter(|e| e.platform.as_ref().is_some_and(|p| p.matches(platform)))
                .collect();
            let entry = match chosen.as_slice() {
                [one] => *one,
                [] => {
                    let mut available: Vec<String> = entries
                        .iter()
                        .filter_map(|e| e.platform.as_ref().map(IndexPlatform::describe))
                        .collect();
                    available.dedup();
                    return Err(RegistryError::PlatformMissing {
                        wanted: platform.to_string(),
                        digest: digest.to_string(),
                        available: if available.is_empty() {
                            "no platforms".into()
                        } else {
                            available.join(", ")
                        },
                    });
                }
                many => {
                    return Err(RegistryError::BadManifest {
                        what: format!("index {digest}"),
                        reason: format!(
                            "platform {platform} is listed {} times; refusing to guess",
                            many.len()
                        ),
                    })
                }
            };
            if entry.digest == digest {
                return Err(RegistryError::BadManifest {
                    what: format!("index {digest}"),
                    reason: "it lists itself".into(),
                });
            }
            if !entry.media_type.is_empty()
                && entry.media_type != OCI_MANIFEST
                && entry.media_type != DOCKER_MANIFEST
            {
                return Err(RegistryError::BadManifest {
                    what: format!("index {digest}"),
                    reason: format!(
                        "entry for {platform} has unsupported media type {:?}",
                        entry.media_type
                    ),
                });
            }
            let inner = self.fetch_manifest(reference, &entry.digest).await?;
            return image_from(inner, &entry.digest);
        }
        image_from(top, digest)
    }

    async fn fetch_manifest(
        &self,
        reference: &Reference,
        digest: &str,
    ) -> Result<RawManifest, RegistryError> {
        let what = format!("manifest {digest} of {}", reference.whole());
        let bad = |reason: String| RegistryError::BadManifest {
            what: what.clone(),
            reason,
        };
        check_sha256(digest).map_err(bad)?;
        let at = reference.clone_with_digest(digest.to_string());
        // oci-client checks the body against the digest in the reference; we check again so the
        // guarantee does not depend on a library detail.
        let (body, _) = self
            .timed(
                &what,
                self.client
                    .pull_manifest_raw(&at, &self.auth, ACCEPTED_MANIFESTS),
            )
            .await?;
        if body.len() > MAX_MANIFEST_BYTES {
            return Err(bad(format!(
                "{} bytes is larger than the {MAX_MANIFEST_BYTES} allowed",
                body.len()
            )));
        }
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if actual != digest {
            return Err(bad(format!("digest mismatch: content hashes to {actual}")));
        }
        let raw: RawManifest =
            serde_json::from_slice(&body).map_err(|e| bad(format!("not a valid manifest: {e}")))?;
        if raw.schema_version != Some(2) {
            return Err(bad(format!(
                "unsupported schemaVersion {:?}",
                raw.schema_version
            )));
        }
        if let Some(mt) = &raw.media_type {
            if !ACCEPTED_MANIFESTS.contains(&mt.as_str()) {
                return Err(bad(format!("unsupported media type {mt:?}")));
            }
        }
        Ok(raw)
    }

    /// Streams blob `desc` into `tx` chunk by chunk. A connection that breaks or stalls part way
    /// is resumed with a `Range` request from the byte reached (asking the registry URL again, so
    /// an expired storage redirect is renewed), so nothing is fetched twice. The consumer hashes
    /// what it receives; a receiver that hangs up ends the download quietly.
    pub async fn stream_blob(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        tx: mpsc::Sender<std::io::Result<Bytes>>,
    ) {
        if let Err(e) = self.stream_blob_inner(reference, desc, &tx).await {
            let _ = tx.send(Err(std::io::Error::other(e))).await;
        }
    }

    async fn stream_blob_inner(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        tx: &mpsc::Sender<std::io::Result<Bytes>>,
    ) -> Result<(), RegistryError> {
        let fail = |reason: String| RegistryError::Blob {
            digest: desc.digest.clone(),
            reason,
        };
        let mut offset: u64 = 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.blob_attempt(reference, desc, offset, tx).await {
                Ok(AttemptEnd::Done) | Ok(AttemptEnd::ConsumerGone) => return Ok(()),
                Err((reached, reason)) => {
                    offset = reached;
                    if attempt >= BLOB_ATTEMPTS {
                        return Err(fail(format!(
                            "giving up after {attempt} attempts at byte {offset}: {reason}"
                        )));
                    }
                    let backoff = Duration::from_millis(500 << (attempt - 1).min(5));
                    tracing::warn!(digest = %desc.digest, offset, attempt, %reason, "blob download broke; resuming after {backoff:?}");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// One request for the blob from `offset`. On failure returns the offset reached.
    async fn blob_attempt(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        mut offset: u64,
        tx: &mpsc::Sender<std::io::Result<Bytes>>,
    ) -> Result<AttemptEnd, (u64, String)> {
        let request =
            self.client
                .pull_blob_stream_partial(reference, desc.digest.as_str(), offset, None);
        let response = match tokio::time::timeout(self.timeouts.request, request).await {
            Err(_) => {
                return Err((
                    offset,
                    format!("no response within {:?}", self.timeouts.request),
                ))
            }
            Ok(Err(e)) => return Err((offset, e.to_string())),
            Ok(Ok(r)) => r,
        };
        // A server that ignores Range sends the whole blob again: skip what we already have.
        let (mut stream, mut skip) = match response {
            BlobResponse::Partial(s) => (s, 0),
            BlobResponse::Full(s) => (s, offset),
        };
        loop {
            let next = tokio::time::timeout(self.timeouts.stall, stream.next()).await;
            let chunk = match next {
                Err(_) => {
                    return Err((
                        offset,
                        format!("stalled: no data for {:?}", self.timeouts.stall),
                    ))
                }
                Ok(None) if offset < desc.size => {
                    return Err((
                        offset,
                        format!("connection ended at byte {offset} of {}", desc.size),
                    ))
                }
                Ok(None) => return Ok(AttemptEnd::Done),
                Ok(Some(Err(e))) => return Err((offset, e.to_string())),
                Ok(Some(Ok(chunk))) => chunk,
            };
            let mut chunk = chunk;
            if skip > 0 {
                let n = skip.min(chunk.len() as u64);
                skip -= n;
                chunk = chunk.slice(n as usize..);
            }
            if chunk.is_empty() {
                continue;
            }
            offset += chunk.len() as u64;
            if tx.send(Ok(chunk)).await.is_err() {
                return Ok(AttemptEnd::ConsumerGone);
            }
        }
    }
}

enum AttemptEnd {
    Done,
    ConsumerGone,
}

fn image_from(raw: RawManifest, digest: &str) -> Result<ImageManifest, RegistryError> {
    let bad = |reason: &str| RegistryError::BadManifest {
        what: format!("manifest {digest}"),
        reason: reason.to_string(),
    };
    let layers = raw
        .layers
        .ok_or_else(|| bad("it is an index inside an index, or has no layers"))?;
    if layers.is_empty() {
        return Err(bad("it has no layers"));
    }
    for l in &layers {
        check_sha256(&l.digest).map_err(|r| bad(&format!("layer {}: {r}", l.digest)))?;
    }
    Ok(ImageManifest {
        digest: digest.to_string(),
        layers,
    })
}

/// Only sha256 digests are accepted: it is what registries use and what we hash with.
pub fn check_sha256(digest: &str) -> Result<(), String> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(())
        }
        Some(("sha256", _)) => Err(format!("malformed digest {digest:?}")),
        Some((alg, _)) => Err(format!(
            "unsupported digest algorithm {alg:?} (only sha256)"
        )),
        None => Err(format!("malformed digest {digest:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(check_sha256(&good).is_ok());
        assert!(check_sha256("sha512:abc")
            .unwrap_err()
            .contains("unsupported"));
        assert!(check_sha256("sha256:ABC").is_err());
        assert!(check_sha256(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(check_sha256("nonsense").is_err());
    }

    #[test]
    fn platform_matching_honours_variant_only_when_asked() {
        let p = IndexPlatform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: Some("v8".into()),
        };
        let want = |v: Option<&str>| Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: v.map(str::to_string),
        };
        assert!(p.matches(&want(None)));
        assert!(p.matches(&want(Some("v8"))));
        assert!(!p.matches(&want(Some("v7"))));
        assert_eq!(p.describe(), "linux/arm64/v8");
    }
}
