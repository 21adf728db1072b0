//! Registry access: tag -> digest (HEAD), manifests and indexes (verified by digest), platform
//! selection, and blob downloads that resume where a broken connection left off.
//!
//! `oci-client` parses references; the requests themselves are made here with `reqwest`, because
//! bootsync needs what oci-client's request layer hides: every status code (for metrics and
//! errors), `Retry-After`, a timeout on every call, a token refreshed on 401, and resumable blob
//! streams that it hashes itself.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use oci_client::Reference;
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_RANGE, RANGE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::config::{Platform, RegistrySettings, Timeouts};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// GHCR refuses a manifest request whose Accept lacks the OCI index type.
const ACCEPTED_MANIFESTS: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// Manifests larger than this are refused: real ones are a few KiB.
const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Token responses larger than this are refused.
const MAX_TOKEN_BYTES: usize = 64 << 10;
/// How often a broken blob download is resumed before giving up.
const BLOB_ATTEMPTS: u32 = 5;
/// Attempts of one request on a transient failure (network error, 5xx, 429).
const REQUEST_ATTEMPTS: u32 = 3;
/// A `Retry-After` longer than this is not waited out inside a sync: the error goes up to the
/// scheduler, which waits it out between syncs.
const MAX_INLINE_RETRY_AFTER: Duration = Duration::from_secs(30);

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
    Blob { digest: String, reason: String },
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

    fn is_transient(&self) -> bool {
        match self {
            RegistryError::Timeout { .. } | RegistryError::Network { .. } => true,
            RegistryError::Status { status, .. } => matches!(status, 429 | 500 | 502 | 503 | 504),
            _ => false,
        }
    }
}

/// A layer (or any blob) as described by a manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
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

    fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
    }
}

/// How to authenticate to a registry.
#[derive(Clone, Default)]
pub enum Credentials {
    #[default]
    Anonymous,
    /// Sent as Basic auth when the registry asks for it, and to the token endpoint.
    Basic { username: String, password: String },
    /// A ready-made bearer token, sent as is.
    Bearer(String),
}

impl Credentials {
    /// The credentials configured for a registry: its `token_file`, its `username` +
    /// `password_file`, else an `auths` entry for the host in the Docker `config.json`, else
    /// anonymous. Files are read at every sync, so rotating them needs no restart.
    pub fn from_settings(
        settings: &RegistrySettings,
        docker_config: Option<&Path>,
    ) -> Result<Credentials, RegistryError> {
        let setup = |reason: String| RegistryError::Setup {
            host: settings.host.clone(),
            reason,
        };
        let read = |key: &str, file: &Path| {
            std::fs::read_to_string(file)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| setup(format!("{key} {}: {e}", file.display())))
        };
        if let Some(file) = &settings.token_file {
            return Ok(Credentials::Bearer(read("token_file", file)?));
        }
        if let (Some(username), Some(file)) = (&settings.username, &settings.password_file) {
            return Ok(Credentials::Basic {
                username: username.clone(),
                password: read("password_file", file)?,
            });
        }
        if let Some(path) = docker_config {
            let text = read("docker_config", path)?;
            return docker_auth(&text, &settings.host)
                .map_err(|e| setup(format!("docker_config {}: {e}", path.display())));
        }
        Ok(Credentials::Anonymous)
    }
}

