//! Signatures made by tools nobody here wrote: cosign v2 `.sig` attachments built from
//! cosign's documented format with the crypto done by the `openssl` CLI (Debian's skopeo,
//! podman and buildah have sigstore signing disabled, and no cosign is packaged), pushed with
//! the registry API; and cosign v3 style keyless bundles made and attached by sigstore-js
//! (`tests/sigstore-js/sign.js`) against its local Fulcio, Rekor and TSA, with its verifier as
//! a cross-check (`tests/sigstore-js/verify.js`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use serde_json::{json, Value};

use super::data::digest_of;
use super::producers::{cache_dir, run, try_run};
use super::registry::Registry;

const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A key pair made by `openssl`, the way `cosign generate-key-pair` (ECDSA P-256) or
/// `cosign import-key-pair` (RSA, Ed25519) would hold one.
pub struct Key {
    pub kind: &'static str,
    pub private: PathBuf,
    /// PKIX `PUBLIC KEY` PEM: what `[target.verify] keys` names.
    pub public: PathBuf,
}

impl Key {
    /// `kind`: `p256`, `p384`, `rsa` or `ed25519`.
    pub fn generate(dir: &Path, name: &str, kind: &'static str) -> Key {
        let private = dir.join(format!("{name}.key"));
        let public = dir.join(format!("{name}.pub"));
        let mut c = Command::new("openssl");
        c.arg("genpkey").arg("-out").arg(&private);
        match kind {
            "p256" => c.args(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
            "p384" => c.args(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]),
            "rsa" => c.args(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
            "ed25519" => c.args(["-algorithm", "ED25519"]),
            other => panic!("no key kind {other}"),
        };
        run(c);
        let mut p = Command::new("openssl");
        p.args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public);
        run(p);
        Key {
            kind,
            private,
            public,
        }
    }

    /// `sha256:` of the DER public key (what bootsync records as the key's fingerprint).
    pub fn fingerprint(&self) -> String {
        let mut c = Command::new("openssl");
        c.args(["pkey", "-pubin", "-outform", "DER", "-in"])
            .arg(&self.public);
        let out = c.output().unwrap();
        assert!(out.status.success(), "openssl pkey -outform DER failed");
        digest_of(&out.stdout)
    }

    /// The base64 signature of `payload` as cosign makes it: ECDSA and RSA (PKCS#1 v1.5) over
    /// SHA-256 of the bytes, Ed25519 over the bytes themselves.
    pub fn sign(&self, payload: &[u8]) -> String {
        let input = self
            .private
            .with_extension(format!("in-{}", fastrand::u32(..)));
        std::fs::write(&input, payload).unwrap();
        let mut c = Command::new("openssl");
        if self.kind == "ed25519" {
            c.args(["pkeyutl", "-sign", "-rawin", "-inkey"])
                .arg(&self.private)
                .arg("-in")
                .arg(&input);
        } else {
            c.args(["dgst", "-sha256", "-sign"])
                .arg(&self.private)
                .arg(&input);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "openssl signing failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_file(&input);
        b64(&out.stdout)
    }
}

/// A cosign simple-signing payload naming `digest`, as cosign writes it.
pub fn payload(docker_reference: &str, digest: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": null,
    }))
    .unwrap()
}

/// One layer of a `.sig` manifest: a payload and its annotations.
pub struct SigLayer {
    pub payload: Vec<u8>,
    pub annotations: BTreeMap<String, String>,
}

impl SigLayer {
    /// `payload` signed by `key`.
    pub fn signed(key: &Key, payload: Vec<u8>) -> SigLayer {
        let mut annotations = BTreeMap::new();
        annotations.insert(
            "dev.cosignproject.cosign/signature".to_string(),
            key.sign(&payload),
        );
        SigLayer {
            payload,
            annotations,
        }
    }
}

