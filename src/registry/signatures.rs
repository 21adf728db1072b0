//! Finding the signatures of a digest, in the order cosign writes them:
//!
//! 1. cosign v3 bundles attached as OCI 1.1 referrers: the referrers API
//!    (`/v2/<repo>/referrers/<digest>`), and when a registry has none (a plain 404, as CNCF
//!    distribution answers) or answers it with a redirect, a 429 or an error (as GHCR has), the
//!    referrers tag schema (`sha256-<hex>`, an index of the referrers);
//! 2. cosign v2 signatures at the tag `sha256-<hex>.sig` (fetched with the OCI manifest type in
//!    `Accept`: distribution answers 404 MANIFEST_UNKNOWN without it).
//!
//! "Not found" on one path is not "unsigned": every path is tried, and what each answered goes
//! into the error when nothing is found. Bounded: each document and blob is size-capped and
//! checked against its digest, at most `MAX_CANDIDATES` candidates are fetched. What the
//! material proves is `signature`'s business, not this module's.

use std::collections::BTreeMap;

use oci_spec::image::{ImageIndex, ImageManifest as OciManifest};
use reqwest::Method;

use super::client::Req;
use super::endpoint::Purpose;
use super::manifest::{DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use super::{Registry, RegistryError, MAX_MANIFEST_BYTES};
use crate::digest::Digest;
use crate::signature::{
    Material, BUNDLE_MEDIA_TYPE, MAX_BUNDLE_BYTES, MAX_CANDIDATES, MAX_PAYLOAD_BYTES,
    SIMPLE_SIGNING,
};

/// Referrers whose artifact type starts with this are Sigstore bundles (v0.1 to v0.3).
const BUNDLE_ARTIFACT_PREFIX: &str = "application/vnd.dev.sigstore.bundle";

/// What discovery found, and where it looked.
#[derive(Debug, Default)]
pub struct Found {
    pub material: Vec<Material>,
    /// One line per place looked at: what it answered.
    pub searched: Vec<String>,
}

/// A blob to fetch: its digest and size as a manifest gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
}

/// The Sigstore bundle referrers an index lists (the referrers API answer or the tag schema's
/// index): their manifest digests, at most `MAX_CANDIDATES`.
pub fn bundle_referrers(body: &[u8]) -> Result<Vec<Digest>, String> {
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(format!("an index of {} bytes is too large", body.len()));
    }
    let index: ImageIndex =
        serde_json::from_slice(body).map_err(|e| format!("not an OCI index: {e}"))?;
    let mut out = Vec::new();
    for m in index.manifests() {
        let bundle = m
            .artifact_type()
            .as_ref()
            .is_some_and(|t| t.to_string().starts_with(BUNDLE_ARTIFACT_PREFIX));
        if !bundle {
            continue;
        }
        let digest: Digest = m
            .digest()
            .to_string()
            .parse()
            .map_err(|e| format!("a referrer's digest: {e}"))?;
        if out.len() < MAX_CANDIDATES && !out.contains(&digest) {
            out.push(digest);
        }
    }
    Ok(out)
}

/// The bundle layer of a referrer manifest, which must name `subject` as its subject.
pub fn bundle_layer(body: &[u8], subject: &Digest) -> Result<Blob, String> {
    let m: OciManifest =
        serde_json::from_slice(body).map_err(|e| format!("not an OCI manifest: {e}"))?;
    let about = m.subject().as_ref().map(|s| s.digest().to_string());
    if about.as_deref() != Some(subject.as_str()) {
        return Err(format!(
            "its subject is {}, not {subject}",
            about.as_deref().unwrap_or("(none)")
        ));
    }
    let layer = m
        .layers()
        .iter()
        .find(|l| {
            l.media_type()
                .to_string()
                .starts_with(BUNDLE_ARTIFACT_PREFIX)
        })
        .ok_or("it holds no bundle layer")?;
    blob_of(layer, MAX_BUNDLE_BYTES)
}

