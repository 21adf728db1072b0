//! Boot only what the publisher signed: cosign signatures of the digest a tag resolved to,
//! verified offline against the operator's policy (keys, keyless identities, Sigstore's
//! `trusted_root.json`), before a byte of a layer is downloaded.
//!
//! - cosign v3 bundles (Sigstore bundle v0.3, attached as OCI 1.1 referrers): verified by
//!   `sigstore-verify` (Fulcio chain at the signing time, SCT, Rekor entry, timestamps, the
//!   signature over the digest or the in-toto statement naming it);
//! - cosign v2 signatures (`sha256-<hex>.sig`: simple-signing payloads with their signature,
//!   certificate, chain and Rekor bundle annotations): the payload must name the digest; a key
//!   signature is checked with the key, a keyless one is turned into the bundle it is
//!   equivalent to and verified the same way.
//!
//! The registry finds the material (`registry::signatures`); this module judges it.

mod cosign;
mod provider;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sigstore_verify::trust_root::TrustedRoot;
use sigstore_verify::types::{
    Artifact, ArtifactDigest, Bundle, DerPublicKey, Sha256Hash, SignatureContent, Statement,
};
use sigstore_verify::{PublicKeyVerificationPolicy, VerificationPolicy, Verifier};

use crate::digest::Digest;

/// Media type of a Sigstore bundle referrer (cosign v3).
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// Media type of a cosign v2 signature layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// A bundle larger than this is refused (real ones are a few KiB).
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;
/// A simple-signing payload larger than this is refused.
pub const MAX_PAYLOAD_BYTES: usize = 64 << 10;
/// Signature candidates looked at per digest, at most.
pub const MAX_CANDIDATES: usize = 16;

/// Signature material found for a digest, as the registry served it.
#[derive(Debug, Clone)]
pub enum Material {
    /// A Sigstore bundle (cosign v3).
    Bundle { bytes: Vec<u8>, source: String },
    /// A cosign v2 signature layer.
    SimpleSigning {
        payload: Vec<u8>,
        annotations: BTreeMap<String, String>,
        source: String,
    },
}

impl Material {
    fn source(&self) -> &str {
        match self {
            Material::Bundle { source, .. } | Material::SimpleSigning { source, .. } => source,
        }
    }
}

/// Who signed a verified image, as recorded in `.bootsync.json`, `/status` and the hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signer {
    /// `key` or `keyless`.
    pub kind: String,
    /// For a key: `sha256:` of its DER public key, and the file it was configured from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// For keyless: the OIDC issuer and the certificate's subject (SAN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// What carried the signature (`cosign v3 bundle`, `cosign v2 signature`) and where it was.
    pub format: String,
    pub source: String,
}

impl fmt::Display for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.key, &self.issuer, &self.subject) {
            (Some(key), _, _) => write!(
                f,
                "key {key} ({})",
                self.key_file.as_deref().unwrap_or("configured")
            ),
            (None, Some(i), Some(s)) => write!(f, "{s} (issuer {i})"),
            _ => f.write_str(&self.kind),
        }
    }
}

/// Why an image is refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignatureError {
    #[error("{digest} is not signed: no signature found ({})", searched.join("; "))]
    Unsigned {
        digest: Digest,
        searched: Vec<String>,
    },
    #[error("{digest} is not signed as the policy requires: {}", reasons.join("; "))]
    Rejected {
        digest: Digest,
        reasons: Vec<String>,
    },
}

/// A public key trusted to sign.
struct Key {
    file: PathBuf,
    der: DerPublicKey,
    fingerprint: String,
}

impl Key {
    /// The signer this key makes of a signature found in `format` at `source`.
    fn signer(&self, format: &str, source: &str) -> Signer {
        Signer {
            kind: "key".into(),
            key: Some(self.fingerprint.clone()),
            key_file: Some(self.file.display().to_string()),
            issuer: None,
            subject: None,
            format: format.into(),
            source: source.into(),
        }
    }
}

/// How an identity's subject must look.
enum Subject {
    Exact(String),
    Regex(regex::Regex),
}

/// A keyless signer trusted to sign: an OIDC issuer and a certificate subject.
struct Identity {
    issuer: String,
    subject: Subject,
}

impl Identity {
    fn matches(&self, issuer: Option<&str>, subject: Option<&str>) -> bool {
        issuer == Some(self.issuer.as_str())
            && subject.is_some_and(|s| match &self.subject {
                Subject::Exact(want) => s == want,
                Subject::Regex(re) => re.is_match(s),
            })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subject {
            Subject::Exact(s) => write!(f, "issuer {} subject {s}", self.issuer),
            Subject::Regex(r) => write!(f, "issuer {} subject ~ {}", self.issuer, r.as_str()),
        }
    }
}