/// Finds `host` in a Docker `config.json` (`auths` entries keyed by host, with or without a
/// scheme or path; `auth` = base64 of `user:password`, or `username` and `password`).
fn docker_auth(text: &str, host: &str) -> Result<Credentials, String> {
    use base64::Engine as _;
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: HashMap<String, DockerAuth>,
    }
    #[derive(Deserialize)]
    struct DockerAuth {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
        identitytoken: Option<String>,
    }
    // Parse errors from serde_json quote the input: keep them out of messages (secrets).
    let config: DockerConfig = serde_json::from_str(text)
        .map_err(|e| format!("not valid JSON (line {}, column {})", e.line(), e.column()))?;
    let normalise = |key: &str| -> String {
        let k = key.split_once("://").map_or(key, |(_, rest)| rest);
        let k = k.split('/').next().unwrap_or(k);
        if k == "docker.io" || k == "registry-1.docker.io" {
            "index.docker.io".to_string()
        } else {
            k.to_string()
        }
    };
    let Some(entry) = config
        .auths
        .iter()
        .find(|(k, _)| normalise(k) == host)
        .map(|(_, v)| v)
    else {
        return Ok(Credentials::Anonymous);
    };
    if entry.identitytoken.is_some() {
        return Err(format!("the entry for {host} holds an identity token, which bootsync does not support; use username and password"));
    }
    if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
        return Ok(Credentials::Basic {
            username: username.clone(),
            password: password.clone(),
        });
    }
    let auth = entry
        .auth
        .as_deref()
        .ok_or_else(|| format!("the entry for {host} has no auth"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| format!("the auth of {host} is not base64"))?;
    let decoded =
        String::from_utf8(decoded).map_err(|_| format!("the auth of {host} is not UTF-8"))?;
    let (username, password) = decoded
        .split_once(':')
        .ok_or_else(|| format!("the auth of {host} is not user:password"))?;
    Ok(Credentials::Basic {
        username: username.to_string(),
        password: password.to_string(),
    })
}

// Never print secrets, even in debug output.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// Bearer tokens by `host/repository`, kept across syncs (GHCR's anonymous tokens do not
/// expire); a 401 replaces a stale one.
#[derive(Clone, Default)]
pub struct TokenCache(Arc<Mutex<HashMap<String, String>>>);

impl TokenCache {
    fn get(&self, key: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn put(&self, key: &str, token: String) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), token);
    }
}

/// Told about registry traffic (metrics, progress display).
pub trait Observer: Send + Sync {
    /// After every response: status 0 means none came (network error or timeout).
    fn response(&self, host: &str, kind: &'static str, status: u16);
    /// Blob bytes received.
    fn bytes(&self, _n: u64) {}
    /// A blob download starts.
    fn blob_started(&self, _digest: &str, _size: u64) {}
}

/// A connection to one registry for one repository.
pub struct Registry {
    http: reqwest::Client,
    base: String,
    host: String,
    repository: String,
    credentials: Credentials,
    timeouts: Timeouts,
    tokens: TokenCache,
    observer: Option<Arc<dyn Observer>>,
}

/// The options of one request.
struct Req<'a> {
    kind: &'static str,
    method: Method,
    path: String,
    accept: Option<&'a str>,
    range_from: u64,
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

    fn token_key(&self) -> String {
        format!("{}/{}", self.host, self.repository)
    }

    /// Sends a request, retrying transient failures with backoff (honouring a short
    /// `Retry-After`), and answering one 401 with a fresh token or Basic credentials.
    async fn send(&self, req: &Req<'_>, what: &str) -> Result<reqwest::Response, RegistryError> {
        self.retrying(|| self.send_authenticated(req, what)).await
    }

    /// Sends a request and reads its whole (small, capped) body, retrying both: a connection
    /// that breaks inside a manifest is as transient as one that breaks before it.
    async fn fetch_small(
        &self,
        req: &Req<'_>,
        what: &str,
        limit: usize,
    ) -> Result<Vec<u8>, RegistryError> {
        self.retrying(|| async {
            let response = self.send_authenticated(req, what).await?;
            self.read_body(response, limit, what).await
        })
        .await
    }

