//! cosign v2 signatures: a simple-signing payload naming the image digest, its signature in an
//! annotation, and for keyless signing the certificate, its chain and the Rekor entry (a signed
//! entry timestamp) in others. A key signature is checked with the key; a keyless one (and a key
//! one when a trusted root asks for the transparency log) is written as the Sigstore bundle it
//! is equivalent to (bundle v0.1: a message signature, the certificate chain, the log entry with
//! its inclusion promise) and verified like any bundle.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use sigstore_verify::crypto::VerificationKey;
use sigstore_verify::types::{Artifact, Bundle, DerCertificate, SignatureBytes};

use super::{verify_parsed, Policy, Signer, MAX_PAYLOAD_BYTES};
use crate::digest::Digest;

pub(super) const SIGNATURE: &str = "dev.cosignproject.cosign/signature";
pub(super) const CERTIFICATE: &str = "dev.sigstore.cosign/certificate";
pub(super) const CHAIN: &str = "dev.sigstore.cosign/chain";
pub(super) const REKOR_BUNDLE: &str = "dev.sigstore.cosign/bundle";
pub(super) const TIMESTAMP: &str = "dev.sigstore.cosign/rfc3161timestamp";

const FORMAT: &str = "cosign v2 signature";

/// Checks that the payload is a cosign image signature naming `digest`.
pub(super) fn check_payload(payload: &[u8], digest: &Digest) -> Result<(), String> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(format!("a payload of {} bytes is too large", payload.len()));
    }
    let doc: Value = serde_json::from_slice(payload)
        .map_err(|e| format!("the payload is not simple-signing JSON: {e}"))?;
    let critical = &doc["critical"];
    let named = critical["image"]["docker-manifest-digest"]
        .as_str()
        .ok_or("the payload names no docker-manifest-digest")?;
    if named != digest.as_str() {
        return Err(format!(
            "the payload signs {named}, not {digest} (a signature copied from another image)"
        ));
    }
    let kind = critical["type"].as_str().unwrap_or_default();
    if kind != "cosign container image signature" {
        return Err(format!(
            "the payload is of type {kind:?}, not a cosign image signature"
        ));
    }
    Ok(())
}

/// The certificates of a PEM text, in order.
pub(super) fn certificates(pem: &str) -> Result<Vec<DerCertificate>, String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    pem.split_inclusive("-----END CERTIFICATE-----")
        .filter(|block| block.contains(BEGIN))
        .map(|block| {
            let start = block.find(BEGIN).unwrap_or(0);
            DerCertificate::from_pem(&block[start..]).map_err(|e| format!("a certificate: {e}"))
        })
        .collect()
}