/// An identity as the config writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySpec {
    pub issuer: String,
    pub subject: Option<String>,
    pub subject_regexp: Option<String>,
}

/// What a target's images must be signed by: any one of the keys, or any one of the keyless
/// identities (with the trusted root their certificates chain to).
pub struct Policy {
    keys: Vec<Key>,
    identities: Vec<Identity>,
    trusted_root: Option<(PathBuf, TrustedRoot)>,
    /// The inputs, to tell two policies apart (a reload).
    fingerprint: String,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field(
                "keys",
                &self.keys.iter().map(|k| &k.file).collect::<Vec<_>>(),
            )
            .field("identities", &self.identities.len())
            .field("trusted_root", &self.trusted_root.as_ref().map(|(p, _)| p))
            .finish()
    }
}

impl PartialEq for Policy {
    fn eq(&self, other: &Policy) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl Eq for Policy {}

/// Why a policy cannot be loaded (the config names the key and the file).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

impl Policy {
    /// Reads the keys and the trusted root and compiles the identities.
    pub fn load(
        keys: &[PathBuf],
        identities: &[IdentitySpec],
        trusted_root: Option<&Path>,
    ) -> Result<Arc<Policy>, PolicyError> {
        let read = |what: &str, p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| PolicyError(format!("{what} {}: {e}", p.display())))
        };
        let mut pems = Vec::new();
        for file in keys {
            pems.push((file.clone(), read("key", file)?));
        }
        let root = match trusted_root {
            Some(p) => Some((p.to_path_buf(), read("trusted_root", p)?)),
            None => None,
        };
        Policy::from_texts(&pems, identities, root)
    }

    /// A policy from the texts of its files (`load` reads them; the fuzz target has them).
    pub fn from_texts(
        keys: &[(PathBuf, String)],
        identities: &[IdentitySpec],
        trusted_root: Option<(PathBuf, String)>,
    ) -> Result<Arc<Policy>, PolicyError> {
        provider::install();
        let err = |s: String| PolicyError(s);
        let mut fingerprint = String::new();
        let mut loaded = Vec::new();
        for (file, pem) in keys {
            let der = DerPublicKey::from_pem(pem).map_err(|e| {
                err(format!(
                    "key {}: not a PEM public key (cosign.pub): {e}",
                    file.display()
                ))
            })?;
            sigstore_verify::crypto::VerificationKey::from_spki(&der)
                .map_err(|e| err(format!("key {}: an unsupported key: {e}", file.display())))?;
            let fp = Digest::of(der.as_bytes()).to_string();
            fingerprint.push_str(&format!("key {fp}\n"));
            loaded.push(Key {
                file: file.clone(),
                der,
                fingerprint: fp,
            });
        }
        let mut ids = Vec::new();
        for (i, spec) in identities.iter().enumerate() {
            let subject = match (&spec.subject, &spec.subject_regexp) {
                (Some(s), None) => Subject::Exact(s.clone()),
                (None, Some(r)) => Subject::Regex(
                    regex::Regex::new(r)
                        .map_err(|e| err(format!("identities[{i}].subject_regexp: {e}")))?,
                ),
                _ => {
                    return Err(err(format!(
                        "identities[{i}]: set exactly one of `subject` and `subject_regexp`"
                    )))
                }
            };
            if spec.issuer.is_empty() {
                return Err(err(format!("identities[{i}].issuer: missing")));
            }
            fingerprint.push_str(&format!(
                "identity {} {:?} {:?}\n",
                spec.issuer, spec.subject, spec.subject_regexp
            ));
            ids.push(Identity {
                issuer: spec.issuer.clone(),
                subject,
            });
        }
        let root = match trusted_root {
            Some((p, text)) => {
                let root = TrustedRoot::from_json(&text).map_err(|e| {
                    err(format!(
                        "trusted_root {}: not a Sigstore trusted_root.json: {e}",
                        p.display()
                    ))
                })?;
                fingerprint.push_str(&format!("root {}\n", Digest::of(text.as_bytes())));
                Some((p, root))
            }
            None => None,
        };
        if !ids.is_empty() && root.is_none() {
            return Err(err(
                "identities need a trusted_root (Sigstore's trusted_root.json) to check certificates against".into(),
            ));
        }
        if ids.is_empty() && loaded.is_empty() {
            return Err(err(
                "set `keys`, or `identities` with a `trusted_root`".into()
            ));
        }
        Ok(Arc::new(Policy {
            keys: loaded,
            identities: ids,
            trusted_root: root,
            fingerprint,
        }))
    }

    /// The files the policy was read from (the daemon reloads when one changes).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.keys.iter().map(|k| k.file.clone()).collect();
        files.extend(self.trusted_root.as_ref().map(|(p, _)| p.clone()));
        files
    }

    /// Who must sign, in one line (for `/status`).
    pub fn describe(&self) -> String {
        let mut any: Vec<String> = self
            .keys
            .iter()
            .map(|k| format!("key {} ({})", k.fingerprint, k.file.display()))
            .collect();
        any.extend(self.identities.iter().map(ToString::to_string));
        format!("signed by one of: {}", any.join("; "))
    }

    /// Whether a signer recorded earlier (in a version's `.bootsync.json`) is still one this
    /// policy trusts: its key is still configured, or its identity still matches. Changing the
    /// trusted root does not void what was verified under the old one.
    pub fn accepts(&self, signer: &Signer) -> bool {
        match signer.kind.as_str() {
            "key" => self
                .keys
                .iter()
                .any(|k| Some(&k.fingerprint) == signer.key.as_ref()),
            "keyless" => self
                .identities
                .iter()
                .any(|i| i.matches(signer.issuer.as_deref(), signer.subject.as_deref())),
            _ => false,
        }
    }

    /// A verifier over the trusted root, or over an empty one (keys without a root: their
    /// signatures are trusted by the key alone).
    fn verifier(&self) -> Result<Verifier, String> {
        let empty;
        let root = match &self.trusted_root {
            Some((_, r)) => r,
            None => {
                empty = TrustedRoot::from_json(EMPTY_ROOT).map_err(|e| e.to_string())?;
                &empty
            }
        };
        Verifier::new(root).map_err(|e| format!("the trusted root cannot verify anything: {e}"))
    }
}

