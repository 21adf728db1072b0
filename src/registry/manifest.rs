//! Manifests and indexes, parsed with the field's own data model (`oci-spec`) and checked the
//! way hostile input must be: a size cap, the body hashed against the digest it was fetched by,
//! sha256 digests only (every descriptor's, parsed once into [`Digest`]), a known schema and
//! media type, no index inside an index, a platform listed once. Pure, so it is fuzzed directly.

use std::collections::BTreeMap;

use oci_spec::image::{ImageIndex, ImageManifest as OciManifest};
use serde_json::Value;

use super::RegistryError;
use crate::config::Platform;
use crate::digest::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// GHCR refuses a manifest request whose Accept lacks the OCI index type.
pub const ACCEPTED_MANIFESTS: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// Manifests larger than this are refused: real ones are a few KiB.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A layer (any blob) as a manifest describes it: the fields of oci-spec's `Descriptor` that
/// bootsync uses, its digest parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    fn from_oci(d: &oci_spec::image::Descriptor) -> Result<Descriptor, String> {
        Ok(Descriptor {
            media_type: d.media_type().to_string(),
            digest: d.digest().as_ref().parse().map_err(|e| format!("{e}"))?,
            size: d.size(),
            annotations: d
                .annotations()
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }
}

/// The image manifest chosen for the target's platform.
#[derive(Debug, Clone)]
pub struct ImageManifest {
    /// Digest of the manifest bytes (the version id).
    pub digest: Digest,
    /// Layers, bottom first, as in the manifest.
    pub layers: Vec<Descriptor>,
}

/// What a manifest document resolves to for a platform.
#[derive(Debug)]
pub enum Resolved {
    /// An image manifest: the version.
    Image(ImageManifest),
    /// An index: fetch this platform manifest next.
    Follow(Digest),
}

/// A platform as an index entry states it.
fn platform_of(p: &oci_spec::image::Platform) -> Platform {
    Platform {
        os: p.os().to_string(),
        architecture: p.architecture().to_string(),
        variant: p.variant().clone(),
    }
}

/// Every `digest` of the document's descriptors, checked before the data model parses them,
/// so that a bad one is named as such (and not as a parse error).
fn check_digests(doc: &Value) -> Result<(), String> {
    let mut descriptors: Vec<(&str, &Value)> = Vec::new();
    if let Some(c) = doc.get("config") {
        descriptors.push(("config", c));
    }
    for key in ["layers", "manifests"] {
        for d in doc.get(key).and_then(Value::as_array).into_iter().flatten() {
            descriptors.push((key, d));
        }
    }
    for (what, d) in descriptors {
        match d.get("digest") {
            Some(Value::String(s)) => {
                s.parse::<Digest>()
                    .map_err(|e| format!("{what} entry: {e}"))?;
            }
            _ => return Err(format!("{what} entry without a digest")),
        }
    }
    Ok(())
}

