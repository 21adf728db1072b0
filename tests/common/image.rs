//! Pure-Rust OCI / Docker image builder: tar layers, configs, manifests, indexes.

use super::data::digest_of;
use serde_json::json;
use std::collections::BTreeSet;
use std::io::Write;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Oci,
    Docker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone)]
pub enum Entry {
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Dir {
        path: String,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// Raw path of a whiteout marker (`dir/.wh.name` or `dir/.wh..wh..opq`).
    Marker {
        path: String,
    },
}

/// One filesystem layer. Parent directories of every entry are added automatically (as image
/// builders do) unless the layer was created with `without_parents()`.
#[derive(Debug, Clone)]
pub struct Layer {
    pub compression: Compression,
    pub entries: Vec<Entry>,
    pub auto_parents: bool,
}

impl Layer {
    pub fn new(compression: Compression) -> Self {
        Layer {
            compression,
            entries: Vec::new(),
            auto_parents: true,
        }
    }
    pub fn gzip() -> Self {
        Self::new(Compression::Gzip)
    }
    pub fn zstd() -> Self {
        Self::new(Compression::Zstd)
    }
    pub fn uncompressed() -> Self {
        Self::new(Compression::None)
    }
    pub fn without_parents(mut self) -> Self {
        self.auto_parents = false;
        self
    }
    /// A regular file, mode 0644.
    pub fn file(self, path: &str, data: impl Into<Vec<u8>>) -> Self {
        self.file_mode(path, data, 0o644)
    }
    pub fn file_mode(mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.entries.push(Entry::File {
            path: path.trim_start_matches('/').to_string(),
            data: data.into(),
            mode,
        });
        self
    }
    pub fn dir(mut self, path: &str) -> Self {
        self.entries.push(Entry::Dir {
            path: path.trim_matches('/').to_string(),
        });
        self
    }
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.entries.push(Entry::Symlink {
            path: path.trim_start_matches('/').to_string(),
            target: target.to_string(),
        });
        self
    }
    /// Deletes `path` (from lower layers): writes `dirname/.wh.basename`.
    pub fn whiteout(mut self, path: &str) -> Self {
        let path = path.trim_matches('/');
        let marker = match path.rsplit_once('/') {
            Some((dir, base)) => format!("{dir}/.wh.{base}"),
            None => format!(".wh.{path}"),
        };
        self.entries.push(Entry::Marker { path: marker });
        self
    }
    /// Hides everything lower layers put in `dir`: writes `dir/.wh..wh..opq`.
    pub fn opaque(mut self, dir: &str) -> Self {
        let dir = dir.trim_matches('/');
        self.entries.push(Entry::Marker {
            path: format!("{dir}/.wh..wh..opq"),
        });
        self
    }

