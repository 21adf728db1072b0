//! One request to the registry: its timeout, retries of transient failures with backoff (or a
//! short `Retry-After`), one 401 answered with a token or Basic credentials, bodies read under a
//! cap, and errors that carry the status, a short detail and any `Retry-After`.

use std::time::Duration;

use reqwest::header::{HeaderMap, ACCEPT, CONTENT_RANGE, RANGE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::auth::{parse_challenge, Challenge};
use super::endpoint::Endpoint;
use super::{Credentials, Registry, RegistryError};

/// Attempts of one request on a transient failure (network error, 5xx, 429).
const REQUEST_ATTEMPTS: u32 = 3;
/// A `Retry-After` longer than this is not waited out inside a sync: the error goes up to the
/// scheduler, which waits it out between syncs.
const MAX_INLINE_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Token responses larger than this are refused.
const MAX_TOKEN_BYTES: usize = 64 << 10;
/// Of an error response, this much is read for the message; the rest is left unread.
const MAX_ERROR_BODY: usize = 4096;

/// The options of one request.
pub(crate) struct Req<'a> {
    pub kind: &'static str,
    pub method: Method,
    /// What follows `/v2/<repository>/` (`manifests/<ref>`, `blobs/<digest>`, ...).
    pub tail: String,
    pub accept: Option<&'a str>,
    pub range_from: u64,
}