/// The simple-signing layers of a cosign v2 `.sig` manifest, at most `MAX_CANDIDATES`.
pub fn signature_layers(body: &[u8]) -> Result<Vec<Blob>, String> {
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(format!("a manifest of {} bytes is too large", body.len()));
    }
    let m: OciManifest =
        serde_json::from_slice(body).map_err(|e| format!("not an image manifest: {e}"))?;
    m.layers()
        .iter()
        .filter(|l| l.media_type().to_string() == SIMPLE_SIGNING)
        .take(MAX_CANDIDATES)
        .map(|l| blob_of(l, MAX_PAYLOAD_BYTES))
        .collect()
}

fn blob_of(d: &oci_spec::image::Descriptor, cap: usize) -> Result<Blob, String> {
    let digest: Digest = d
        .digest()
        .to_string()
        .parse()
        .map_err(|e| format!("a layer's digest: {e}"))?;
    if d.size() > cap as u64 {
        return Err(format!(
            "layer {digest} is {} bytes, more than the {cap} allowed",
            d.size()
        ));
    }
    Ok(Blob {
        digest,
        size: d.size(),
        annotations: d
            .annotations()
            .clone()
            .map(|a| a.into_iter().collect())
            .unwrap_or_default(),
    })
}

/// How one discovery request ended.
enum Answer {
    Body(Vec<u8>),
    /// Not there (404): this path has nothing.
    Absent,
    /// The path cannot be used (a redirect, a 429, an error, a body that is not an index).
    Unusable(String),
}

impl Registry {
    /// Finds the signature material of `digest` on every discovery path.
    pub async fn signatures(&self, digest: &Digest) -> Result<Found, RegistryError> {
        let mut found = Found::default();
        let tag = format!("sha256-{}", digest.hex());

        // 1. cosign v3 bundles: the referrers API, else the referrers tag schema.
        let api = format!(
            "referrers/{digest}?artifactType={}",
            BUNDLE_MEDIA_TYPE.replace('+', "%2B")
        );
        let mut referrers = None;
        match self.discover("referrers", &api, OCI_INDEX, false).await? {
            Answer::Body(b) => match bundle_referrers(&b) {
                Ok(list) => {
                    found
                        .searched
                        .push(format!("referrers API: {} bundle(s)", list.len()));
                    referrers = Some((list, "referrers API"));
                }
                Err(e) => found
                    .searched
                    .push(format!("referrers API: unusable ({e})")),
            },
            Answer::Absent => found
                .searched
                .push("referrers API: 404 (the registry has none)".into()),
            Answer::Unusable(why) => found.searched.push(format!("referrers API: {why}")),
        }
        if referrers.is_none() {
            let path = format!("manifests/{tag}");
            match self.discover("referrers", &path, OCI_INDEX, true).await? {
                Answer::Body(b) => match bundle_referrers(&b) {
                    Ok(list) => {
                        found
                            .searched
                            .push(format!("tag {tag}: {} bundle(s)", list.len()));
                        referrers = Some((list, "referrers tag"));
                    }
                    Err(e) => found.searched.push(format!("tag {tag}: {e}")),
                },
                Answer::Absent => found.searched.push(format!("tag {tag}: none")),
                Answer::Unusable(why) => found.searched.push(format!("tag {tag}: {why}")),
            }
        }
        for referrer in referrers.map(|(l, _)| l).unwrap_or_default() {
            let source = format!("referrer {referrer}");
            let body = match self.signature_document(&referrer, OCI_MANIFEST).await {
                Ok(b) => b,
                Err(e) => {
                    found.searched.push(format!("{source}: {e}"));
                    continue;
                }
            };
            let layer = match bundle_layer(&body, digest) {
                Ok(l) => l,
                Err(e) => {
                    found.searched.push(format!("{source}: {e}"));
                    continue;
                }
            };
            match self.signature_blob(&layer, MAX_BUNDLE_BYTES).await {
                Ok(bytes) => found.material.push(Material::Bundle { bytes, source }),
                Err(e) => found.searched.push(format!("{source}: {e}")),
            }
        }

        // 2. cosign v2 signatures.
        let sig_tag = format!("{tag}.sig");
        let accept = format!("{OCI_MANIFEST}, {DOCKER_MANIFEST}");
        let path = format!("manifests/{sig_tag}");
        match self.discover("signature", &path, &accept, true).await? {
            Answer::Body(b) => match signature_layers(&b) {
                Ok(layers) => {
                    found
                        .searched
                        .push(format!("tag {sig_tag}: {} signature(s)", layers.len()));
                    for (i, layer) in layers.iter().enumerate() {
                        let source = format!("tag {sig_tag} layer {i}");
                        match self.signature_blob(layer, MAX_PAYLOAD_BYTES).await {
                            Ok(payload) => found.material.push(Material::SimpleSigning {
                                payload,
                                annotations: layer.annotations.clone(),
                                source,
                            }),
                            Err(e) => found.searched.push(format!("{source}: {e}")),
                        }
                    }
                }
                Err(e) => found.searched.push(format!("tag {sig_tag}: {e}")),
            },
            Answer::Absent => found.searched.push(format!("tag {sig_tag}: none")),
            Answer::Unusable(why) => found.searched.push(format!("tag {sig_tag}: {why}")),
        }
        found.material.truncate(MAX_CANDIDATES);
        Ok(found)
    }

