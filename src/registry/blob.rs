//! Blob downloads that resume: a connection that breaks or stalls part way is resumed with a
//! `Range` request from the byte reached, asking the registry URL again (an expired storage
//! redirect is renewed), so nothing is fetched twice. Mirrors are asked first; a mirror that
//! fails is left for the next endpoint, which resumes from the byte reached (the bytes of a
//! digest are the same wherever they come from, and the whole is hashed).

use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::client::{content_range_start, Req};
use super::endpoint::{Endpoint, Purpose};
use super::{Descriptor, Registry, RegistryError};

/// How often a broken blob download is resumed before giving up.
const BLOB_ATTEMPTS: u32 = 5;

enum AttemptEnd {
    Done,
    ConsumerGone,
}

impl Registry {
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
            o.blob_started(desc.digest.as_str(), desc.size);
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
        // Mirrors that failed this blob: the next endpoint takes over.
        let mut passed = vec![false; self.endpoints.len()];
        let upstream = self.endpoints.len() - 1;
        loop {
            let i = (0..upstream)
                .find(|&i| !passed[i] && self.eligible(i, Purpose::Content(Some(&desc.digest))))
                .unwrap_or(upstream);
            let ep = &self.endpoints[i];
            match self.blob_attempt(ep, i, desc, offset, tx, hasher).await {
                Ok(AttemptEnd::Done) | Ok(AttemptEnd::ConsumerGone) => {
                    self.endpoint_ok(ep);
                    return Ok(());
                }
                // A mirror is asked once; the next endpoint resumes from the byte reached.
                Err((reached, e)) if ep.mirror => {
                    offset = reached;
                    passed[i] = true;
                    self.mirror_failed(ep, &e);
                }
                Err((reached, e)) => {
                    attempt += 1;
                    // Progress earns a fresh set of attempts (counting the one that made it); a
                    // blob that never moves does not.
                    if reached > offset {
                        attempt = 1;
                    }
                    offset = reached;
                    if attempt >= BLOB_ATTEMPTS || !e.is_transient() {
                        self.endpoint_failed(ep, &e);
                        return Err(fail(format!(
                            "at byte {offset} of {} from {} (attempt {attempt}): {e}",
                            desc.size, ep.label
                        )));
                    }
                    let backoff = e.retry_after().unwrap_or_else(|| {
                        crate::backoff::jitter(Duration::from_millis(500 << (attempt - 1).min(5)))
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
        ep: &Endpoint,
        index: usize,
        desc: &Descriptor,
        mut offset: u64,
        tx: &mpsc::Sender<std::io::Result<Bytes>>,
        hasher: &mut Sha256,
    ) -> Result<AttemptEnd, (u64, RegistryError)> {
        let start = offset;
        let what = format!("blob {} from {}", desc.digest, ep.label);
        let req = Req {
            kind: "blob",
            method: Method::GET,
            tail: format!("blobs/{}", desc.digest),
            accept: None,
            range_from: offset,
        };
        let mut response = self.send(ep, &req, &what).await.map_err(|e| (offset, e))?;
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
                Ok(Err(e)) => return Err((offset, network(crate::text::error_chain(&e)))),
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
            if offset == start {
                self.served(index, &desc.digest);
            }
            offset += chunk.len() as u64;
            if let Some(o) = &self.observer {
                o.bytes(&ep.label, chunk.len() as u64);
            }
            hasher.update(&chunk);
            if tx.send(Ok(chunk)).await.is_err() {
                return Ok(AttemptEnd::ConsumerGone);
            }
        }
    }
}