/// A trusted root with nothing in it.
const EMPTY_ROOT: &str = r#"{"mediaType":"application/vnd.dev.sigstore.trustedroot+json;version=0.1","tlogs":[],"certificateAuthorities":[],"ctlogs":[],"timestampAuthorities":[]}"#;

fn artifact_of(digest: &Digest) -> Result<ArtifactDigest, String> {
    let hash = Sha256Hash::from_hex(digest.hex()).map_err(|e| e.to_string())?;
    Ok(ArtifactDigest::sha256(hash))
}

/// Verifies that one of `material` is a signature of `digest` the policy accepts; returns who
/// signed. `searched` says where the registry looked (for the error when nothing was found).
pub fn verify(
    policy: &Policy,
    digest: &Digest,
    material: &[Material],
    searched: &[String],
) -> Result<Signer, SignatureError> {
    provider::install();
    if material.is_empty() {
        return Err(SignatureError::Unsigned {
            digest: digest.clone(),
            searched: searched.to_vec(),
        });
    }
    let mut reasons = Vec::new();
    for m in material.iter().take(MAX_CANDIDATES) {
        let checked = match m {
            Material::Bundle { bytes, source } => verify_bundle(policy, digest, bytes, source),
            Material::SimpleSigning {
                payload,
                annotations,
                source,
            } => cosign::verify(policy, digest, payload, annotations, source),
        };
        match checked {
            Ok(signer) => return Ok(signer),
            Err(why) => reasons.push(format!("{}: {why}", m.source())),
        }
    }
    Err(SignatureError::Rejected {
        digest: digest.clone(),
        reasons,
    })
}

/// Verifies a Sigstore bundle of `digest`.
fn verify_bundle(
    policy: &Policy,
    digest: &Digest,
    bytes: &[u8],
    source: &str,
) -> Result<Signer, String> {
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(format!("a bundle of {} bytes is too large", bytes.len()));
    }
    let artifact = Artifact::from_digest(artifact_of(digest)?);
    let signer = verify_bundle_over(policy, artifact, bytes, source)?;
    is_image_signature(bytes)?;
    Ok(signer)
}

/// The in-toto predicate of a cosign v3 image signature.
pub const SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";

/// Whether a (verified) bundle is a signature of the image and not some other attestation
/// about it: a message signature over the digest, or a DSSE in-toto statement of the predicate
/// cosign v3 signs images with (an SBOM or a provenance by the same CI is not a release).
fn is_image_signature(bytes: &[u8]) -> Result<(), String> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| "the bundle is not UTF-8 JSON".to_string())?;
    let bundle = Bundle::from_json(text).map_err(|e| format!("not a Sigstore bundle: {e}"))?;
    let SignatureContent::DsseEnvelope(env) = &bundle.content else {
        return Ok(());
    };
    let statement: Statement = serde_json::from_slice(env.payload.as_bytes())
        .map_err(|e| format!("the DSSE payload is not an in-toto statement: {e}"))?;
    if statement.predicate_type != SIGN_PREDICATE {
        return Err(format!(
            "an attestation of type {}, not an image signature ({SIGN_PREDICATE})",
            statement.predicate_type
        ));
    }
    Ok(())
}