    /// The uncompressed tar stream.
    pub fn tar(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut dirs_done: BTreeSet<String> = BTreeSet::new();
        for e in &self.entries {
            let path = match e {
                Entry::File { path, .. } | Entry::Symlink { path, .. } | Entry::Marker { path } => {
                    path.clone()
                }
                Entry::Dir { path } => path.clone(),
            };
            if self.auto_parents {
                let comps: Vec<&str> = path.split('/').collect();
                for i in 1..comps.len() {
                    let d = comps[..i].join("/");
                    if dirs_done.insert(d.clone()) {
                        append_dir(&mut b, &d);
                    }
                }
            }
            match e {
                Entry::File { path, data, mode } => {
                    let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                    b.append_data(&mut h, path, &data[..]).unwrap();
                }
                Entry::Dir { path } => {
                    if dirs_done.insert(path.clone()) || !self.auto_parents {
                        append_dir(&mut b, path);
                    }
                }
                Entry::Symlink { path, target } => {
                    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                    b.append_link(&mut h, path, target).unwrap();
                }
                Entry::Marker { path } => {
                    let mut h = header(tar::EntryType::Regular, 0o644, 0);
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    pub fn build(&self, format: Format) -> BuiltLayer {
        let tar = self.tar();
        let diff_id = digest_of(&tar);
        let blob = match self.compression {
            Compression::None => tar,
            Compression::Gzip => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(&tar).unwrap();
                enc.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(&tar[..], 3).unwrap(),
        };
        let media_type = match (format, self.compression) {
            (Format::Oci, Compression::None) => OCI_LAYER_TAR,
            (Format::Oci, Compression::Gzip) => OCI_LAYER_GZIP,
            (Format::Oci, Compression::Zstd) => OCI_LAYER_ZSTD,
            (Format::Docker, Compression::None) => DOCKER_LAYER_TAR,
            (Format::Docker, Compression::Gzip) => DOCKER_LAYER_GZIP,
            (Format::Docker, Compression::Zstd) => {
                panic!("Docker schema 2 has no zstd layer media type; use Format::Oci")
            }
        };
        BuiltLayer {
            digest: digest_of(&blob),
            diff_id,
            media_type,
            blob,
        }
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn append_dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut h, format!("{path}/"), &[][..]).unwrap();
}

#[derive(Debug, Clone)]
pub struct BuiltLayer {
    pub blob: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
    pub media_type: &'static str,
}

/// A single-platform image.
#[derive(Debug, Clone)]
pub struct Image {
    pub format: Format,
    pub os: String,
    pub arch: String,
    /// Goes into the config's labels so that images with equal layers still differ.
    pub label: String,
    pub layers: Vec<Layer>,
}

impl Image {
    pub fn oci(arch: &str) -> Self {
        Self::new(Format::Oci, arch)
    }
    pub fn docker(arch: &str) -> Self {
        Self::new(Format::Docker, arch)
    }
    pub fn new(format: Format, arch: &str) -> Self {
        Image {
            format,
            os: "linux".into(),
            arch: arch.into(),
            label: String::new(),
            layers: Vec::new(),
        }
    }
    pub fn os(mut self, os: &str) -> Self {
        self.os = os.into();
        self
    }
    pub fn label(mut self, label: &str) -> Self {
        self.label = label.into();
        self
    }
    pub fn layer(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }

    /// Builds every blob and the manifest bytes.
    pub fn build(&self) -> BuiltImage {
        let layers: Vec<BuiltLayer> = self.layers.iter().map(|l| l.build(self.format)).collect();
        let config = serde_json::to_vec(&json!({
            "architecture": self.arch,
            "os": self.os,
            "created": "2026-01-01T00:00:00Z",
            "config": { "Labels": { "bootsync.test": self.label } },
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
        }))
        .unwrap();
        let (manifest_type, config_type) = match self.format {
            Format::Oci => (OCI_MANIFEST, OCI_CONFIG),
            Format::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG),
        };
        let manifest = serde_json::to_vec_pretty(&json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {
                "mediaType": config_type,
                "size": config.len(),
                "digest": digest_of(&config),
            },
            "layers": layers.iter().map(|l| json!({
                "mediaType": l.media_type,
                "size": l.blob.len(),
                "digest": l.digest,
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        BuiltImage {
            digest: digest_of(&manifest),
            media_type: manifest_type,
            manifest,
            config_digest: digest_of(&config),
            config,
            layers,
            os: self.os.clone(),
            arch: self.arch.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// `sha256:<hex>` of `manifest`.
    pub digest: String,
    pub media_type: &'static str,
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub layers: Vec<BuiltLayer>,
    pub os: String,
    pub arch: String,
}

impl BuiltImage {
    /// The hex part of the manifest digest: bootsync's version id.
    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap()
    }
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.digest.clone()).collect()
    }
}

/// The bytes of an OCI index / Docker manifest list over `images`
/// (`platform: {architecture, os}` from each image).
pub fn index_json(format: Format, images: &[&BuiltImage]) -> (Vec<u8>, &'static str) {
    let media_type = match format {
        Format::Oci => OCI_INDEX,
        Format::Docker => DOCKER_LIST,
    };
    let bytes = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": images.iter().map(|i| json!({
            "mediaType": i.media_type,
            "size": i.manifest.len(),
            "digest": i.digest,
            "platform": { "architecture": i.arch, "os": i.os },
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    (bytes, media_type)
}

pub fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}