/// Checks a manifest or index `body` fetched by `digest` and resolves it for `platform`.
/// `nested` is set for a document an index pointed to, which must be an image manifest.
pub fn resolve_manifest(
    body: &[u8],
    digest: &Digest,
    platform: &Platform,
    nested: bool,
) -> Result<Resolved, RegistryError> {
    let bad = |reason: String| RegistryError::BadManifest {
        what: format!("manifest {digest}"),
        reason,
    };
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(bad(format!(
            "{} bytes is larger than the {MAX_MANIFEST_BYTES} allowed",
            body.len()
        )));
    }
    let actual = Digest::of(body);
    if &actual != digest {
        return Err(bad(format!("digest mismatch: content hashes to {actual}")));
    }
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("not a valid manifest: {e}")))?;
    if !doc.is_object() {
        return Err(bad("not a valid manifest: not a JSON object".into()));
    }
    let schema = doc.get("schemaVersion").and_then(Value::as_u64);
    if schema != Some(2) {
        return Err(bad(format!("unsupported schemaVersion {schema:?}")));
    }
    if let Some(mt) = doc.get("mediaType") {
        let mt = mt.as_str().unwrap_or_default();
        if !ACCEPTED_MANIFESTS.contains(&mt) {
            return Err(bad(format!("unsupported media type {mt:?}")));
        }
    }
    check_digests(&doc).map_err(bad)?;
    if doc.get("manifests").is_none() {
        let m: OciManifest =
            serde_json::from_value(doc).map_err(|e| bad(format!("not a valid manifest: {e}")))?;
        return image_from(&m, digest).map(Resolved::Image);
    }
    if nested {
        return Err(bad("an index inside an index".into()));
    }
    let index: ImageIndex =
        serde_json::from_value(doc).map_err(|e| bad(format!("not a valid index: {e}")))?;
    let entries = index.manifests();
    // Platforms compare as containerd normalises them (`arm64` = `arm64/v8`, `aarch64` =
    // `arm64`); a config without a variant also takes the one entry of another variant.
    let matching = |f: &dyn Fn(&Platform) -> bool| -> Vec<&oci_spec::image::Descriptor> {
        entries
            .iter()
            .filter(|e| e.platform().as_ref().is_some_and(|p| f(&platform_of(p))))
            .collect()
    };
    let mut chosen = matching(&|p| platform.same_as(p));
    if chosen.is_empty() && platform.variant.is_none() {
        chosen = matching(&|p| platform.same_arch(p));
    }
    let entry = match chosen.as_slice() {
        [one] => *one,
        [] => {
            let mut available: Vec<String> = entries
                .iter()
                .filter_map(|e| e.platform().as_ref().map(|p| platform_of(p).to_string()))
                .collect();
            available.dedup();
            return Err(RegistryError::PlatformMissing {
                wanted: platform.to_string(),
                digest: digest.to_string(),
                available: if available.is_empty() {
                    "no platforms".into()
                } else {
                    available.join(", ")
                },
            });
        }
        many => {
            return Err(bad(format!(
                "platform {platform} is listed {} times; refusing to guess",
                many.len()
            )))
        }
    };
    let next: Digest = entry
        .digest()
        .as_ref()
        .parse()
        .map_err(|e| bad(format!("entry for {platform}: {e}")))?;
    if &next == digest {
        return Err(bad("the index lists itself".into()));
    }
    let mt = entry.media_type().to_string();
    if mt != OCI_MANIFEST && mt != DOCKER_MANIFEST {
        return Err(bad(format!(
            "entry for {platform} has unsupported media type {mt:?}"
        )));
    }
    Ok(Resolved::Follow(next))
}

fn image_from(m: &OciManifest, digest: &Digest) -> Result<ImageManifest, RegistryError> {
    let bad = |reason: String| RegistryError::BadManifest {
        what: format!("manifest {digest}"),
        reason,
    };
    if m.layers().is_empty() {
        return Err(bad("it has no layers".into()));
    }
    let layers = m
        .layers()
        .iter()
        .map(Descriptor::from_oci)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|r| bad(format!("layer: {r}")))?;
    Ok(ImageManifest {
        digest: digest.clone(),
        layers,
    })
}