/// The Sigstore bundle a cosign v2 signature is equivalent to.
fn as_bundle(
    payload: &[u8],
    signature: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<Bundle, String> {
    let mut material = serde_json::Map::new();
    match annotations.get(CERTIFICATE) {
        Some(leaf) => {
            let mut chain = certificates(leaf)?;
            if let Some(rest) = annotations.get(CHAIN) {
                chain.extend(certificates(rest)?);
            }
            let certs: Vec<Value> = chain
                .iter()
                .map(|c| json!({ "rawBytes": B64.encode(c.as_bytes()) }))
                .collect();
            material.insert(
                "x509CertificateChain".into(),
                json!({ "certificates": certs }),
            );
        }
        None => {
            material.insert("publicKey".into(), json!({ "hint": "" }));
        }
    }
    if let Some(rekor) = annotations.get(REKOR_BUNDLE) {
        let r: Value = serde_json::from_str(rekor)
            .map_err(|e| format!("the Rekor bundle annotation is not JSON: {e}"))?;
        let p = &r["Payload"];
        let body = p["body"].as_str().ok_or("the Rekor bundle has no body")?;
        let decoded = B64
            .decode(body)
            .map_err(|_| "the Rekor entry body is not base64".to_string())?;
        let entry: Value = serde_json::from_slice(&decoded)
            .map_err(|e| format!("the Rekor entry body is not JSON: {e}"))?;
        let log_id = p["logID"].as_str().ok_or("the Rekor bundle has no logID")?;
        let log_id = hex::decode(log_id).map_err(|_| "the Rekor logID is not hex".to_string())?;
        let number = |v: &Value| v.as_i64().map(|n| n.to_string());
        material.insert(
            "tlogEntries".into(),
            json!([{
                "logIndex": number(&p["logIndex"]).ok_or("the Rekor bundle has no logIndex")?,
                "logId": { "keyId": B64.encode(log_id) },
                "kindVersion": {
                    "kind": entry["kind"].as_str().unwrap_or("hashedrekord"),
                    "version": entry["apiVersion"].as_str().unwrap_or("0.0.1"),
                },
                "integratedTime": number(&p["integratedTime"]).ok_or("the Rekor bundle has no integratedTime")?,
                "inclusionPromise": {
                    "signedEntryTimestamp": r["SignedEntryTimestamp"].as_str().ok_or("the Rekor bundle has no SignedEntryTimestamp")?,
                },
                "canonicalizedBody": body,
            }]),
        );
    } else {
        material.insert("tlogEntries".into(), json!([]));
    }
    if let Some(ts) = annotations.get(TIMESTAMP) {
        let t: Value = serde_json::from_str(ts)
            .map_err(|e| format!("the timestamp annotation is not JSON: {e}"))?;
        if let Some(signed) = t["SignedRFC3161Timestamp"].as_str() {
            material.insert(
                "timestampVerificationData".into(),
                json!({ "rfc3161Timestamps": [{ "signedTimestamp": signed }] }),
            );
        }
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, payload);
    let bundle = json!({
        "mediaType": "application/vnd.dev.sigstore.bundle+json;version=0.1",
        "verificationMaterial": Value::Object(material),
        "messageSignature": {
            "messageDigest": { "algorithm": "SHA2_256", "digest": B64.encode(digest.as_ref()) },
            "signature": signature,
        },
    });
    Bundle::from_json(&bundle.to_string()).map_err(|e| format!("cannot be read as a bundle: {e}"))
}

/// Whether `sig` is a signature of `payload` by `key` in one of the schemes cosign signs with
/// for that key type: cosign hashes with SHA-256 whatever the curve (`LoadPublicKeyRaw(raw,
/// crypto.SHA256)`), uses PKCS#1 v1.5 for RSA keys and pure Ed25519.
fn verifies(
    key: &sigstore_verify::types::DerPublicKey,
    payload: &[u8],
    sig: &SignatureBytes,
) -> bool {
    use sigstore_verify::crypto::SigningScheme as S;
    let Ok(detected) = VerificationKey::from_spki(key) else {
        return false;
    };
    let schemes: &[S] = match detected.scheme() {
        S::EcdsaP256Sha256 | S::EcdsaP256Sha384 => &[S::EcdsaP256Sha256],
        S::EcdsaP384Sha256 | S::EcdsaP384Sha384 => &[S::EcdsaP384Sha256, S::EcdsaP384Sha384],
        S::RsaPkcs1Sha256
        | S::RsaPkcs1Sha384
        | S::RsaPkcs1Sha512
        | S::RsaPssSha256
        | S::RsaPssSha384
        | S::RsaPssSha512 => &[S::RsaPkcs1Sha256, S::RsaPssSha256],
        S::Ed25519 => &[S::Ed25519],
        _ => &[],
    };
    schemes.iter().any(|&scheme| {
        VerificationKey::from_spki_with_scheme(key, scheme)
            .is_ok_and(|k| k.verify(payload, sig).is_ok())
    })
}

/// Verifies one cosign v2 signature layer of `digest`.
pub(super) fn verify(
    policy: &Policy,
    digest: &Digest,
    payload: &[u8],
    annotations: &BTreeMap<String, String>,
    source: &str,
) -> Result<Signer, String> {
    check_payload(payload, digest)?;
    let signature = annotations
        .get(SIGNATURE)
        .ok_or("the layer carries no signature annotation")?;
    let keyless = annotations.contains_key(CERTIFICATE);
    if keyless || (policy.trusted_root.is_some() && annotations.contains_key(REKOR_BUNDLE)) {
        let bundle = as_bundle(payload, signature, annotations)?;
        return verify_parsed(
            policy,
            Artifact::from_blob(payload),
            &bundle,
            FORMAT,
            source,
        );
    }
    if policy.trusted_root.is_some() {
        return Err("no transparency-log entry, which the trusted root requires".into());
    }
    if policy.keys.is_empty() {
        return Err("signed with a key, but the policy names no key".into());
    }
    let sig = SignatureBytes::from_base64(signature)
        .map_err(|_| "the signature annotation is not base64".to_string())?;
    for key in &policy.keys {
        if verifies(&key.der, payload, &sig) {
            return Ok(key.signer(FORMAT, source));
        }
    }
    let known: Vec<String> = policy.keys.iter().map(|k| k.fingerprint.clone()).collect();
    Err(format!(
        "signed by an unknown key: the signature verifies with none of {}",
        known.join(", ")
    ))
}