/// Pushes a cosign v2 signature manifest for `digest` at `sha256-<hex>.sig`, its layers
/// and config by the registry API, as `cosign sign` does. Returns the manifest's digest.
pub fn push_sig(reg: &Registry, repo: &str, digest: &str, layers: &[SigLayer]) -> String {
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let d = reg.push_blob(repo, &l.payload);
        diff_ids.push(d.clone());
        descriptors.push(json!({
            "mediaType": SIMPLE_SIGNING,
            "size": l.payload.len(),
            "digest": d,
            "annotations": l.annotations,
        }));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "", "created": "0001-01-01T00:00:00Z", "os": "",
        "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = reg.push_blob(repo, &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "size": config.len(),
            "digest": config_digest,
        },
        "layers": descriptors,
    }))
    .unwrap();
    let tag = format!("sha256-{}.sig", digest.trim_start_matches("sha256:"));
    reg.push_manifest(repo, &tag, OCI_MANIFEST, &manifest)
}

/// sigstore-js, installed by `.ci/run` into a scratch directory.
pub fn sigstore_js() -> PathBuf {
    let modules = std::env::var_os("BOOTSYNC_SIGSTORE_JS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("sigstore-js/node_modules"));
    assert!(
        modules.join("@sigstore/sign").is_dir(),
        "sigstore-js is not installed at {}: run .ci/run, or `npm ci` in a copy of tests/sigstore-js",
        modules.display()
    );
    modules
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sigstore-js")
        .join(name)
}

/// What one run of `sign.js` made: the trusted root of its mock services and one bundle
/// file per signing.
pub struct Signed {
    pub trusted_root: PathBuf,
    pub bundles: Vec<PathBuf>,
}

/// The identity the mock Fulcio certifies: a GitHub Actions workflow of `urmanac`.
pub const ISSUER: &str = "https://token.actions.githubusercontent.com";
pub const SUBJECT: &str =
    "https://github.com/urmanac/talos-cozystack-demo/.github/workflows/release.yml@refs/heads/main";

/// Runs sign.js with `job` (its fields: `sign` = [{digest | message, attach_to, image,
/// tamper, predicate_type}], `ca_clock`, `tsa`, `subject`, `issuer`), writing into `out`.
pub fn sigstore_sign(out: &Path, mut job: Value) -> Signed {
    std::fs::create_dir_all(out).unwrap();
    let obj = job.as_object_mut().unwrap();
    obj.entry("out_dir").or_insert(json!(out));
    obj.entry("subject").or_insert(json!(SUBJECT));
    obj.entry("issuer").or_insert(json!(ISSUER));
    // The mock Rekor stores a `dsse` entry as proposed instead of canonicalizing it as Rekor
    // does (envelope and payload hashes); it stores `intoto` v0.0.2 entries faithfully.
    obj.entry("entry_type").or_insert(json!("intoto"));
    let job_file = out.join(format!("job-{}.json", fastrand::u32(..)));
    std::fs::write(&job_file, serde_json::to_vec(&job).unwrap()).unwrap();
    let mut c = Command::new("node");
    c.arg(script("sign.js"))
        .arg(&job_file)
        .env("NODE_PATH", sigstore_js())
        // sigstore-js talks to the registry on loopback: never through a proxy.
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy");
    let printed: Value = serde_json::from_str(run(c).trim()).unwrap();
    Signed {
        trusted_root: out.join("trusted_root.json"),
        bundles: printed["bundles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| PathBuf::from(b.as_str().unwrap()))
            .collect(),
    }
}

/// sigstore-js's verdict on `bundle` as a signature of `digest` by `issuer` and a subject
/// matching `subject_regexp`.
pub fn sigstore_js_verify(
    bundle: &Path,
    root: &Path,
    digest: &str,
    issuer: &str,
    subject_regexp: &str,
    artifact: Option<&Path>,
) -> Result<(), String> {
    let mut c = Command::new("node");
    c.arg(script("verify.js"))
        .arg(bundle)
        .arg(root)
        .args([digest, issuer, subject_regexp])
        .env("NODE_PATH", sigstore_js());
    if let Some(a) = artifact {
        c.arg(a);
    }
    let out: Value = serde_json::from_str(try_run(c)?.trim()).unwrap();
    if out["ok"] == json!(true) {
        Ok(())
    } else {
        Err(out["error"].as_str().unwrap_or("?").to_string())
    }
}
