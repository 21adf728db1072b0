//! Signature material as a registry may serve it, hostile: referrer indexes, referrer and
//! `.sig` manifests, Sigstore bundles and cosign v2 layers (payload and annotations) under a
//! keyless policy and a key policy. Any bytes must give a verdict or an error, never a panic,
//! and nothing made of them may verify (no key or root in the policy signed them).
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use bootsync::fuzzing::{
    bundle_layer, bundle_referrers, claim, signature_layers, verify, Digest, IdentitySpec,
    Material, Policy,
};
use libfuzzer_sys::fuzz_target;

/// A trusted root and a key from sigstore-conformance's vectors (see tests/fixtures).
const ROOT: &str = include_str!(
    "../../tests/fixtures/sigstore-conformance/bundle-verify/intoto-with-custom-trust-root/trusted_root.json"
);
const KEY: &str =
    include_str!("../../tests/fixtures/sigstore-conformance/bundle-verify/managed-key-happy-path/key.pub");

fn policies() -> &'static [Arc<Policy>; 2] {
    static P: OnceLock<[Arc<Policy>; 2]> = OnceLock::new();
    P.get_or_init(|| {
        let identity = IdentitySpec {
            issuer: "https://token.actions.githubusercontent.com".into(),
            subject: None,
            subject_regexp: Some("^https://github.com/".into()),
        };
        let keyless =
            Policy::from_texts(&[], &[identity], Some((PathBuf::from("root"), ROOT.into())))
                .expect("the keyless policy loads");
        let key = Policy::from_texts(&[(PathBuf::from("key.pub"), KEY.into())], &[], None)
            .expect("the key policy loads");
        [keyless, key]
    })
}

const ANNOTATIONS: [&str; 5] = [
    "dev.cosignproject.cosign/signature",
    "dev.sigstore.cosign/certificate",
    "dev.sigstore.cosign/chain",
    "dev.sigstore.cosign/bundle",
    "dev.sigstore.cosign/rfc3161timestamp",
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let digest = Digest::of(b"the image");
    match mode % 3 {
        // Registry documents.
        0 => {
            let _ = bundle_referrers(rest);
            let _ = bundle_layer(rest, &digest);
            let _ = signature_layers(rest);
        }
        // A bundle.
        1 => {
            let m = Material::Bundle {
                bytes: rest.to_vec(),
                source: "fuzz".into(),
            };
            let _ = claim(&m, &digest);
            for p in policies() {
                assert!(verify(p, &digest, std::slice::from_ref(&m), &[]).is_err());
            }
        }
        // A cosign v2 layer: payload, then annotations, separated by 0xff.
        _ => {
            let mut parts = rest.split(|&b| b == 0xff);
            let payload = parts.next().unwrap_or_default().to_vec();
            let mut annotations = BTreeMap::new();
            for (name, value) in ANNOTATIONS.iter().zip(parts) {
                annotations.insert(name.to_string(), String::from_utf8_lossy(value).into_owned());
            }
            let m = Material::SimpleSigning {
                payload,
                annotations,
                source: "fuzz".into(),
            };
            let _ = claim(&m, &digest);
            for p in policies() {
                assert!(verify(p, &digest, std::slice::from_ref(&m), &[]).is_err());
            }
        }
    }
});