    /// One discovery GET (`tail` follows `/v2/<repository>/`), mirrors first. The referrers
    /// API is asked once, without retries or redirects (either means "use the tag schema");
    /// tags are asked with the usual retries.
    async fn discover(
        &self,
        kind: &'static str,
        tail: &str,
        accept: &str,
        retry: bool,
    ) -> Result<Answer, RegistryError> {
        let answer = self
            .across(Purpose::Content(None), |ep| async move {
                let what = format!("{}/v2/{}/{tail}", ep.label, ep.repository);
                let req = Req {
                    kind,
                    method: Method::GET,
                    tail: tail.to_string(),
                    accept: Some(accept),
                    range_from: 0,
                };
                let response = if retry {
                    self.send(ep, &req, &what).await?
                } else {
                    self.send_no_retry(ep, &req, &what).await?
                };
                let asked = format!(
                    "/v2/{}/{}",
                    ep.repository,
                    tail.split('?').next().unwrap_or(tail)
                );
                if response.url().path() != asked {
                    return Err(RegistryError::BadManifest {
                        what,
                        reason: format!(
                            "redirected to {}",
                            response.url().host_str().unwrap_or("another host")
                        ),
                    });
                }
                self.read_body(response, MAX_MANIFEST_BYTES, &what).await
            })
            .await;
        match answer {
            Ok(b) => Ok(Answer::Body(b)),
            Err(RegistryError::Status { status: 404, .. }) => Ok(Answer::Absent),
            Err(e @ RegistryError::BadManifest { .. }) => Ok(Answer::Unusable(e.to_string())),
            Err(
                e @ (RegistryError::Status { .. }
                | RegistryError::Timeout { .. }
                | RegistryError::Network { .. }),
            ) if !retry => Ok(Answer::Unusable(e.to_string())),
            Err(e) => Err(e),
        }
    }

    /// A referrer or signature manifest by digest, checked against it.
    async fn signature_document(
        &self,
        digest: &Digest,
        accept: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        self.across(Purpose::Content(Some(digest)), |ep| async move {
            let what = format!("manifest {digest} of {}/{}", ep.label, ep.repository);
            let req = Req {
                kind: "signature",
                method: Method::GET,
                tail: format!("manifests/{digest}"),
                accept: Some(accept),
                range_from: 0,
            };
            let body = self
                .fetch_small(ep, &req, &what, MAX_MANIFEST_BYTES)
                .await?;
            check_digest(&body, digest, &what)?;
            Ok(body)
        })
        .await
    }