    /// Runs `op` again on a transient failure, with backoff (or a short `Retry-After`).
    async fn retrying<T, F, Fut>(&self, mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match op().await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_transient() && attempt < REQUEST_ATTEMPTS => {
                    let wait = match e.retry_after() {
                        Some(d) if d > MAX_INLINE_RETRY_AFTER => return Err(e),
                        Some(d) => d,
                        None => crate::daemon::jitter(Duration::from_secs(1 << (attempt - 1))),
                    };
                    tracing::warn!(%e, attempt, "retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn send_authenticated(
        &self,
        req: &Req<'_>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut use_basic = false;
        let mut refreshed = false;
        loop {
            let response = self.send_once(req, what, use_basic).await?;
            if response.status() != StatusCode::UNAUTHORIZED || refreshed {
                return check_status(response, what).await;
            }
            refreshed = true;
            let challenge = response
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            match parse_challenge(&challenge) {
                Some(Challenge::Bearer { realm, service }) => {
                    let token = self.fetch_token(&realm, service.as_deref(), what).await?;
                    self.tokens.put(&self.token_key(), token);
                }
                Some(Challenge::Basic) if matches!(self.credentials, Credentials::Basic { .. }) => {
                    use_basic = true
                }
                _ => return check_status(response, what).await,
            }
        }
    }

    async fn send_once(
        &self,
        req: &Req<'_>,
        what: &str,
        use_basic: bool,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = format!("{}{}", self.base, req.path);
        let mut builder = self.http.request(req.method.clone(), &url);
        if let Some(accept) = req.accept {
            builder = builder.header(ACCEPT, accept);
        }
        if req.range_from > 0 {
            builder = builder.header(RANGE, format!("bytes={}-", req.range_from));
        }
        builder = match (&self.credentials, self.tokens.get(&self.token_key())) {
            (Credentials::Bearer(token), _) => builder.bearer_auth(token),
            (_, Some(token)) => builder.bearer_auth(token),
            (Credentials::Basic { username, password }, None) if use_basic => {
                builder.basic_auth(username, Some(password))
            }
            _ => builder,
        };
        match tokio::time::timeout(self.timeouts.request, builder.send()).await {
            Err(_) => {
                self.observe(req.kind, 0);
                Err(RegistryError::Timeout {
                    what: what.to_string(),
                    after: self.timeouts.request,
                })
            }
            Ok(Err(e)) => {
                self.observe(req.kind, 0);
                Err(RegistryError::Network {
                    what: what.to_string(),
                    reason: crate::daemon::error_chain(&e),
                })
            }
            Ok(Ok(r)) => {
                self.observe(req.kind, r.status().as_u16());
                Ok(r)
            }
        }
    }

    /// The token dance: `GET realm?service=..&scope=repository:REPO:pull`, with Basic
    /// credentials when we have them.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        what: &str,
    ) -> Result<String, RegistryError> {
        let what = format!("{what}: token from {realm}");
        let scope = format!("repository:{}:pull", self.repository);
        let mut query = vec![("scope", scope.as_str())];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut builder = self.http.get(realm).query(&query);
        if let Credentials::Basic { username, password } = &self.credentials {
            builder = builder.basic_auth(username, Some(password));
        }
        let response = match tokio::time::timeout(self.timeouts.request, builder.send()).await {
            Err(_) => {
                self.observe("token", 0);
                return Err(RegistryError::Timeout {
                    what,
                    after: self.timeouts.request,
                });
            }
            Ok(Err(e)) => {
                self.observe("token", 0);
                return Err(RegistryError::Network {
                    what,
                    reason: crate::daemon::error_chain(&e),
                });
            }
            Ok(Ok(r)) => r,
        };
        self.observe("token", response.status().as_u16());
        let response = check_status(response, &what).await?;
        let body = self.read_body(response, MAX_TOKEN_BYTES, &what).await?;
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| RegistryError::BadManifest {
                what: what.clone(),
                reason: format!("token response is not JSON: {e}"),
            })?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::BadManifest {
                what,
                reason: "token response holds no token".into(),
            })
    }

    /// Reads a whole (small) body within the request timeout, refusing more than `limit` bytes.
    async fn read_body(
        &self,
        mut response: reqwest::Response,
        limit: usize,
        what: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let read = async {
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| RegistryError::Network {
                what: what.to_string(),
                reason: crate::daemon::error_chain(&e),
            })? {
                if body.len() + chunk.len() > limit {
                    return Err(RegistryError::BadManifest {
                        what: what.to_string(),
                        reason: format!("response is larger than the {limit} bytes allowed"),
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        tokio::time::timeout(self.timeouts.request, read)
            .await
            .map_err(|_| RegistryError::Timeout {
                what: what.to_string(),
                after: self.timeouts.request,
            })?
    }

    /// The digest the reference points at now (index or manifest), from a HEAD request.
    pub async fn resolve(&self, reference: &Reference) -> Result<String, RegistryError> {
        let what = format!("resolving {}", reference.whole());
        let tag = reference
            .digest()
            .or(reference.tag())
            .unwrap_or("latest")
            .to_string();
        let accept = ACCEPTED_MANIFESTS.join(", ");
        let head = self.manifest_request("head", Method::HEAD, &tag, &accept);
        let response = self.send(&head, &what).await?;
        let digest = match response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            Some(d) => d.to_string(),
            None => {
                // Some registries omit the header on HEAD: hash the manifest instead.
                let get = Req {
                    kind: "manifest",
                    method: Method::GET,
                    ..head
                };
                let body = self.fetch_small(&get, &what, MAX_MANIFEST_BYTES).await?;
                format!("sha256:{}", hex::encode(Sha256::digest(&body)))
            }
        };
        check_sha256(&digest).map_err(|reason| RegistryError::BadManifest {
            what: what.clone(),
            reason,
        })?;
        if let Some(pinned) = reference.digest() {
            if pinned != digest {
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
        digest: &str,
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
    pub async fn offered(&self, digest: &str) -> Result<Option<Vec<String>>, RegistryError> {
        let body = self.fetch_manifest(digest).await?;
        let raw: RawManifest =
            serde_json::from_slice(&body).map_err(|e| RegistryError::BadManifest {
                what: format!("manifest {digest}"),
                reason: format!("not a valid manifest: {e}"),
            })?;
        Ok(raw.manifests.map(|entries| {
            entries
                .iter()
                .filter_map(|e| e.platform.as_ref().map(IndexPlatform::describe))
                .collect()
        }))
    }

    /// The body of the manifest at `digest` (size-capped).
    async fn fetch_manifest(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        let what = format!("manifest {digest} of {}/{}", self.host, self.repository);
        check_sha256(digest).map_err(|reason| RegistryError::BadManifest {
            what: what.clone(),
            reason,
        })?;
        let accept = ACCEPTED_MANIFESTS.join(", ");
        let req = self.manifest_request("manifest", Method::GET, digest, &accept);
        // A body damaged in transit is fetched once more before the sync gives up on it.
        let body = self.fetch_small(&req, &what, MAX_MANIFEST_BYTES).await?;
        if format!("sha256:{}", hex::encode(Sha256::digest(&body))) == digest {
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

    /// Streams blob `desc` into `tx` chunk by chunk. A connection that breaks or stalls part way
    /// is resumed with a `Range` request from the byte reached (asking the registry URL again, so
    /// an expired storage redirect is renewed), so nothing is fetched twice. The consumer hashes
    /// what it receives; a receiver that hangs up ends the download quietly.
    pub async fn stream_blob(
        &self,
        desc: &Descriptor,
        tx: mpsc::Sender<std::io::Result<Bytes>>,
        hasher: &mut Sha256,
    ) {
        if let Some(o) = &self.observer {
            o.blob_started(&desc.digest, desc.size);
        }
        if let Err(e) = self.stream_blob_inner(desc, &tx, hasher).await {
            let _ = tx.send(Err(std::io::Error::other(e))).await;
        }
    }

    async fn stream_blob_inner(
        &self,
        desc: &Descriptor,
        tx: &mpsc::Sender<std::io::Result<Bytes>>,
        hasher: &mut Sha256,
    ) -> Result<(), RegistryError> {
        let fail = |reason: String| RegistryError::Blob {
            digest: desc.digest.clone(),
            reason,
        };
        let mut offset: u64 = 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.blob_attempt(desc, offset, tx, hasher).await {
                Ok(AttemptEnd::Done) | Ok(AttemptEnd::ConsumerGone) => return Ok(()),
                Err((reached, e)) => {
                    // Progress earns a fresh set of attempts (counting the one that made it); a
                    // blob that never moves does not.
                    if reached > offset {
                        attempt = 1;
                    }
                    offset = reached;
                    if attempt >= BLOB_ATTEMPTS || !e.is_transient() {
                        return Err(fail(format!(
                            "at byte {offset} of {} (attempt {attempt}): {e}",
                            desc.size
                        )));
                    }
                    let backoff = e.retry_after().unwrap_or_else(|| {
                        crate::daemon::jitter(Duration::from_millis(500 << (attempt - 1).min(5)))
                    });
                    tracing::warn!(digest = %desc.digest, offset, attempt, %e, "blob download broke; resuming after {backoff:?}");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// One request for the blob from `offset`. On failure returns the offset reached.
    async fn blob_attempt(
        &self,
        desc: &Descriptor,
        mut offset: u64,
        tx: &mpsc::Sender<std::io::Result<Bytes>>,
        hasher: &mut Sha256,
    ) -> Result<AttemptEnd, (u64, RegistryError)> {
        let what = format!("blob {}", desc.digest);
        let req = Req {
            kind: "blob",
            method: Method::GET,
            path: format!("/v2/{}/blobs/{}", self.repository, desc.digest),
            accept: None,
            range_from: offset,
        };
        let mut response = self.send(&req, &what).await.map_err(|e| (offset, e))?;
        // A server that ignores Range sends the whole blob again: skip what we already have.
        let mut skip = match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let start = content_range_start(response.headers());
                if start != Some(offset) {
                    return Err((
                        offset,
                        RegistryError::Network {
                            what,
                            reason: format!("asked for bytes from {offset}, got Content-Range starting at {start:?}"),
                        },
                    ));
                }
                0
            }
            _ => offset,
        };
        let network = |reason: String| RegistryError::Network {
            what: what.clone(),
            reason,
        };
        loop {
            let next = tokio::time::timeout(self.timeouts.stall, response.chunk()).await;
            let mut chunk = match next {
                Err(_) => {
                    return Err((
                        offset,
                        RegistryError::Timeout {
                            what: format!("{what}: stalled"),
                            after: self.timeouts.stall,
                        },
                    ))
                }
                Ok(Err(e)) => return Err((offset, network(crate::daemon::error_chain(&e)))),
                Ok(Ok(None)) if offset < desc.size => {
                    return Err((
                        offset,
                        network(format!(
                            "connection ended at byte {offset} of {}",
                            desc.size
                        )),
                    ))
                }
                Ok(Ok(None)) => return Ok(AttemptEnd::Done),
                Ok(Ok(Some(chunk))) => chunk,
            };
            if skip > 0 {
                let n = skip.min(chunk.len() as u64);
                skip -= n;
                chunk = chunk.slice(n as usize..);
            }
            if chunk.is_empty() {
                continue;
            }
            offset += chunk.len() as u64;
            if let Some(o) = &self.observer {
                o.bytes(chunk.len() as u64);
            }
            hasher.update(&chunk);
            if tx.send(Ok(chunk)).await.is_err() {
                return Ok(AttemptEnd::ConsumerGone);
            }
        }
    }
}

/// Turns a non-success response into an error carrying its status, a short detail from the body
/// and any `Retry-After`.
async fn check_status(
    response: reqwest::Response,
    what: &str,
) -> Result<reqwest::Response, RegistryError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    // The body is only for the message: read a little, briefly.
    let body = tokio::time::timeout(Duration::from_secs(2), response.bytes())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let mut detail = String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_string();
    if detail.is_empty() && status == StatusCode::NOT_FOUND {
        detail = "not found".into();
    }
    if detail.is_empty() && status == StatusCode::UNAUTHORIZED {
        detail = "unauthorized: check the registry credentials".into();
    }
    Err(RegistryError::Status {
        what: what.to_string(),
        status: status.as_u16(),
        detail,
        retry_after,
    })
}

fn content_range_start(headers: &HeaderMap) -> Option<u64> {
    // "bytes START-END/TOTAL"
    let v = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    v.strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
    },
    Basic,
}

fn parse_challenge(header: &str) -> Option<Challenge> {
    let challenges = http_auth::parse_challenges(header).ok()?;
    for c in challenges {
        if c.scheme.eq_ignore_ascii_case("bearer") {
            let param = |name: &str| {
                c.params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_unescaped())
            };
            return Some(Challenge::Bearer {
                realm: param("realm")?,
                service: param("service"),
            });
        }
        if c.scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
    }
    None
}

enum AttemptEnd {
    Done,
    ConsumerGone,
}

/// What a manifest document resolves to for a platform.
#[derive(Debug)]
pub enum Resolved {
    /// An image manifest: the version.
    Image(ImageManifest),
    /// An index: fetch this platform manifest next.
    Follow(String),
}

/// Checks a manifest or index `body` fetched by `digest` (it must hash to it, parse, and be of a
/// supported schema and media type) and resolves it for `platform`. `nested` is set for a
/// document an index pointed to, which must be an image manifest. Pure, so it is fuzzed directly.
pub fn resolve_manifest(
    body: &[u8],
    digest: &str,
    platform: &Platform,
    nested: bool,
) -> Result<Resolved, RegistryError> {
    let bad = |reason: String| RegistryError::BadManifest {
        what: format!("manifest {digest}"),
        reason,
    };
    check_sha256(digest).map_err(bad)?;
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(bad(format!(
            "{} bytes is larger than the {MAX_MANIFEST_BYTES} allowed",
            body.len()
        )));
    }
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(body)));
    if actual != digest {
        return Err(bad(format!("digest mismatch: content hashes to {actual}")));
    }
    let raw: RawManifest =
        serde_json::from_slice(body).map_err(|e| bad(format!("not a valid manifest: {e}")))?;
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
    let Some(entries) = raw.manifests else {
        return image_from(raw, digest).map(Resolved::Image);
    };
    if nested {
        return Err(bad("an index inside an index".into()));
    }
    // Platforms compare as containerd normalises them (`arm64` = `arm64/v8`, `aarch64` =
    // `arm64`); a config without a variant also takes the one entry of another variant.
    let matching = |f: &dyn Fn(&Platform) -> bool| -> Vec<&IndexEntry> {
        entries
            .iter()
            .filter(|e| e.platform.as_ref().is_some_and(|p| f(&p.platform())))
            .collect()
    };
    let mut chosen = matching(&|p| platform.same_as(p));
    if chosen.is_empty() && platform.variant.is_none() {
        chosen = matching(&|p| platform.same_arch(p));
    }
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
            return Err(bad(format!(
                "platform {platform} is listed {} times; refusing to guess",
                many.len()
            )))
        }
    };
    if entry.digest == digest {
        return Err(bad("the index lists itself".into()));
    }
    check_sha256(&entry.digest).map_err(|r| bad(format!("entry for {platform}: {r}")))?;
    if !entry.media_type.is_empty()
        && entry.media_type != OCI_MANIFEST
        && entry.media_type != DOCKER_MANIFEST
    {
        return Err(bad(format!(
            "entry for {platform} has unsupported media type {:?}",
            entry.media_type
        )));
    }
    Ok(Resolved::Follow(entry.digest.clone()))
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

    fn arm64() -> Platform {
        Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: None,
        }
    }

    fn digest_of(body: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(body)))
    }

    #[test]
    fn manifests_resolve_and_hostile_ones_are_refused() {
        let layer = format!("sha256:{}", "a".repeat(64));
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":3}}]}}"#
        );
        let d = digest_of(image.as_bytes());
        assert!(
            matches!(resolve_manifest(image.as_bytes(), &d, &arm64(), false), Ok(Resolved::Image(m)) if m.layers.len() == 1)
        );
        // the body must hash to the digest it was fetched by
        let wrong = format!("sha256:{}", "b".repeat(64));
        let e = resolve_manifest(image.as_bytes(), &wrong, &arm64(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("digest mismatch"), "{e}");

        let entry = |digest: &str, arch: &str| {
            format!(
                r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{digest}","size":1,"platform":{{"os":"linux","architecture":"{arch}"}}}}"#
            )
        };
        let index = |entries: &[String]| {
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
                entries.join(",")
            )
        };
        let ok = index(&[entry(&d, "arm64"), entry(&wrong, "amd64")]);
        assert!(
            matches!(resolve_manifest(ok.as_bytes(), &digest_of(ok.as_bytes()), &arm64(), false), Ok(Resolved::Follow(f)) if f == d)
        );
        // nested index, duplicate platform, missing platform, bad digests
        let e = resolve_manifest(ok.as_bytes(), &digest_of(ok.as_bytes()), &arm64(), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("index inside an index"), "{e}");
        let twice = index(&[entry(&d, "arm64"), entry(&wrong, "arm64")]);
        let e = resolve_manifest(
            twice.as_bytes(),
            &digest_of(twice.as_bytes()),
            &arm64(),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("listed 2 times"), "{e}");
        let none = index(&[entry(&d, "amd64")]);
        let e = resolve_manifest(
            none.as_bytes(),
            &digest_of(none.as_bytes()),
            &arm64(),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("offers: linux/amd64"), "{e}");
        let md5 = index(&[entry("md5:abc", "arm64")]);
        let e = resolve_manifest(md5.as_bytes(), &digest_of(md5.as_bytes()), &arm64(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported digest algorithm"), "{e}");
        for junk in [&b"not json"[..], b"{}", b"[]", br#"{"schemaVersion":1}"#] {
            assert!(resolve_manifest(junk, &digest_of(junk), &arm64(), false).is_err());
        }
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        let e = resolve_manifest(&huge, &digest_of(&huge), &arm64(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than"), "{e}");
    }

    #[test]
    fn challenges_parse() {
        match parse_challenge(
            r#"Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:a/b:pull""#,
        ) {
            Some(Challenge::Bearer { realm, service }) => {
                assert_eq!(realm, "https://ghcr.io/token");
                assert_eq!(service.as_deref(), Some("ghcr.io"));
            }
            _ => panic!("bearer challenge not recognised"),
        }
        assert!(matches!(
            parse_challenge(r#"Basic realm="test""#),
            Some(Challenge::Basic)
        ));
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn docker_config_entries_are_found_by_host() {
        let cfg = r#"{"auths": {
            "https://ghcr.io": {"auth": "cm9ib3Q6czNjcjN0"},
            "127.0.0.1:5000": {"username": "u", "password": "p"},
            "https://index.docker.io/v1/": {"auth": "ZDpo"},
            "odd.example": {"identitytoken": "x"}
        }}"#;
        let basic = |c: Credentials| match c {
            Credentials::Basic { username, password } => (username, password),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            basic(docker_auth(cfg, "ghcr.io").unwrap()),
            ("robot".into(), "s3cr3t".into())
        );
        assert_eq!(
            basic(docker_auth(cfg, "127.0.0.1:5000").unwrap()),
            ("u".into(), "p".into())
        );
        assert_eq!(
            basic(docker_auth(cfg, "index.docker.io").unwrap()),
            ("d".into(), "h".into())
        );
        assert!(matches!(
            docker_auth(cfg, "quay.io").unwrap(),
            Credentials::Anonymous
        ));
        assert!(docker_auth(cfg, "odd.example")
            .unwrap_err()
            .contains("identity token"));
        let e =
            docker_auth(r#"{"auths": {"x": {"auth": "hunter2 is my password"#, "x").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn content_range_is_read() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_RANGE, "bytes 100-199/200".parse().unwrap());
        assert_eq!(content_range_start(&h), Some(100));
    }

    #[test]
    fn credentials_never_print_secrets() {
        let c = Credentials::Basic {
            username: "robot".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Credentials::Bearer("tok123".into())).contains("tok123"));
    }

    #[test]
    fn platforms_match_as_containerd_normalises_them() {
        let p = |s: &str| crate::config::parse_platform(s).unwrap();
        // (wanted, in the index, chosen?)
        let table = [
            ("linux/arm64", "linux/arm64/v8", true),
            ("linux/arm64/v8", "linux/arm64", true),
            ("linux/aarch64", "linux/arm64", true),
            ("linux/arm64", "linux/aarch64/8", true),
            ("linux/amd64", "linux/x86_64", true),
            ("linux/amd64/v1", "linux/amd64", true),
            ("linux/arm/v7", "linux/armhf", true),
            ("linux/arm", "linux/arm/v7", true),
            ("linux/arm64/v9", "linux/arm64", false),
            ("linux/arm64", "linux/amd64", false),
            ("linux/arm/v6", "linux/arm/v7", false),
            // no variant asked: the one entry of another variant is taken
            ("linux/amd64", "linux/amd64/v3", true),
        ];
        for (wanted, offered, chosen) in table {
            let (os, rest) = offered.split_once('/').unwrap();
            let (arch, variant) = match rest.split_once('/') {
                Some((a, v)) => (a, format!(r#","variant":"{v}""#)),
                None => (rest, String::new()),
            };
            let index = format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{}","size":1,"platform":{{"os":"{os}","architecture":"{arch}"{variant}}}}}]}}"#,
                "c".repeat(64)
            );
            let r = resolve_manifest(
                index.as_bytes(),
                &digest_of(index.as_bytes()),
                &p(wanted),
                false,
            );
            assert_eq!(
                r.is_ok(),
                chosen,
                "{wanted} in an index of {offered}: {r:?}"
            );
        }
    }
}