/// The platforms an index offers, as it states them (`None` when `body` is no index).
pub fn offered_platforms(body: &[u8]) -> Option<Vec<String>> {
    let index: ImageIndex = serde_json::from_slice(body).ok()?;
    Some(
        index
            .manifests()
            .iter()
            .filter_map(|e| e.platform().as_ref().map(|p| platform_of(p).to_string()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm64() -> Platform {
        crate::config::parse_platform("linux/arm64").unwrap()
    }

    fn config() -> String {
        format!(
            r#""config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":2}}"#,
            "c".repeat(64)
        )
    }

    #[test]
    fn manifests_resolve_and_hostile_ones_are_refused() {
        let layer = format!("sha256:{}", "a".repeat(64));
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",{},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":3}}]}}"#,
            config()
        );
        let d = Digest::of(image.as_bytes());
        assert!(
            matches!(resolve_manifest(image.as_bytes(), &d, &arm64(), false), Ok(Resolved::Image(m)) if m.layers.len() == 1)
        );
        // the body must hash to the digest it was fetched by
        let wrong = Digest::of(b"something else");
        let e = resolve_manifest(image.as_bytes(), &wrong, &arm64(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("digest mismatch"), "{e}");

        let entry = |digest: &Digest, arch: &str| {
            format!(
                r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{digest}","size":1,"platform":{{"os":"linux","architecture":"{arch}"}}}}"#
            )
        };
        let index = |entries: &[String]| {
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
                entries.join(",")
            )
        };
        let ok = index(&[entry(&d, "arm64"), entry(&wrong, "amd64")]);
        assert!(
            matches!(resolve_manifest(ok.as_bytes(), &Digest::of(ok.as_bytes()), &arm64(), false), Ok(Resolved::Follow(f)) if f == d)
        );
        assert_eq!(
            offered_platforms(ok.as_bytes()).unwrap(),
            ["linux/arm64", "linux/amd64"]
        );
        let e = resolve_manifest(ok.as_bytes(), &Digest::of(ok.as_bytes()), &arm64(), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("index inside an index"), "{e}");
        let twice = index(&[entry(&d, "arm64"), entry(&wrong, "arm64")]);
        let e = resolve_manifest(
            twice.as_bytes(),
            &Digest::of(twice.as_bytes()),
            &arm64(),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("listed 2 times"), "{e}");
        let none = index(&[entry(&d, "amd64")]);
        let e = resolve_manifest(
            none.as_bytes(),
            &Digest::of(none.as_bytes()),
            &arm64(),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("offers: linux/amd64"), "{e}");
        let md5 = index(&[entry(&d, "arm64").replace(d.as_str(), "md5:abc")]);
        let e = resolve_manifest(md5.as_bytes(), &Digest::of(md5.as_bytes()), &arm64(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported digest algorithm"), "{e}");
        for junk in [&b"not json"[..], b"{}", b"[]", br#"{"schemaVersion":1}"#] {
            assert!(resolve_manifest(junk, &Digest::of(junk), &arm64(), false).is_err());
        }
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        let e = resolve_manifest(&huge, &Digest::of(&huge), &arm64(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than"), "{e}");
    }

    #[test]
    fn platforms_match_as_containerd_normalises_them() {
        let p = |s: &str| crate::config::parse_platform(s).unwrap();
        // (wanted, in the index, chosen?)
        let table = [
            ("linux/arm64", "linux/arm64/v8", true),
            ("linux/arm64/v8", "linux/arm64", true),
            ("linux/aarch64", "linux/arm64", true),
            ("linux/arm64", "linux/aarch64/8", true),
            ("linux/amd64", "linux/x86_64", true),
            ("linux/amd64/v1", "linux/amd64", true),
            ("linux/arm/v7", "linux/armhf", true),
            ("linux/arm", "linux/arm/v7", true),
            ("linux/arm64/v9", "linux/arm64", false),
            ("linux/arm64", "linux/amd64", false),
            ("linux/arm/v6", "linux/arm/v7", false),
            // no variant asked: the one entry of another variant is taken
            ("linux/amd64", "linux/amd64/v3", true),
        ];
        for (wanted, offered, chosen) in table {
            let (os, rest) = offered.split_once('/').unwrap();
            let (arch, variant) = match rest.split_once('/') {
                Some((a, v)) => (a, format!(r#","variant":"{v}""#)),
                None => (rest, String::new()),
            };
            let index = format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{}","size":1,"platform":{{"os":"{os}","architecture":"{arch}"{variant}}}}}]}}"#,
                "c".repeat(64)
            );
            let r = resolve_manifest(
                index.as_bytes(),
                &Digest::of(index.as_bytes()),
                &p(wanted),
                false,
            );
            assert_eq!(
                r.is_ok(),
                chosen,
                "{wanted} in an index of {offered}: {r:?}"
            );
        }
    }
}
