//! Where a request goes: the registry's mirrors in order, then the registry itself, the way
//! containerd's `hosts.toml` and `registries.conf` mirrors work.
//!
//! A mirror is untrusted: what it serves is checked against the digests as everything is, and
//! content that fails its digest makes that mirror skipped for that blob or manifest. A mirror
//! is asked once (no retries: the next endpoint is the retry); the registry itself, last, gets
//! the usual retries with backoff. A mirror that cannot be reached is left alone for the rest
//! of the sync. Each endpoint has its own credentials (never the upstream's) and its own HTTP
//! client, kept across syncs in [`Clients`] so that connections and TLS sessions are reused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{Credentials, Registry, RegistryError};
use crate::config::{ProxySettings, Timeouts};
use crate::digest::Digest;

/// One place requests for the repository can go.
pub(crate) struct Endpoint {
    /// `host[:port]`, as logs, `/status` and `/metrics` name it.
    pub label: String,
    /// `scheme://host[:port]`.
    pub base: String,
    /// The repository's name there (a mirror may put a prefix before it).
    pub repository: String,
    pub http: reqwest::Client,
    pub credentials: Credentials,
    pub mirror: bool,
    /// Tags may be resolved here (always true for the registry itself).
    pub resolve: bool,
    /// Could not be reached during this sync: not asked again until the next one.
    pub down: AtomicBool,
}

impl Endpoint {
    pub(crate) fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.repository)
    }

    pub(crate) fn token_key(&self) -> String {
        format!("{}/{}", self.label, self.repository)
    }

    pub(crate) fn role(&self) -> &'static str {
        if self.mirror {
            "mirror"
        } else {
            "upstream"
        }
    }
}

/// What a request is for, which decides the endpoints that may answer it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Purpose<'a> {
    /// Tag -> digest: only mirrors with `resolve`, since the answer cannot be checked.
    Resolve,
    /// Something named by its digest (checked), or a signature tag (judged by the policy).
    Content(Option<&'a Digest>),
}

/// What to do after a mirror failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterMirror {
    /// Ask the next endpoint.
    Next,
    /// Ask the next endpoint, and not this mirror again in this sync (it cannot be reached).
    Avoid,
}

/// Pure: how a mirror's failure is taken. Anything a mirror answers other than success sends
/// the request on (a pull-through cache answers 404 for what it never cached and its upstream
/// cannot give, 5xx when its upstream is down, 401/403 when it wants other credentials); only
/// connection failures also mark it unreachable.
pub(crate) fn after_mirror(e: &RegistryError) -> AfterMirror {
    match e {
        RegistryError::Timeout { .. }
        | RegistryError::Network { .. }
        | RegistryError::Setup { .. } => AfterMirror::Avoid,
        RegistryError::Status { .. }
        | RegistryError::BadManifest { .. }
        | RegistryError::Blob { .. }
        | RegistryError::PlatformMissing { .. } => AfterMirror::Next,
    }
}

impl Registry {
    /// Whether endpoint `i` may be asked for `purpose` now.
    pub(crate) fn eligible(&self, i: usize, purpose: Purpose<'_>) -> bool {
        let ep = &self.endpoints[i];
        if !ep.mirror {
            return true;
        }
        if ep.down.load(Ordering::Relaxed) {
            return false;
        }
        match purpose {
            Purpose::Resolve => ep.resolve,
            Purpose::Content(Some(d)) => !self.is_distrusted(i, d),
            Purpose::Content(None) => true,
        }
    }

    /// Runs `op` on each eligible endpoint in turn until one succeeds: mirrors first, the
    /// registry itself last (its error is the one returned).
    // `op` takes the endpoint at the registry's own lifetime, not a higher-ranked one: an
    // `AsyncFn(&Endpoint)` future is not provably `Send` (rust-lang/rust#110338).
    pub(crate) async fn across<'s, T, F, Fut>(
        &'s self,
        purpose: Purpose<'_>,
        op: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(&'s Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let last = self.endpoints.len() - 1;
        for (i, ep) in self.endpoints.iter().enumerate() {
            if !self.eligible(i, purpose) {
                continue;
            }
            match op(ep).await {
                Ok(v) => {
                    self.endpoint_ok(ep);
                    return Ok(v);
                }
                Err(e) if i < last => self.mirror_failed(ep, &e),
                Err(e) => {
                    self.endpoint_failed(ep, &e);
                    return Err(e);
                }
            }
        }
        Err(RegistryError::Setup {
            host: self.host.clone(),
            reason: "no endpoint to ask".into(),
        })
    }

    pub(crate) fn endpoint_ok(&self, ep: &Endpoint) {
        if let Some(o) = &self.observer {
            o.endpoint(&ep.label, ep.role(), None);
        }
    }

    pub(crate) fn endpoint_failed(&self, ep: &Endpoint, e: &RegistryError) {
        if let Some(o) = &self.observer {
            o.endpoint(&ep.label, ep.role(), Some(&e.to_string()));
        }
    }

    /// Logs and records a mirror's failure; marks it unreachable when it is.
    pub(crate) fn mirror_failed(&self, ep: &Endpoint, e: &RegistryError) {
        let avoid = after_mirror(e) == AfterMirror::Avoid;
        if avoid {
            ep.down.store(true, Ordering::Relaxed);
        }
        tracing::warn!(
            mirror = %ep.label,
            registry = %self.host,
            "{e}; {}",
            if avoid {
                "not asking this mirror again in this sync"
            } else {
                "asking the next one"
            }
        );
        self.endpoint_failed(ep, e);
    }

