//! Configuration: TOML parsed into raw fragments (`raw`), then validated into typed settings.

mod raw;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use validate::{normalize_image_path, ConfigError};

/// The default location of the config file.
pub const DEFAULT_PATH: &str = "/etc/bootsync/bootsync.toml";

/// Validated settings for the whole daemon.
#[derive(Debug, Clone)]
pub struct Settings {
    pub interval: Duration,
    pub listen: SocketAddr,
    pub retain: usize,
    pub timeouts: Timeouts,
    pub registries: Vec<RegistrySettings>,
    pub targets: Vec<Target>,
}

/// Time limits for every network call.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP + TLS connect.
    pub connect: Duration,
    /// A whole token, HEAD or manifest request.
    pub request: Duration,
    /// The longest a blob download may go without receiving a byte.
    pub stall: Duration,
}

/// Per-registry settings, matched by `host` (as written in references, with port).
#[derive(Debug, Clone, Default)]
pub struct RegistrySettings {
    pub host: String,
    /// Talk plain HTTP (a local registry or mirror).
    pub insecure: bool,
    /// An extra PEM CA bundle to trust.
    pub ca_file: Option<PathBuf>,
    /// Basic credentials; the password is read from the file at each sync so it can rotate.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// A bearer token sent as is (read at each sync).
    pub token_file: Option<PathBuf>,
}

/// One image reference kept in step with one destination directory.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    /// Canonical `registry/repository:tag` or `registry/repository@sha256:...`.
    pub reference: String,
    pub platform: Platform,
    pub dest: PathBuf,
    pub files: Vec<FileSpec>,
}

/// `os/arch[/variant]`, as in OCI index entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// What to take from the image and under which name to publish it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Normalised path inside the image: no leading `/`, no `.` or `..` components.
    pub source: String,
    /// A single file, or a directory copied whole.
    pub is_dir: bool,
    /// Name in the published version (a single path component).
    pub name: String,
}

impl Settings {
    /// Reads and validates the config file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::parse(path, &text)
    }

    /// Validates config text; `path` is only used in messages and to resolve relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        validate::validate(path, raw)
    }

    /// The settings of the registry `host`, or defaults (HTTPS, anonymous).
    pub fn registry(&self, host: &str) -> RegistrySettings {
        self.registries
            .iter()
            .find(|r| r.host == host)
            .cloned()
            .unwrap_or_else(|| RegistrySettings {
                host: host.to_string(),
                ..Default::default()
            })
    }
}