    /// A small signature blob (a bundle, a payload), size-capped and checked against its digest.
    async fn signature_blob(&self, blob: &Blob, cap: usize) -> Result<Vec<u8>, RegistryError> {
        self.across(Purpose::Content(Some(&blob.digest)), |ep| async move {
            let what = format!("blob {} of {}/{}", blob.digest, ep.label, ep.repository);
            let req = Req {
                kind: "signature",
                method: Method::GET,
                tail: format!("blobs/{}", blob.digest),
                accept: None,
                range_from: 0,
            };
            let body = self.fetch_small(ep, &req, &what, cap).await?;
            check_digest(&body, &blob.digest, &what)?;
            Ok(body)
        })
        .await
    }
}

fn check_digest(body: &[u8], digest: &Digest, what: &str) -> Result<(), RegistryError> {
    let actual = Digest::of(body);
    if &actual == digest {
        return Ok(());
    }
    Err(RegistryError::BadManifest {
        what: what.to_string(),
        reason: format!("digest mismatch: content hashes to {actual}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    #[test]
    fn referrer_indexes_list_bundles_only_and_at_most_n() {
        let entry = |t: &str, digest: &Digest| {
            serde_json::json!({
                "mediaType": OCI_MANIFEST, "digest": digest.as_str(), "size": 100,
                "artifactType": t,
            })
        };
        let mut manifests = vec![
            entry("application/vnd.dev.sigstore.bundle.v0.3+json", &d("a")),
            entry("application/spdx+json", &d("sbom")),
            entry(
                "application/vnd.dev.sigstore.bundle+json;version=0.2",
                &d("b"),
            ),
        ];
        for i in 0..40 {
            manifests.push(entry(BUNDLE_MEDIA_TYPE, &d(&i.to_string())));
        }
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests,
        });
        let got = bundle_referrers(&serde_json::to_vec(&index).unwrap()).unwrap();
        assert_eq!(got.len(), MAX_CANDIDATES);
        assert_eq!(got[..2], [d("a"), d("b")]);
        assert!(!got.contains(&d("sbom")));
        assert!(bundle_referrers(b"<html>rate limited</html>").is_err());
        let md5 = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": "md5:abc", "size": 1, "artifactType": BUNDLE_MEDIA_TYPE}
        ]});
        assert!(bundle_referrers(&serde_json::to_vec(&md5).unwrap()).is_err());
    }

    #[test]
    fn a_referrer_must_be_about_the_digest_and_hold_a_small_bundle() {
        let subject = d("image");
        let manifest = |about: &Digest, size: u64| {
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": BUNDLE_MEDIA_TYPE,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                           "digest": d("{}").as_str(), "size": 2},
                "layers": [{"mediaType": BUNDLE_MEDIA_TYPE, "digest": d("bundle").as_str(), "size": size}],
                "subject": {"mediaType": OCI_MANIFEST, "digest": about.as_str(), "size": 10},
            }))
            .unwrap()
        };
        let layer = bundle_layer(&manifest(&subject, 3000), &subject).unwrap();
        assert_eq!((layer.digest, layer.size), (d("bundle"), 3000));
        let e = bundle_layer(&manifest(&d("other"), 3000), &subject).unwrap_err();
        assert!(e.contains("subject"), "{e}");
        let e = bundle_layer(&manifest(&subject, 1 << 30), &subject).unwrap_err();
        assert!(e.contains("allowed"), "{e}");
    }

    #[test]
    fn sig_manifests_give_their_simple_signing_layers_with_annotations() {
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": d("cfg").as_str(), "size": 3},
            "layers": [
                {"mediaType": SIMPLE_SIGNING, "digest": d("p1").as_str(), "size": 250,
                 "annotations": {"dev.cosignproject.cosign/signature": "MEUC"}},
                {"mediaType": "application/octet-stream", "digest": d("x").as_str(), "size": 1},
            ],
        });
        let layers = signature_layers(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(
            layers[0]
                .annotations
                .get("dev.cosignproject.cosign/signature")
                .map(String::as_str),
            Some("MEUC")
        );
        assert!(signature_layers(b"{}").is_err());
    }
}