    fn is_distrusted(&self, i: usize, digest: &Digest) -> bool {
        self.distrusted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(i, digest.clone()))
    }

    /// Endpoint `i` sent bytes of blob `digest`.
    pub(crate) fn served(&self, i: usize, digest: &Digest) {
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        let list = served.entry(digest.clone()).or_default();
        if !list.contains(&i) {
            list.push(i);
        }
    }

    /// A blob failed its digest or size. When mirrors sent any of its bytes, they are skipped
    /// for it from now on and their names returned (the caller reads it again); an empty list
    /// means the registry itself sent it all, and the failure stands.
    pub fn distrust(&self, digest: &Digest) -> Vec<String> {
        let sent = self
            .served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest)
            .unwrap_or_default();
        let mut distrusted = self.distrusted.lock().unwrap_or_else(|e| e.into_inner());
        let mut names = Vec::new();
        for i in sent {
            if self.endpoints[i].mirror {
                distrusted.insert((i, digest.clone()));
                names.push(self.endpoints[i].label.clone());
            }
        }
        names
    }
}

/// How to build an endpoint's HTTP client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ClientSpec {
    pub ca_file: Option<PathBuf>,
    pub skip_verify: bool,
    pub proxy: Option<ProxySettings>,
    pub timeouts: Timeouts,
}

/// HTTP clients by what they were built from, shared by every sync of the process, so each
/// registry and mirror keeps its connection pool and TLS sessions across polls. Files the
/// spec names (CA bundle, proxy credentials) are read again at each sync; a change builds a
/// new client.
#[derive(Clone, Default)]
pub struct Clients(Arc<Mutex<HashMap<(ClientSpec, Digest), reqwest::Client>>>);

impl Clients {
    pub(crate) fn get(
        &self,
        host: &str,
        spec: &ClientSpec,
    ) -> Result<reqwest::Client, RegistryError> {
        let timeouts = &spec.timeouts;
        let setup = |reason: String| RegistryError::Setup {
            host: host.to_string(),
            reason,
        };
        let ca = match &spec.ca_file {
            Some(ca) => Some(
                std::fs::read(ca).map_err(|e| setup(format!("ca_file {}: {e}", ca.display())))?,
            ),
            None => None,
        };
        let proxy_credentials = match spec
            .proxy
            .as_ref()
            .and_then(|p| p.credentials_file.as_ref())
        {
            Some(file) => Some(read_proxy_credentials(file).map_err(setup)?),
            None => None,
        };
        // What the files said is part of the key (hashed: the map holds no secret).
        let mut seen = Vec::new();
        seen.extend(ca.iter().flatten());
        seen.push(0);
        if let Some((u, p)) = &proxy_credentials {
            seen.extend(u.as_bytes());
            seen.push(0);
            seen.extend(p.as_bytes());
        }
        let key = (spec.clone(), Digest::of(&seen));
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("bootsync/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(timeouts.connect)
            // A per-read limit: a stalled body fails instead of hanging.
            .read_timeout(timeouts.stall);
        if let Some(pem) = &ca {
            let what = spec.ca_file.as_ref().map(|p| p.display().to_string());
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| setup(format!("ca_file {}: {e}", what.unwrap_or_default())))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        if spec.skip_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        if let Some(p) = &spec.proxy {
            // An explicit proxy turns the environment's off for this client: keep NO_PROXY.
            let mut proxy = reqwest::Proxy::all(&p.url)
                .map_err(|e| setup(format!("proxy: {}", crate::text::error_chain(&e))))?
                .no_proxy(reqwest::NoProxy::from_env());
            if let Some((user, password)) = &proxy_credentials {
                proxy = proxy.basic_auth(user, password);
            }
            builder = builder.proxy(proxy);
        }
        let client = builder.build().map_err(|e| setup(e.to_string()))?;
        // Old clients of this host (a rotated file) are dropped with their connections.
        map.retain(|(s, _), _| s != spec);
        map.insert(key, client.clone());
        Ok(client)
    }
}

/// `user:password` from a proxy credentials file; the error never quotes it.
fn read_proxy_credentials(file: &std::path::Path) -> Result<(String, String), String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("proxy_credentials_file {}: {e}", file.display()))?;
    let line = text.trim_end_matches(['\r', '\n']);
    line.split_once(':')
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .ok_or_else(|| {
            format!(
                "proxy_credentials_file {}: not user:password",
                file.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn mirror_failures_send_the_request_on_and_only_connection_failures_avoid() {
        let status = |s: u16| RegistryError::Status {
            what: "x".into(),
            status: s,
            detail: String::new(),
            retry_after: None,
        };
        let table = [
            (
                RegistryError::Timeout {
                    what: "x".into(),
                    after: Duration::from_secs(1),
                },
                AfterMirror::Avoid,
            ),
            (
                RegistryError::Network {
                    what: "x".into(),
                    reason: "connection refused".into(),
                },
                AfterMirror::Avoid,
            ),
            (status(404), AfterMirror::Next),
            (status(500), AfterMirror::Next),
            (status(503), AfterMirror::Next),
            (status(429), AfterMirror::Next),
            (status(401), AfterMirror::Next),
            (status(403), AfterMirror::Next),
            (
                RegistryError::BadManifest {
                    what: "x".into(),
                    reason: "digest mismatch".into(),
                },
                AfterMirror::Next,
            ),
        ];
        for (e, want) in table {
            assert_eq!(after_mirror(&e), want, "{e}");
        }
    }

    #[test]
    fn proxy_credentials_are_read_and_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("proxy");
        std::fs::write(&f, "robot:hunter2\n").unwrap();
        assert_eq!(
            read_proxy_credentials(&f).unwrap(),
            ("robot".into(), "hunter2".into())
        );
        std::fs::write(&f, "hunter2").unwrap();
        let e = read_proxy_credentials(&f).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
