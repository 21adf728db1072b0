//! Configuration: TOML parsed into raw fragments (`raw`), drop-ins merged, then validated into
//! typed settings (`validate`).

mod raw;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use crate::signature::Policy;

pub use crate::bootfile::Kind;

pub use validate::{normalize_image_path, parse_platform, preset, ConfigError, PRESETS};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// Largest single file taken from an image.
    pub max_file: u64,
    /// Most bytes one format check may decompress (an initramfs unpacks to a few times its
    /// size; more is a bomb).
    pub max_decompressed: u64,
    /// Most blob bytes one sync may download.
    pub max_download: u64,
    /// Most bytes a layer may decompress to per compressed byte (after its first 16 MiB).
    pub max_ratio: u64,
}

impl Limits {
    /// The limits of one format check.
    pub fn check(&self) -> crate::bootfile::Limits {
        crate::bootfile::Limits {
            max_decompressed: self.max_decompressed,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file: 4 << 30,
            max_decompressed: crate::bootfile::DEFAULT_MAX_DECOMPRESSED,
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
    /// Mirrors tried in order before this registry (containerd's `hosts.toml` mirrors).
    pub mirrors: Vec<Mirror>,
    /// An HTTP(S) proxy for this registry (not its mirrors), instead of the environment's.
    pub proxy: Option<ProxySettings>,
}

/// A mirror of a registry: untrusted (every digest is checked), tried before the registry
/// itself, skipped on connection errors, timeouts, 5xx, 404 and content that fails its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// `scheme://host[:port]`.
    pub base: String,
    /// `host[:port]`: how logs, `/status` and `/metrics` name it, and the key of its own
    /// credentials (a `[[registry]]` entry or `config.json` entry for that host, never the
    /// upstream's).
    pub host: String,
    /// A path the mirror puts before repository names (an ECR pull-through cache's prefix).
    pub prefix: Option<String>,
    /// Accept a TLS certificate that does not verify (plain HTTP needs no flag beyond the
    /// `http://` URL and `insecure = true`).
    pub skip_verify: bool,
    /// Also resolve tags here (else tags go to the registry, content to the mirror).
    pub resolve: bool,
    pub ca_file: Option<PathBuf>,
}

/// An explicit proxy: its URL (without credentials) and a file holding `user:password`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxySettings {
    pub url: String,
    pub credentials_file: Option<PathBuf>,
}

/// One image reference kept in step with one destination directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    /// `registry/repository:tag` or `registry/repository@sha256:...`, parsed once.
    pub reference: crate::reference::Reference,
    pub platform: Platform,
    pub dest: PathBuf,
    /// What to take from the image: one layout, or (presets) several alternatives, such as a
    /// Talos installer before and after v1.10. The first layout found complete going down the
    /// layers is published; within one layer the earlier layout wins.
    pub layouts: Vec<Layout>,
    pub hook: Option<Hook>,
    pub profile: Option<Profile>,
    /// Who must have signed what the reference resolves to (`[target.verify]`); `None`: no
    /// signature is asked for (shown as `unverified`).
    pub verify: Option<Arc<Policy>>,
}

/// One way an image may hold a target's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub files: Vec<FileSpec>,
}

impl Layout {
    /// The names this layout publishes at the top of a version.
    pub fn outputs(&self) -> Vec<String> {
        self.files.iter().flat_map(FileSpec::outputs).collect()
    }
}

impl Target {
    /// The published names of each layout, in config order.
    pub fn name_sets(&self) -> Vec<Vec<String>> {
        self.layouts.iter().map(Layout::outputs).collect()
    }
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
    /// Kernel arguments: the template's when the profile is created; when the published
    /// version comes from a UKI, they follow the UKI's command line (and win on conflict).
    pub args: Vec<String>,
}

/// `os/arch[/variant]`, as in OCI index entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform as containerd normalises it (github.com/containerd/platforms): `aarch64` is
    /// `arm64`, `arm64/v8` is plain `arm64`, `x86_64` is `amd64`, `armhf` is `arm/v7`, and so on;
    /// case is folded. Two platforms are the same when their normal forms are equal.
    pub fn normalized(&self) -> Platform {
        let os = self.os.to_ascii_lowercase();
        let arch = self.architecture.to_ascii_lowercase();
        let variant = self
            .variant
            .as_deref()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let (architecture, variant) = match arch.as_str() {
            "i386" => ("386".to_string(), String::new()),
            "x86_64" | "x86-64" | "amd64" => (
                "amd64".to_string(),
                if variant == "v1" {
                    String::new()
                } else {
                    variant
                },
            ),
            "aarch64" | "arm64" => (
                "arm64".to_string(),
                match variant.as_str() {
                    "8" | "v8" | "v8.0" => String::new(),
                    "9" | "9.0" | "v9.0" => "v9".to_string(),
                    _ => variant,
                },
            ),
            "armhf" => ("arm".to_string(), "v7".to_string()),
            "armel" => ("arm".to_string(), "v6".to_string()),
            "arm" => (
                "arm".to_string(),
                match variant.as_str() {
                    "" | "7" => "v7".to_string(),
                    "5" | "6" | "8" => format!("v{variant}"),
                    _ => variant,
                },
            ),
            _ => (arch, variant),
        };
        Platform {
            os,
            architecture,
            variant: (!variant.is_empty()).then_some(variant),
        }
    }

    /// Whether an index entry's platform is this one, after normalising both.
    pub fn same_as(&self, other: &Platform) -> bool {
        self.normalized() == other.normalized()
    }

    /// Same OS and architecture, whatever the variant (used when the config names no variant
    /// and the index holds only variants other than the default).
    pub fn same_arch(&self, other: &Platform) -> bool {
        let (a, b) = (self.normalized(), other.normalized());
        a.os == b.os && a.architecture == b.architecture
    }
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
    /// For a UKI: the names of the parts it is split into, and whether it is published too.
    pub uki: Option<UkiNames>,
}

/// What a UKI is published as: its kernel, initramfs and command line, split out for netboot,
/// and optionally the UKI itself under the spec's name (for UEFI HTTP boot or iPXE `chain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UkiNames {
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub keep: bool,
}

impl UkiNames {
    /// `<name>.vmlinuz`, `<name>.initramfs`, `<name>.cmdline`: the names a hand-written
    /// `kind = "uki"` file gets.
    pub fn after(name: &str) -> UkiNames {
        UkiNames {
            kernel: format!("{name}.vmlinuz"),
            initrd: format!("{name}.initramfs"),
            cmdline: format!("{name}.cmdline"),
            keep: false,
        }
    }
}

impl FileSpec {
    /// The names this spec publishes: its own, or for a UKI the parts split out of it (and the
    /// UKI itself when kept).
    pub fn outputs(&self) -> Vec<String> {
        match (&self.uki, self.kind) {
            (Some(u), Kind::Uki) => {
                let mut names = vec![u.kernel.clone(), u.initrd.clone(), u.cmdline.clone()];
                if u.keep {
                    names.push(self.name.clone());
                }
                names
            }
            _ => vec![self.name.clone()],
        }
    }
}

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
