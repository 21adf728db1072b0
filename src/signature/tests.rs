//! The parts that need no signing: payload checks, PEM chains, policies that cannot be.
//! Signatures made by real tools are verified end to end in `tests/signatures.rs`, and the
//! sigstore-conformance vectors in `tests/conformance.rs`.

use super::*;

fn digest() -> Digest {
    Digest::of(b"the image manifest")
}

fn payload(named: &str, kind: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": {"docker-reference": "registry.example/talos"},
            "image": {"docker-manifest-digest": named},
            "type": kind,
        },
        "optional": null,
    }))
    .unwrap()
}

#[test]
fn a_payload_must_name_the_digest_as_a_cosign_image_signature() {
    let d = digest();
    cosign::check_payload(&payload(d.as_str(), "cosign container image signature"), &d).unwrap();
    let other = Digest::of(b"another image");
    let e = cosign::check_payload(
        &payload(other.as_str(), "cosign container image signature"),
        &d,
    )
    .unwrap_err();
    assert!(e.contains("copied from another image"), "{e}");
    let e = cosign::check_payload(&payload(d.as_str(), "attestation"), &d).unwrap_err();
    assert!(e.contains("not a cosign image signature"), "{e}");
    assert!(cosign::check_payload(b"{", &d).is_err());
    assert!(cosign::check_payload(&vec![b' '; MAX_PAYLOAD_BYTES + 1], &d).is_err());
}

#[test]
fn policies_that_cannot_verify_anything_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = Policy::load(&[], &[], None).unwrap_err().to_string();
    assert!(e.contains("set `keys`"), "{e}");
    let id = IdentitySpec {
        issuer: "https://token.actions.githubusercontent.com".into(),
        subject: None,
        subject_regexp: Some("^https://github.com/urmanac/".into()),
    };
    let e = Policy::load(&[], std::slice::from_ref(&id), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("trusted_root"), "{e}");
    let bad = IdentitySpec {
        subject_regexp: Some("([unclosed".into()),
        ..id.clone()
    };
    let root = dir.path().join("root.json");
    std::fs::write(&root, EMPTY_ROOT).unwrap();
    let e = Policy::load(&[], &[bad], Some(&root))
        .unwrap_err()
        .to_string();
    assert!(e.contains("subject_regexp"), "{e}");
    let key = dir.path().join("cosign.pub");
    std::fs::write(&key, "not a key").unwrap();
    let e = Policy::load(&[key], &[], None).unwrap_err().to_string();
    assert!(e.contains("cosign.pub") && e.contains("PEM"), "{e}");
    let p = Policy::load(&[], &[id], Some(&root)).unwrap();
    assert_eq!(*p, *Policy::load(&[], &p_ids(), Some(&root)).unwrap());
}

fn p_ids() -> Vec<IdentitySpec> {
    vec![IdentitySpec {
        issuer: "https://token.actions.githubusercontent.com".into(),
        subject: None,
        subject_regexp: Some("^https://github.com/urmanac/".into()),
    }]
}

#[test]
fn nothing_found_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.json");
    std::fs::write(&root, EMPTY_ROOT).unwrap();
    let p = Policy::load(&[], &p_ids(), Some(&root)).unwrap();
    let e = verify(
        &p,
        &digest(),
        &[],
        &["referrers API: 404".into(), "tag sha256-ab.sig: 404".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("not signed") && e.contains("referrers API: 404"),
        "{e}"
    );
}
