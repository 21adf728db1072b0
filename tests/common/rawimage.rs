//! Images assembled from raw layer blobs with any media type (including ones that lie about the
//! blob), and a canned-manifest front: a proxy rule set that makes a tag resolve to manifest bytes
//! the real registry would refuse on push.

use super::data::digest_of;
use super::image::{BuiltImage, BuiltLayer, OCI_CONFIG, OCI_MANIFEST};
use super::proxy::{Fault, Proxy, Rule};
use serde_json::json;

/// A layer from a blob as it is, declared with `media_type` whatever the blob really is.
/// `diff_id` is computed over `tar` (the uncompressed stream, or the blob itself).
pub fn raw_layer(blob: Vec<u8>, tar: &[u8], media_type: &'static str) -> BuiltLayer {
    BuiltLayer {
        digest: digest_of(&blob),
        diff_id: digest_of(tar),
        media_type,
        blob,
    }
}

/// An OCI image (linux/`arch`) over `layers` (bottom first), as the image builder makes it.
pub fn raw_image(arch: &str, label: &str, layers: Vec<BuiltLayer>) -> BuiltImage {
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": { "Labels": { "bootsync.test": label } },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
    }))
    .unwrap();
    let manifest = manifest_json(
        &digest_of(&config),
        config.len(),
        &layers
            .iter()
            .map(|l| json!({"mediaType": l.media_type, "size": l.blob.len(), "digest": l.digest}))
            .collect::<Vec<_>>(),
    );
    BuiltImage {
        digest: digest_of(&manifest),
        media_type: OCI_MANIFEST,
        manifest,
        config_digest: digest_of(&config),
        config,
        layers,
        os: "linux".into(),
        arch: arch.into(),
    }
}

/// OCI image manifest bytes with the given config and raw layer descriptors (any JSON).
pub fn manifest_json(
    config_digest: &str,
    config_size: usize,
    layers: &[serde_json::Value],
) -> Vec<u8> {
    serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "size": config_size,
            "digest": config_digest,
        },
        "layers": layers,
    }))
    .unwrap()
}

/// Makes `GET`/`HEAD /v2/<repo>/manifests/<tag>` answer `digest` (in `Docker-Content-Digest`)
/// and `GET /v2/<repo>/manifests/<digest>` answer `body` with `media_type`, without asking the
/// registry; everything else still goes to the registry behind the proxy. `digest` need not be
/// the hash of `body` (for digest-mismatch cases). Replaces the proxy's rules.
pub fn serve_manifest(
    proxy: &Proxy,
    repo: &str,
    tag: &str,
    digest: &str,
    media_type: &str,
    body: &[u8],
) {
    let headers = vec![
        ("Content-Type".to_string(), media_type.to_string()),
        ("Docker-Content-Digest".to_string(), digest.to_string()),
    ];
    proxy.clear_rules();
    proxy.add(
        Rule::head(&format!("/v2/{repo}/manifests/{tag}")).fault(Fault::Respond {
            status: 200,
            headers: headers.clone(),
            body: Vec::new(),
        }),
    );
    for path in [
        format!("/v2/{repo}/manifests/{tag}"),
        format!("/v2/{repo}/manifests/{digest}"),
    ] {
        proxy.add(Rule::get(&path).fault(Fault::Respond {
            status: 200,
            headers: headers.clone(),
            body: body.to_vec(),
        }));
    }
}
