//! sigstore-conformance's `bundle-verify` vectors (tests/fixtures/sigstore-conformance) through
//! the same verifier a sync uses: each vector's verdict, over the artifact's bytes and over its
//! digest (the way bootsync verifies an image), must be the one its name states.

use std::path::Path;

use sigstore_verify::trust_root::SIGSTORE_PRODUCTION_TRUSTED_ROOT;

use super::*;

/// The conformance suite's signing identity, for vectors that name none.
const IDENTITY: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";
const ISSUER: &str = "https://token.actions.githubusercontent.com";

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The policy a vector asks for: its key, or its identity, with its root or the public-good one.
fn policy_for(vector: &Path, scratch: &Path) -> Result<Arc<Policy>, PolicyError> {
    let root = vector.join("trusted_root.json");
    let root = if root.exists() {
        root
    } else {
        let p = scratch.join("public-good.json");
        std::fs::write(&p, SIGSTORE_PRODUCTION_TRUSTED_ROOT).unwrap();
        p
    };
    let key = vector.join("key.pub");
    if key.exists() {
        return Policy::load(&[key], &[], Some(&root));
    }
    let identity = IdentitySpec {
        issuer: read_trimmed(&vector.join("issuer")).unwrap_or_else(|| ISSUER.into()),
        subject: Some(read_trimmed(&vector.join("identity")).unwrap_or_else(|| IDENTITY.into())),
        subject_regexp: None,
    };
    Policy::load(&[], &[identity], Some(&root))
}

#[test]
fn every_bundle_verify_vector_gets_its_verdict() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sigstore-conformance");
    let scratch = tempfile::tempdir().unwrap();
    let default_artifact = std::fs::read(base.join("bundle-verify/a.txt")).unwrap();
    let mut vectors: Vec<_> = std::fs::read_dir(base.join("bundle-verify"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    vectors.sort();
    assert!(vectors.len() >= 60, "{} vectors", vectors.len());
    let mut wrong = Vec::new();
    let (mut passed, mut failed) = (0, 0);
    let mut at_load = Vec::new();
    for vector in &vectors {
        let name = vector.file_name().unwrap().to_string_lossy().to_string();
        let should_fail = name.ends_with("_fail");
        let bundle = std::fs::read(vector.join("bundle.sigstore.json")).unwrap();
        let artifact = std::fs::read(vector.join("artifact")).unwrap_or(default_artifact.clone());
        // A vector whose root or key cannot even be loaded is refused before any bundle, as
        // bootsync refuses such a config.
        let policy = match policy_for(vector, scratch.path()) {
            Ok(p) => p,
            Err(e) => {
                if !should_fail {
                    wrong.push(format!("{name}: its policy does not load: {e}"));
                }
                at_load.push(format!("{name} ({e})"));
                continue;
            }
        };
        let digest = Digest::of(&artifact);
        let over_bytes =
            verify_bundle_over(&policy, Artifact::from_blob(&artifact), &bundle, &name);
        let by_digest = Artifact::from_digest(artifact_of(&digest).unwrap());
        let over_digest = verify_bundle_over(&policy, by_digest, &bundle, &name);
        for (how, got) in [("bytes", &over_bytes), ("digest", &over_digest)] {
            match (should_fail, got) {
                (false, Err(e)) => wrong.push(format!("{name} ({how}): refused: {e}")),
                (true, Ok(s)) => wrong.push(format!("{name} ({how}): accepted ({s})")),
                _ => {}
            }
        }
        if over_digest.is_ok() {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    eprintln!(
        "{} vectors: {passed} verified, {failed} refused, {} refused as a policy: {}",
        vectors.len(),
        at_load.len(),
        at_load.join("; ")
    );
    assert!(
        wrong.is_empty(),
        "verdicts that differ:\n{}",
        wrong.join("\n")
    );
}