/// Verifies a Sigstore bundle (JSON) over `artifact`: the core the conformance vectors run.
fn verify_bundle_over(
    policy: &Policy,
    artifact: Artifact<'_>,
    bytes: &[u8],
    source: &str,
) -> Result<Signer, String> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| "the bundle is not UTF-8 JSON".to_string())?;
    let bundle = Bundle::from_json(text).map_err(|e| format!("not a Sigstore bundle: {e}"))?;
    verify_parsed(policy, artifact, &bundle, "cosign v3 bundle", source)
}

/// Verifies a parsed bundle over `artifact`, by certificate (keyless) or by key.
fn verify_parsed(
    policy: &Policy,
    artifact: Artifact<'_>,
    bundle: &Bundle,
    format: &str,
    source: &str,
) -> Result<Signer, String> {
    let verifier = policy.verifier()?;
    if bundle.signing_certificate().is_some() {
        if policy.identities.is_empty() {
            return Err("signed keyless (a certificate), but the policy names no identity".into());
        }
        let result = verifier
            .verify(artifact, bundle, &VerificationPolicy::any_identity())
            .map_err(|e| e.to_string())?;
        let subject = result.identity().map(|s| s.as_str().to_string());
        let issuer = result.issuer().map(str::to_string);
        if !policy
            .identities
            .iter()
            .any(|i| i.matches(issuer.as_deref(), subject.as_deref()))
        {
            let wanted: Vec<String> = policy.identities.iter().map(ToString::to_string).collect();
            return Err(format!(
                "identity mismatch: the certificate says issuer {} subject {}; the policy wants {}",
                issuer.as_deref().unwrap_or("(none)"),
                subject.as_deref().unwrap_or("(none)"),
                wanted.join(" or ")
            ));
        }
        return Ok(Signer {
            kind: "keyless".into(),
            key: None,
            key_file: None,
            issuer,
            subject,
            format: format.into(),
            source: source.into(),
        });
    }
    if policy.keys.is_empty() {
        return Err("signed with a key, but the policy names no key".into());
    }
    let mut why = Vec::new();
    for key in &policy.keys {
        let mut p = PublicKeyVerificationPolicy::new(key.der.clone());
        if policy.trusted_root.is_none() {
            p = p.skip_tlog_unsafe();
        }
        match verifier.verify(artifact.clone(), bundle, &p) {
            Ok(_) => return Ok(key.signer(format, source)),
            Err(e) => why.push(format!("{}: {e}", key.file.display())),
        }
    }
    Err(format!("signed by an unknown key ({})", why.join("; ")))
}

/// What a piece of signature material claims, read without verifying it (`bootsync inspect`,
/// where there is no policy yet: it shows what to put into one).
#[derive(Debug, Clone, Serialize)]
pub struct Claim {
    pub format: String,
    pub source: String,
    /// `certificate`, `key` or `unreadable`.
    pub signed_with: String,
    /// For a certificate: its subject (SAN) and OIDC issuer, as it states them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// What is wrong with it, when something visibly is (it names another digest, it is not
    /// an image signature, it cannot be parsed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Reads what `m` claims about `digest`, verifying nothing.
pub fn claim(m: &Material, digest: &Digest) -> Claim {
    let leaf = |der: &sigstore_verify::types::DerCertificate| {
        sigstore_verify::crypto::x509::parse_certificate_info(der)
            .map(|i| (i.identity.map(|s| s.as_str().to_string()), i.issuer))
            .unwrap_or((None, None))
    };
    match m {
        Material::Bundle { bytes, source } => {
            let parsed = std::str::from_utf8(bytes)
                .map_err(|e| e.to_string())
                .and_then(|t| Bundle::from_json(t).map_err(|e| e.to_string()));
            let mut c = Claim {
                format: "cosign v3 bundle".into(),
                source: source.clone(),
                signed_with: "unreadable".into(),
                subject: None,
                issuer: None,
                problem: None,
            };
            match parsed {
                Ok(b) => {
                    match b.signing_certificate() {
                        Some(cert) => {
                            (c.subject, c.issuer) = leaf(cert);
                            c.signed_with = "certificate".into();
                        }
                        None => c.signed_with = "key".into(),
                    }
                    c.problem = is_image_signature(bytes).err();
                }
                Err(e) => c.problem = Some(format!("not a Sigstore bundle: {e}")),
            }
            c
        }
        Material::SimpleSigning {
            payload,
            annotations,
            source,
        } => {
            let mut c = Claim {
                format: "cosign v2 signature".into(),
                source: source.clone(),
                signed_with: "key".into(),
                subject: None,
                issuer: None,
                problem: cosign::check_payload(payload, digest).err(),
            };
            if let Some(pem) = annotations.get(cosign::CERTIFICATE) {
                c.signed_with = "certificate".into();
                if let Some(cert) = cosign::certificates(pem)
                    .ok()
                    .and_then(|v| v.into_iter().next())
                {
                    (c.subject, c.issuer) = leaf(&cert);
                }
            }
            c
        }
    }
}

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod tests;
