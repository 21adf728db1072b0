//! Configuration: TOML parsed into raw fragments (`raw`), drop-ins merged, then validated into
//! typed settings (`validate`).

mod raw;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::assets::Kind;

pub use validate::{normalize_image_path, ConfigError};

/// The default location of the config file.
pub const DEFAULT_PATH: &str = "/etc/bootsync/bootsync.toml";

/// Validated settings for the whole daemon.
#[derive(Debug, Clone)]
pub struct Settings {
    pub interval: Duration,
    pub listen: SocketAddr,
    pub retain: usize,
    /// A version that stopped being current less than this long ago is never deleted.
    pub grace: Duration,
    /// Pins and other state that is not part of a served tree.
    pub state_dir: PathBuf,
    pub timeouts: Timeouts,
    pub max_concurrent_syncs: usize,
    pub backoff: Backoff,
    /// How often the current version of every target is re-hashed to catch silent corruption.
    pub verify_interval: Duration,
    /// Required for POSTs to the API (always set when `listen` is not a loopback address).
    pub api_token: Option<Secret>,
    pub modes: Modes,
    pub log_level: Option<String>,
    /// A Docker `config.json` whose `auths` provide registry credentials.
    pub docker_config: Option<PathBuf>,
    pub limits: Limits,
    pub registries: Vec<RegistrySettings>,
    pub targets: Vec<Target>,
    /// The files this was read from: the main file, then drop-ins in the order applied.
    pub sources: Vec<PathBuf>,
}

/// A secret read from a file: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
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

/// Caps that keep a hostile or broken image from filling the disk or spinning the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest single file taken from an image (and decompressed by a format check).
    pub max_file: u64,
    /// Most blob bytes one sync may download.
    pub max_download: u64,
    /// Most bytes a layer may decompress to per compressed byte (after its first 16 MiB).
    pub max_ratio: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file: 4 << 30,
            max_download: 16 << 30,
            max_ratio: 100,
        }
    }
}

/// Retry delays after failed syncs.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub start: Duration,
    pub max: Duration,
}

/// Permissions of everything published, so that matchbox (another user) can read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    pub file: u32,
    pub dir: u32,
    /// Group given to published files and directories.
    pub gid: Option<u32>,
}

impl Default for Modes {
    fn default() -> Self {
        Modes {
            file: 0o644,
            dir: 0o755,
            gid: None,
        }
    }
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    /// Canonical `registry/repository:tag` or `registry/repository@sha256:...`.
    pub reference: String,
    pub platform: Platform,
    pub dest: PathBuf,
    pub files: Vec<FileSpec>,
    pub hook: Option<Hook>,
    pub profile: Option<Profile>,
}

/// A command run after each publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub argv: Vec<String>,
    pub timeout: Duration,
}

/// A matchbox profile kept pointing at the version-specific paths of the current version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub path: PathBuf,
    /// The URL path under which matchbox serves `dest`, e.g. `/assets/talos/custom`.
    pub url_prefix: String,
    /// Published name of the kernel, and of the initramfs files in order.
    pub kernel: String,
    pub initrd: Vec<String>,
    /// Used only when the profile file does not exist yet.
    pub template_id: String,
    pub template_name: String,
    pub template_args: Vec<String>,
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
    /// Which format check the file gets before it is published.
    pub kind: Kind,
}

impl FileSpec {
    /// The names this spec publishes: its own, or for a UKI the three parts split out of it.
    pub fn outputs(&self) -> Vec<String> {
        match self.kind {
            Kind::Uki => UKI_PARTS
                .iter()
                .map(|part| format!("{}.{part}", self.name))
                .collect(),
            _ => vec![self.name.clone()],
        }
    }
}

/// What a UKI is split into: `<name>.vmlinuz`, `<name>.initramfs`, `<name>.cmdline`.
pub const UKI_PARTS: [&str; 3] = ["vmlinuz", "initramfs", "cmdline"];

impl Settings {
    /// Reads the config file and the drop-ins in `config.d/*.toml` beside it (in name order),
    /// and validates the result.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let mut merged = read_fragment(path)?;
        let mut sources = vec![path.to_path_buf()];
        for dropin in drop_ins(path)? {
            raw::merge(&mut merged, read_fragment(&dropin)?);
            sources.push(dropin);
        }
        let raw: raw::RawConfig =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    message: format!("after merging drop-ins: {e}"),
                })?;
        validate::validate(path, raw, sources)
    }

    /// Validates config text; `path` is only used in messages.
    #[cfg(test)]
    pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        validate::validate(path, raw, vec![path.to_path_buf()])
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

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }
}

/// The drop-in directory of a config file.
pub fn drop_in_dir(path: &Path) -> PathBuf {
    path.parent().unwrap_or(Path::new(".")).join("config.d")
}

fn drop_ins(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = drop_in_dir(path);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::Read { path: dir, source }),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Parses one file; unknown keys are reported against the file that has them.
fn read_fragment(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        source: e,
    })?;
    let syntax = |e: toml::de::Error| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    toml::from_str::<raw::RawConfig>(&text).map_err(syntax)?;
    toml::from_str::<toml::Table>(&text).map_err(syntax)
}