impl Registry {
    /// The token dance: `GET realm?service=..&scope=repository:REPO:pull`, with Basic
    /// credentials when we have them.
    pub(crate) async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        what: &str,
    ) -> Result<String, RegistryError> {
        let what = format!("{what}: token from {realm}");
        let scope = format!("repository:{}:pull", ep.repository);
        let mut query = vec![("scope", scope.as_str())];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut builder = ep.http.get(realm).query(&query);
        if let Some((username, password)) = ep.credentials.basic().await? {
            builder = builder.basic_auth(username, Some(password));
        }
        let response = match tokio::time::timeout(self.timeouts.request, builder.send()).await {
            Err(_) => {
                self.observe(ep, "token", 0);
                return Err(RegistryError::Timeout {
                    what,
                    after: self.timeouts.request,
                });
            }
            Ok(Err(e)) => {
                self.observe(ep, "token", 0);
                return Err(RegistryError::Network {
                    what,
                    reason: crate::text::error_chain(&e),
                });
            }
            Ok(Ok(r)) => r,
        };
        self.observe(ep, "token", response.status().as_u16());
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
    /// Sends a request to `ep`, answering one 401 with a fresh token or Basic credentials. The
    /// registry itself gets retries of transient failures with backoff (honouring a short
    /// `Retry-After`); a mirror is asked once, since the next endpoint is its retry.
    pub(crate) async fn send(
        &self,
        ep: &Endpoint,
        req: &Req<'_>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        if ep.mirror {
            return self.send_authenticated(ep, req, what).await;
        }
        self.retrying(|| self.send_authenticated(ep, req, what))
            .await
    }

    /// Sends a request once (a 401 still gets its token): for a probe whose failure has a
    /// fallback, such as the referrers API.
    pub(crate) async fn send_no_retry(
        &self,
        ep: &Endpoint,
        req: &Req<'_>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        self.send_authenticated(ep, req, what).await
    }

    /// Sends a request and reads its whole (small, capped) body, retrying both (on the
    /// registry itself): a connection that breaks inside a manifest is as transient as one
    /// that breaks before it.
    pub(crate) async fn fetch_small(
        &self,
        ep: &Endpoint,
        req: &Req<'_>,
        what: &str,
        limit: usize,
    ) -> Result<Vec<u8>, RegistryError> {
        let once = || async {
            let response = self.send_authenticated(ep, req, what).await?;
            self.read_body(response, limit, what).await
        };
        if ep.mirror {
            return once().await;
        }
        self.retrying(once).await
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
                        None => crate::backoff::jitter(Duration::from_secs(1 << (attempt - 1))),
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
        ep: &Endpoint,
        req: &Req<'_>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut basic: Option<(String, String)> = None;
        let mut refreshed = false;
        let mut renewed = false;
        loop {
            let response = self.send_once(ep, req, what, basic.as_ref()).await?;
            let status = response.status();
            // Credentials a helper gave and the registry now rejects (ECR answers an expired
            // token with 403, others with 401) are asked for again, once.
            let rejected = status == StatusCode::FORBIDDEN
                || (status == StatusCode::UNAUTHORIZED && refreshed);
            if rejected
                && ep.credentials.renewable()
                && !renewed
                && self.used_credentials(ep, &basic)
            {
                tracing::info!(host = %ep.label, %status, "the registry rejected the credential helper's answer; asking it again");
                renewed = true;
                refreshed = false;
                basic = None;
                ep.credentials.forget();
                self.tokens.forget(&ep.token_key());
                continue;
            }
            if status != StatusCode::UNAUTHORIZED || refreshed {
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
                    let token = match self.fetch_token(ep, &realm, service.as_deref(), what).await {
                        Err(RegistryError::Status {
                            status: 401 | 403, ..
                        }) if ep.credentials.renewable() && !renewed => {
                            tracing::info!(host = %ep.label, "the token service rejected the credential helper's answer; asking it again");
                            renewed = true;
                            ep.credentials.forget();
                            self.fetch_token(ep, &realm, service.as_deref(), what)
                                .await?
                        }
                        other => other?,
                    };
                    self.tokens.put(&ep.token_key(), token);
                }
                Some(Challenge::Basic) => match ep.credentials.basic().await? {
                    Some(c) => basic = Some(c),
                    None => return check_status(response, what).await,
                },
                _ => return check_status(response, what).await,
            }
        }
    }

    /// Whether the last request carried credentials (Basic, or a token they obtained).
    fn used_credentials(&self, ep: &Endpoint, basic: &Option<(String, String)>) -> bool {
        basic.is_some() || self.tokens.get(&ep.token_key()).is_some()
    }

    async fn send_once(
        &self,
        ep: &Endpoint,
        req: &Req<'_>,
        what: &str,
        basic: Option<&(String, String)>,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = ep.url(&req.tail);
        let mut builder = ep.http.request(req.method.clone(), &url);
        if let Some(accept) = req.accept {
            builder = builder.header(ACCEPT, accept);
        }
        if req.range_from > 0 {
            builder = builder.header(RANGE, format!("bytes={}-", req.range_from));
        }
        builder = match (&ep.credentials, self.tokens.get(&ep.token_key()), basic) {
            (Credentials::Bearer(token), _, _) => builder.bearer_auth(token),
            (_, Some(token), _) => builder.bearer_auth(token),
            (_, None, Some((username, password))) => builder.basic_auth(username, Some(password)),
            _ => builder,
        };
        match tokio::time::timeout(self.timeouts.request, builder.send()).await {
            Err(_) => {
                self.observe(ep, req.kind, 0);
                Err(RegistryError::Timeout {
                    what: what.to_string(),
                    after: self.timeouts.request,
                })
            }
            Ok(Err(e)) => {
                self.observe(ep, req.kind, 0);
                Err(RegistryError::Network {
                    what: what.to_string(),
                    reason: crate::text::error_chain(&e),
                })
            }
            Ok(Ok(r)) => {
                self.observe(ep, req.kind, r.status().as_u16());
                Ok(r)
            }
        }
    }

    /// Reads a whole (small) body within the request timeout, refusing more than `limit` bytes.
    pub(crate) async fn read_body(
        &self,
        mut response: reqwest::Response,
        limit: usize,
        what: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let read = async {
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| RegistryError::Network {
                what: what.to_string(),
                reason: crate::text::error_chain(&e),
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
}

/// Turns a non-success response into an error carrying its status, a short detail from the body
/// and any `Retry-After`.
pub(crate) async fn check_status(
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
    // The body is only for the message: read a little, briefly, and never more than a cap (a
    // hostile server may send an endless one).
    let mut response = response;
    let body = tokio::time::timeout(Duration::from_secs(2), async {
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        body
    })
    .await
    .unwrap_or_default();
    let mut detail = String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_string();
    if detail.is_empty() && status == StatusCode::NOT_FOUND {
        detail = "not found".into();
    }
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        // The proxy's page says nothing useful; say what to fix.
        detail = "the proxy wants credentials: check the registry's proxy_credentials_file".into();
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

pub(crate) fn content_range_start(headers: &HeaderMap) -> Option<u64> {
    // "bytes START-END/TOTAL"
    let v = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    v.strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_is_read() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_RANGE, "bytes 100-199/200".parse().unwrap());
        assert_eq!(content_range_start(&h), Some(100));
    }
}
