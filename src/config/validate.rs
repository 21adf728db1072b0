//! Turns raw config fragments into typed [`Settings`], with errors that name the file, the key
//! and the reason.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::signature::IdentitySpec;

use super::raw::{RawConfig, RawFile, RawMirror, RawProfile, RawRegistry, RawTarget, RawVerify};
use super::{
    Backoff, FileSpec, Hook, Kind, Layout, Limits, Mirror, Modes, Platform, Policy, Profile,
    ProxySettings, RegistrySettings, Secret, Settings, Target, Timeouts, UkiNames,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid TOML: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: {key}: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

const DEFAULT_ASSETS_ROOT: &str = "/var/lib/matchbox/assets";
const DEFAULT_STATE_DIR: &str = "/var/lib/bootsync";

/// Names reserved by the on-disk layout of a destination.
const RESERVED_NAMES: &[&str] = &["current", "versions"];

struct Ctx<'a> {
    path: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn duration(
        &self,
        key: &str,
        value: Option<&str>,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        let text = value.unwrap_or(default);
        let d = humantime::parse_duration(text).map_err(|e| {
            self.err(
                key,
                format!("invalid duration {text:?}: {e} (e.g. \"30s\", \"5m\")"),
            )
        })?;
        if d.is_zero() {
            return Err(self.err(key, "must be greater than zero"));
        }
        Ok(d)
    }
}

pub(super) fn validate(
    path: &Path,
    raw: RawConfig,
    sources: Vec<PathBuf>,
) -> Result<Settings, ConfigError> {
    let cx = Ctx { path };

    let interval = cx.duration("interval", raw.interval.as_deref(), "5m")?;
    if interval < Duration::from_secs(1) {
        return Err(cx.err("interval", "must be at least 1s"));
    }
    let listen_text = raw.listen.as_deref().unwrap_or("127.0.0.1:9090");
    let listen: SocketAddr = listen_text
        .parse()
        .map_err(|_| cx.err("listen", format!("{listen_text:?} is not an address:port")))?;
    let retain = match raw.retain {
        None => 3,
        Some(n) if (1..=1000).contains(&n) => n as usize,
        Some(n) => return Err(cx.err("retain", format!("{n} is out of range 1..=1000"))),
    };
    let timeouts = Timeouts {
        connect: cx.duration("connect_timeout", raw.connect_timeout.as_deref(), "10s")?,
        request: cx.duration("request_timeout", raw.request_timeout.as_deref(), "30s")?,
        stall: cx.duration("stall_timeout", raw.stall_timeout.as_deref(), "60s")?,
    };
    let mut assets_root = PathBuf::from(raw.assets_root.as_deref().unwrap_or(DEFAULT_ASSETS_ROOT));
    if !assets_root.is_absolute() {
        // Relative to the working directory: handy for trying bootsync out in a checkout.
        let cwd = std::env::current_dir().map_err(|e| {
            cx.err(
                "assets_root",
                format!("cannot resolve a relative path: {e}"),
            )
        })?;
        assets_root = cwd.join(assets_root);
    }
    let state_dir = PathBuf::from(raw.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR));
    if !state_dir.is_absolute() {
        return Err(cx.err("state_dir", "must be an absolute path"));
    }
    let grace = match raw.grace.as_deref() {
        Some("0") | Some("0s") => Duration::ZERO,
        other => cx.duration("grace", other, "30m")?,
    };
    let max_concurrent_syncs = match raw.max_concurrent_syncs {
        None => 2,
        Some(n) if (1..=64).contains(&n) => n as usize,
        Some(n) => {
            return Err(cx.err(
                "max_concurrent_syncs",
                format!("{n} is out of range 1..=64"),
            ))
        }
    };
    let backoff = Backoff {
        start: cx.duration("backoff_start", raw.backoff_start.as_deref(), "10s")?,
        max: cx.duration("backoff_max", raw.backoff_max.as_deref(), "15m")?,
    };
    if backoff.max < backoff.start {
        return Err(cx.err("backoff_max", "must not be shorter than backoff_start"));
    }
    let defaults = Limits::default();
    let limits = Limits {
        max_file: size(
            &cx,
            "max_file_size",
            raw.max_file_size.as_deref(),
            defaults.max_file,
        )?,
        max_download: size(
            &cx,
            "max_download_size",
            raw.max_download_size.as_deref(),
            defaults.max_download,
        )?,
        max_decompressed: size(
            &cx,
            "max_decompressed_size",
            raw.max_decompressed_size.as_deref(),
            defaults.max_decompressed,
        )?,
        max_ratio: match raw.max_compression_ratio {
            None => defaults.max_ratio,
            Some(n) if n >= 2 => n as u64,
            Some(n) => {
                return Err(cx.err("max_compression_ratio", format!("{n} must be at least 2")))
            }
        },
    };
    let verify_interval = cx.duration("verify_interval", raw.verify_interval.as_deref(), "6h")?;
    let api_token = match &raw.token_file {
        Some(file) => Some(read_secret(&cx, "token_file", Path::new(file))?),
        None if !listen.ip().is_loopback() => {
            return Err(cx.err(
                "token_file",
                format!("listen {listen} is not a loopback address: set token_file so that POSTs need a bearer token"),
            ))
        }
        None => None,
    };
    let modes = Modes {
        file: mode(&cx, "file_mode", raw.file_mode.as_deref(), 0o644)?,
        dir: mode(&cx, "dir_mode", raw.dir_mode.as_deref(), 0o755)?,
        gid: match raw.group.as_deref() {
            None => None,
            Some(g) => Some(
                resolve_group(g)
                    .ok_or_else(|| cx.err("group", format!("no group {g:?} in /etc/group")))?,
            ),
        },
    };
    if let Some(level) = &raw.log_level {
        tracing_subscriber::EnvFilter::try_new(level)
            .map_err(|e| cx.err("log_level", format!("{level:?}: {e}")))?;
    }

    let mut registries = Vec::new();
    let mut hosts = HashSet::new();
    for (i, r) in raw.registry.into_iter().enumerate() {
        let reg = registry(&cx, i, r)?;
        if !hosts.insert(reg.host.clone()) {
            return Err(cx.err(
                format!("registry[{i}].host"),
                format!("duplicate registry {:?}", reg.host),
            ));
        }
        registries.push(reg);
    }

    if raw.target.is_empty() {
        return Err(cx.err("target", "at least one [[target]] is required"));
    }
    let mut targets: Vec<Target> = Vec::new();
    for (i, t) in raw.target.into_iter().enumerate() {
        let t = target(&cx, i, t, &assets_root)?;
        if let Some(other) = targets.iter().find(|o| o.name == t.name) {
            return Err(cx.err(
                format!("target[{i}].name"),
                format!("duplicate target name {:?}", other.name),
            ));
        }
        if let Some(other) = targets
            .iter()
            .find(|o| o.dest.starts_with(&t.dest) || t.dest.starts_with(&o.dest))
        {
            return Err(cx.err(
                format!("target[{i}].dest"),
                format!(
                    "{} overlaps the dest of target {:?} ({}); each target needs its own directory",
                    t.dest.display(),
                    other.name,
                    other.dest.display()
                ),
            ));
        }
        targets.push(t);
    }

    Ok(Settings {
        interval,
        listen,
        retain,
        grace,
        state_dir,
        timeouts,
        max_concurrent_syncs,
        backoff,
        verify_interval,
        api_token,
        modes,
        log_level: raw.log_level,
        docker_config: raw.docker_config.map(PathBuf::from),
        limits,
        registries,
        targets,
        sources,
    })
}

fn registry(cx: &Ctx, i: usize, r: RawRegistry) -> Result<RegistrySettings, ConfigError> {
    let key = |k: &str| format!("registry[{i}].{k}");
    let host = r.host.ok_or_else(|| cx.err(key("host"), "missing"))?;
    if host.is_empty() || host.contains('/') || host.contains("://") {
        return Err(cx.err(
            key("host"),
            format!("{host:?} must be a host[:port], without scheme or path"),
        ));
    }
    if r.password_file.is_some() != r.username.is_some() {
        return Err(cx.err(key("username"), "username and password_file go together"));
    }
    if r.token_file.is_some() && r.username.is_some() {
        return Err(cx.err(
            key("token_file"),
            "use either token_file or username/password_file",
        ));
    }
    let mirrors = r
        .mirrors
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(j, m)| mirror(cx, &key(&format!("mirrors[{j}]")), &host, m))
        .collect::<Result<Vec<_>, _>>()?;
    if r.proxy_credentials_file.is_some() && r.proxy.is_none() {
        return Err(cx.err(
            key("proxy_credentials_file"),
            "needs a proxy = \"http://host:port\"",
        ));
    }
    let proxy = match r.proxy {
        None => None,
        Some(url) => Some(ProxySettings {
            url: proxy_url(&url).map_err(|e| cx.err(key("proxy"), e))?,
            credentials_file: r.proxy_credentials_file.map(PathBuf::from),
        }),
    };
    Ok(RegistrySettings {
        host,
        insecure: r.insecure.unwrap_or(false),
        ca_file: r.ca_file.map(PathBuf::from),
        username: r.username,
        password_file: r.password_file.map(PathBuf::from),
        token_file: r.token_file.map(PathBuf::from),
        mirrors,
        proxy,
    })
}

/// A mirror URL: `http(s)://host[:port][/prefix]`, plain HTTP only with `insecure = true`.
fn mirror(cx: &Ctx, key: &str, upstream: &str, m: RawMirror) -> Result<Mirror, ConfigError> {
    let sub = |k: &str| format!("{key}.{k}");
    let text = m.url.ok_or_else(|| cx.err(sub("url"), "missing"))?;
    let url = reqwest::Url::parse(&text)
        .map_err(|e| cx.err(sub("url"), format!("{text:?} is not a URL: {e}")))?;
    let insecure = m.insecure.unwrap_or(false);
    let bad = |why: &str| cx.err(sub("url"), format!("{text:?}: {why}"));
    match url.scheme() {
        "https" => {}
        "http" if insecure => {}
        "http" => return Err(bad("plain HTTP needs insecure = true")),
        _ => return Err(bad("the scheme must be http or https")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "credentials do not belong in the URL: give the mirror's host a [[registry]] entry",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("no query or fragment"));
    }
    let host = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        (None, _) => return Err(bad("no host")),
    };
    if host == upstream {
        return Err(bad("a registry cannot be its own mirror"));
    }
    let prefix = url.path().trim_matches('/');
    let prefix = if prefix.is_empty() {
        None
    } else if prefix
        .strip_prefix("v2")
        .is_some_and(|r| r.is_empty() || r.starts_with('/'))
    {
        return Err(bad("give the mirror's root, without /v2"));
    } else {
        Some(prefix.to_string())
    };
    Ok(Mirror {
        base: format!("{}://{host}", url.scheme()),
        host,
        prefix,
        skip_verify: insecure && url.scheme() == "https",
        resolve: m.resolve.unwrap_or(true),
        ca_file: m.ca_file.map(PathBuf::from),
    })
}

/// A proxy URL: `http://` or `https://`, credentials kept out (they come from a file). The
/// messages never repeat the text: a mistyped one may hold a password.
fn proxy_url(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("the scheme must be http or https".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Say so without repeating the URL: it holds a secret.
        return Err(
            "credentials do not belong in the proxy URL: put user:password in proxy_credentials_file"
                .into(),
        );
    }
    if url.host_str().is_none() {
        return Err("no host".into());
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

fn target(cx: &Ctx, i: usize, t: RawTarget, assets_root: &Path) -> Result<Target, ConfigError> {
    let key = |k: &str| format!("target[{i}].{k}");
    let name = t.name.ok_or_else(|| cx.err(key("name"), "missing"))?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(cx.err(
            key("name"),
            format!("{name:?} may only use letters, digits, '-', '_' and '.'"),
        ));
    }
    let key = |k: &str| format!("target[{i}] ({name}).{k}");

    let reference_text = t
        .reference
        .ok_or_else(|| cx.err(key("reference"), "missing"))?;
    let reference = crate::reference::parse_reference(&reference_text)
        .map_err(|e| cx.err(key("reference"), e))?;

    let platform_text = t.platform.as_deref().unwrap_or("linux/arm64");
    let platform = parse_platform(platform_text).ok_or_else(|| {
        cx.err(
            key("platform"),
            format!("{platform_text:?} is not os/arch[/variant]"),
        )
    })?;

    let dest_text = t.dest.ok_or_else(|| cx.err(key("dest"), "missing"))?;
    let dest = clean_dest(assets_root, &dest_text).ok_or_else(|| {
        cx.err(
            key("dest"),
            format!("{dest_text:?} must be a path without '..' components"),
        )
    })?;

    let mut layouts = match t.preset.as_deref() {
        None => vec![Layout { files: Vec::new() }],
        Some(p) => preset(p, &platform.normalized().architecture).ok_or_else(|| {
            cx.err(
                key("preset"),
                format!("unknown preset {p:?} (known: {})", PRESETS.join(", ")),
            )
        })?,
    };
    let mut extra = Vec::new();
    for (j, f) in t.files.into_iter().enumerate() {
        extra.push(file_spec(
            cx,
            &format!("target[{i}] ({name}).files[{j}]"),
            f,
        )?);
    }
    let keep_uki = t.publish_uki.unwrap_or(false);
    for layout in &mut layouts {
        layout.files.extend(extra.iter().cloned());
        for f in &mut layout.files {
            if let Some(u) = &mut f.uki {
                u.keep = keep_uki;
            }
        }
    }
    if layouts.iter().all(|l| l.files.is_empty()) {
        return Err(cx.err(
            key("files"),
            "no files to take: set `preset` or add [[target.files]]",
        ));
    }
    for layout in &layouts {
        let mut names = HashSet::new();
        for f in layout.outputs() {
            if !names.insert(f.clone()) {
                return Err(cx.err(key("files"), format!("two files are published as {f:?}")));
            }
        }
    }

    let hook = match t.hook {
        None => None,
        Some(argv) if argv.is_empty() || argv[0].is_empty() => {
            return Err(cx.err(
                key("hook"),
                "needs a command: [\"/path/to/cmd\", \"arg\", ...]",
            ))
        }
        Some(argv) => Some(Hook {
            argv,
            timeout: cx.duration(&key("hook_timeout"), t.hook_timeout.as_deref(), "60s")?,
        }),
    };
    let profile = match t.profile {
        None => None,
        Some(p) => Some(profile(
            cx,
            &key("profile"),
            p,
            (&name, &layouts),
            (&dest, assets_root),
        )?),
    };

    let verify = match t.verify {
        None => None,
        Some(v) => Some(verify(cx, &key("verify"), v)?),
    };

    Ok(Target {
        name,
        reference,
        platform,
        dest,
        layouts,
        hook,
        profile,
        verify,
    })
}

/// `[target.verify]`: the keys and the trusted root are read now, so a bad one is a config
/// error (`check-config` finds it), not a failed sync.
fn verify(cx: &Ctx, key: &str, v: RawVerify) -> Result<Arc<Policy>, ConfigError> {
    let keys: Vec<PathBuf> = v
        .keys
        .unwrap_or_default()
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let identities: Vec<IdentitySpec> = v
        .identities
        .unwrap_or_default()
        .into_iter()
        .map(|i| IdentitySpec {
            issuer: i.issuer.unwrap_or_default(),
            subject: i.subject,
            subject_regexp: i.subject_regexp,
        })
        .collect();
    let root = v.trusted_root.map(PathBuf::from);
    Policy::load(&keys, &identities, root.as_deref()).map_err(|e| cx.err(key, e.to_string()))
}

fn file_spec(cx: &Ctx, key: &str, f: RawFile) -> Result<FileSpec, ConfigError> {
    let (source, is_dir) = match (f.source, f.source_dir) {
        (Some(s), None) => (s, false),
        (None, Some(s)) => (s, true),
        _ => return Err(cx.err(key, "set exactly one of `source` and `source_dir`")),
    };
    let normalised = normalize_image_path(&source).ok_or_else(|| {
        cx.err(
            format!("{key}.source"),
            format!("{source:?} is not a plain path inside the image"),
        )
    })?;
    let name = match f.name {
        Some(n) => n,
        None => normalised
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    if name.is_empty()
        || name.contains('/')
        || name.starts_with('.')
        || name.contains('\0')
        || RESERVED_NAMES.contains(&name.as_str())
    {
        return Err(cx.err(
            format!("{key}.name"),
            format!("{name:?} must be one path component, not starting with '.', and not {RESERVED_NAMES:?}"),
        ));
    }
    let kind = match f.kind {
        Some(k) => k
            .parse::<Kind>()
            .map_err(|e| cx.err(format!("{key}.kind"), e.to_string()))?,
        None if is_dir => Kind::Raw,
        None => infer_kind(&normalised, &name),
    };
    if is_dir && kind != Kind::Raw {
        return Err(cx.err(
            format!("{key}.kind"),
            "a source_dir is copied as is: only kind = \"raw\"",
        ));
    }
    let uki = (kind == Kind::Uki).then(|| UkiNames::after(&name));
    Ok(FileSpec {
        source: normalised,
        is_dir,
        name,
        kind,
        uki,
    })
}

/// Without `kind`, a file named like a kernel or an initramfs gets that check; anything else
/// is published as is. A UKI is never guessed: splitting it changes what is published.
fn infer_kind(source: &str, name: &str) -> Kind {
    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_ascii_lowercase();
    let (s, n) = (base(source), base(name));
    let any = |words: &[&str]| words.iter().any(|w| s.starts_with(w) || n.starts_with(w));
    if any(&["vmlinuz", "kernel", "bzimage"]) && !s.ends_with(".efi") {
        Kind::Kernel
    } else if any(&["initramfs", "initrd"]) {
        Kind::Initramfs
    } else {
        Kind::Raw
    }
}

/// The presets `preset` accepts.
pub const PRESETS: &[&str] = &["talos-installer", "talos-imager", "demo", "cozystack"];

/// The layouts of the common images (see README, "Presets"). Each layout of a preset publishes
/// the kernel and the initramfs under the same names, so a profile and the stable links stay
/// the same when an image moves from one layout to the other (Talos v1.9 to v1.10).
pub fn preset(name: &str, arch: &str) -> Option<Vec<Layout>> {
    let file = |source: String, name: String, kind: Kind| FileSpec {
        source,
        is_dir: false,
        name,
        kind,
        uki: None,
    };
    let (kernel, initrd) = match name {
        "cozystack" => ("vmlinuz".to_string(), "initramfs.xz".to_string()),
        _ => (format!("vmlinuz-{arch}"), format!("initramfs-{arch}.xz")),
    };
    let split = |dir: &str| Layout {
        files: vec![
            file(format!("{dir}/vmlinuz"), kernel.clone(), Kind::Kernel),
            file(
                format!("{dir}/initramfs.xz"),
                initrd.clone(),
                Kind::Initramfs,
            ),
        ],
    };
    // Talos >= v1.10 installers ship only a UKI: split it into the same two names.
    let uki = |dir: &str| Layout {
        files: vec![FileSpec {
            source: format!("{dir}/vmlinuz.efi"),
            is_dir: false,
            name: format!("{kernel}.efi"),
            kind: Kind::Uki,
            uki: Some(UkiNames {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: kernel.replacen("vmlinuz", "cmdline", 1),
                keep: false,
            }),
        }],
    };
    Some(match name {
        "talos-installer" | "talos-imager" => {
            let dir = format!("usr/install/{arch}");
            vec![split(&dir), uki(&dir)]
        }
        "demo" => vec![
            split(&format!("assets/talos/{arch}")),
            split(&format!("assets/talos/{arch}/boot")),
            uki(&format!("usr/install/{arch}")),
        ],
        "cozystack" => vec![split("var/lib/matchbox/assets")],
        _ => return None,
    })
}

type TargetParts<'a> = (&'a str, &'a [Layout]);

/// The kernel and initramfs a profile names when the config does not say: the parts of the one
/// UKI, else the one kernel and the initramfs files, of the first layout (presets give every
/// layout the same names).
fn default_boot_files(layouts: &[Layout]) -> Option<(String, Vec<String>)> {
    let files = &layouts.first()?.files;
    let ukis: Vec<&UkiNames> = files.iter().filter_map(|f| f.uki.as_ref()).collect();
    if let [u] = ukis.as_slice() {
        return Some((u.kernel.clone(), vec![u.initrd.clone()]));
    }
    let kernels: Vec<&FileSpec> = files.iter().filter(|f| f.kind == Kind::Kernel).collect();
    let initrds: Vec<String> = files
        .iter()
        .filter(|f| f.kind == Kind::Initramfs)
        .map(|f| f.name.clone())
        .collect();
    match (kernels.as_slice(), initrds.is_empty()) {
        ([k], false) if ukis.is_empty() => Some((k.name.clone(), initrds)),
        _ => None,
    }
}

fn profile(
    cx: &Ctx,
    key: &str,
    p: RawProfile,
    (target_name, layouts): TargetParts,
    (dest, assets_root): (&Path, &Path),
) -> Result<Profile, ConfigError> {
    let k = |sub: &str| format!("{key}.{sub}");
    let path = PathBuf::from(p.path.ok_or_else(|| cx.err(k("path"), "missing"))?);
    if !path.is_absolute() || path.extension().is_none_or(|e| e != "json") {
        return Err(cx.err(k("path"), "must be an absolute path to a .json profile"));
    }
    let url_prefix = match p.url_prefix {
        Some(u) if u.starts_with('/') => u.trim_end_matches('/').to_string(),
        Some(u) => return Err(cx.err(k("url_prefix"), format!("{u:?} must start with '/'"))),
        // matchbox serves its assets directory at /assets/.
        None => match dest.strip_prefix(assets_root) {
            Ok(rel) => format!("/assets/{}", rel.display()),
            Err(_) => {
                return Err(cx.err(
                    k("url_prefix"),
                    "dest is outside assets_root: say under which URL matchbox serves it",
                ))
            }
        },
    };
    let defaults = default_boot_files(layouts);
    let kernel = match (p.kernel, &defaults) {
        (Some(k), _) => k,
        (None, Some((kernel, _))) => kernel.clone(),
        (None, None) => return Err(cx.err(k("kernel"), "missing: name the published kernel file")),
    };
    let initrd = match (p.initrd, &defaults) {
        (Some(i), _) => i,
        (None, Some((_, initrd))) => initrd.clone(),
        (None, None) => {
            return Err(cx.err(k("initrd"), "missing: name the published initramfs file(s)"))
        }
    };
    for layout in layouts {
        for n in std::iter::once(&kernel).chain(&initrd) {
            if !layout
                .files
                .iter()
                .any(|f| !f.is_dir && f.outputs().contains(n))
            {
                return Err(cx.err(
                    k("kernel"),
                    format!("{n:?} is not one of this target's published files"),
                ));
            }
        }
    }
    let default_id = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Profile {
        path,
        url_prefix,
        kernel,
        initrd,
        template_id: p.id.unwrap_or(default_id),
        template_name: p.name.unwrap_or_else(|| target_name.to_string()),
        args: p.args.unwrap_or_default(),
    })
}

/// A byte size: a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB; case-insensitive).
fn size(cx: &Ctx, key: &str, text: Option<&str>, default: u64) -> Result<u64, ConfigError> {
    let Some(text) = text else { return Ok(default) };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(cx.err(
                key,
                format!("{text:?}: unknown unit (use B, KB, MB, GB, KiB, MiB or GiB)"),
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            cx.err(
                key,
                format!("{text:?} is not a positive size like \"2GiB\""),
            )
        })
}

fn read_secret(cx: &Ctx, key: &str, file: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| cx.err(key, format!("{}: {e}", file.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(cx.err(key, format!("{} is empty", file.display())));
    }
    Ok(Secret(token.to_string()))
}

fn mode(cx: &Ctx, key: &str, text: Option<&str>, default: u32) -> Result<u32, ConfigError> {
    let Some(text) = text else { return Ok(default) };
    let m = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .map_err(|_| cx.err(key, format!("{text:?} is not an octal mode like \"0644\"")))?;
    if m > 0o777 {
        return Err(cx.err(
            key,
            format!("{text:?}: only permission bits (at most 0777)"),
        ));
    }
    if m & 0o400 == 0 || m & 0o044 == 0 {
        return Err(cx.err(
            key,
            format!("{text:?} would hide published files from the owner or from matchbox"),
        ));
    }
    Ok(m)
}

/// A group name (looked up in /etc/group) or a numeric gid.
fn resolve_group(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse() {
        return Some(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

/// `os/arch[/variant]`.
pub fn parse_platform(text: &str) -> Option<Platform> {
    let mut parts = text.split('/');
    let os = parts.next().filter(|s| !s.is_empty())?;
    let architecture = parts.next().filter(|s| !s.is_empty())?;
    let variant = match parts.next() {
        Some("") => return None,
        v => v.map(str::to_string),
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Platform {
        os: os.to_string(),
        architecture: architecture.to_string(),
        variant,
    })
}

/// Normalises a path inside an image the way tar entries are compared: strips a leading `/` or
/// `./`, folds `.` and repeated slashes; refuses `..`, NUL and empty paths.
pub fn normalize_image_path(path: &str) -> Option<String> {
    if path.contains('\0') {
        return None;
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

fn clean_dest(assets_root: &Path, text: &str) -> Option<PathBuf> {
    if text.is_empty() {
        return None;
    }
    let joined = assets_root.join(text);
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => return None,
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    (out.parent().is_some()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Settings::parse(Path::new("/etc/bootsync/test.toml"), text)
    }

    fn err(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    const MINIMAL: &str = r#"
[[target]]
name = "t"
reference = "ghcr.io/urmanac/talos-cozystack-demo:demo-stable"
dest = "talos"
preset = "demo"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let s = parse(MINIMAL).unwrap();
        assert_eq!(s.interval, Duration::from_secs(300));
        assert_eq!(s.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(s.retain, 3);
        assert_eq!(s.timeouts.request, Duration::from_secs(30));
        let t = &s.targets[0];
        assert_eq!(t.platform.to_string(), "linux/arm64");
        assert_eq!(t.dest, PathBuf::from("/var/lib/matchbox/assets/talos"));
        assert_eq!(
            t.reference.whole(),
            "ghcr.io/urmanac/talos-cozystack-demo:demo-stable"
        );
        assert_eq!(
            t.layouts[0].files,
            vec![
                FileSpec {
                    source: "assets/talos/arm64/vmlinuz".into(),
                    is_dir: false,
                    name: "vmlinuz-arm64".into(),
                    kind: Kind::Kernel,
                    uki: None,
                },
                FileSpec {
                    source: "assets/talos/arm64/initramfs.xz".into(),
                    is_dir: false,
                    name: "initramfs-arm64.xz".into(),
                    kind: Kind::Initramfs,
                    uki: None,
                },
            ]
        );
        // the demo images have been seen in three layouts; each publishes the same names
        assert_eq!(t.layouts.len(), 3);
        for names in t.name_sets() {
            assert!(names.contains(&"vmlinuz-arm64".to_string()), "{names:?}");
            assert!(
                names.contains(&"initramfs-arm64.xz".to_string()),
                "{names:?}"
            );
        }
    }

    #[test]
    fn mirrors_and_proxies_are_parsed_and_checked() {
        let with = |block: &str| format!("{MINIMAL}\n[[registry]]\nhost = \"ghcr.io\"\n{block}\n");
        let s = parse(&with(
            r#"mirrors = [
  { url = "http://mirror.site:5000", insecure = true },
  { url = "https://123.dkr.ecr.us-east-1.amazonaws.com/ghcr/", resolve = false },
]
proxy = "http://proxy.corp:3128/"
proxy_credentials_file = "/etc/bootsync/proxy""#,
        ))
        .unwrap();
        let r = s.registry("ghcr.io");
        assert_eq!(r.mirrors.len(), 2);
        let (m0, m1) = (&r.mirrors[0], &r.mirrors[1]);
        assert_eq!(
            (
                m0.base.as_str(),
                m0.host.as_str(),
                m0.prefix.as_deref(),
                m0.resolve
            ),
            ("http://mirror.site:5000", "mirror.site:5000", None, true)
        );
        assert_eq!(
            (
                m1.base.as_str(),
                m1.prefix.as_deref(),
                m1.resolve,
                m1.skip_verify
            ),
            (
                "https://123.dkr.ecr.us-east-1.amazonaws.com",
                Some("ghcr"),
                false,
                false
            )
        );
        let p = r.proxy.unwrap();
        assert_eq!(p.url, "http://proxy.corp:3128");
        assert_eq!(
            p.credentials_file,
            Some(PathBuf::from("/etc/bootsync/proxy"))
        );

        for (block, needle) in [
            (
                r#"mirrors = [{ url = "http://m:5000" }]"#,
                "plain HTTP needs insecure = true",
            ),
            (r#"mirrors = [{ url = "ftp://m" }]"#, "scheme"),
            (
                r#"mirrors = [{ url = "https://u:p@m" }]"#,
                "credentials do not belong",
            ),
            (r#"mirrors = [{ url = "https://m/v2/" }]"#, "without /v2"),
            (
                r#"mirrors = [{ url = "https://ghcr.io" }]"#,
                "its own mirror",
            ),
            (r#"mirrors = [{ insecure = true }]"#, "mirrors[0].url"),
            (r#"mirrors = [{ url = "https://m", colour = 1 }]"#, "colour"),
            (r#"proxy_credentials_file = "/x""#, "needs a proxy"),
            (r#"proxy = "socks5://p:1080""#, "http or https"),
        ] {
            let e = err(&with(block));
            assert!(e.contains(needle), "{block}: {e}");
        }
        // A proxy URL with a password in it is refused without repeating it.
        let e = err(&with(r#"proxy = "http://robot:hunter2@p:3128""#));
        assert!(
            e.contains("proxy_credentials_file") && !e.contains("hunter2"),
            "{e}"
        );
        let e = err(&with(r#"proxy = "http://robot:hunter2@""#));
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn the_documented_example_is_valid() {
        let text = include_str!("../../config/bootsync.example.toml");
        let s = parse(text).unwrap();
        assert!(!s.targets.is_empty());
    }

    #[test]
    fn short_references_are_canonicalised() {
        let s = parse(&MINIMAL.replace(
            "ghcr.io/urmanac/talos-cozystack-demo:demo-stable",
            "busybox",
        ))
        .unwrap();
        assert_eq!(
            s.targets[0].reference.whole(),
            "docker.io/library/busybox:latest"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = err(&format!("intervall = \"5m\"\n{MINIMAL}"));
        assert!(e.contains("intervall") && e.contains("test.toml"), "{e}");
        let e = err(&format!("{MINIMAL}\ncolour = \"red\"\n"));
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn bad_durations_are_rejected() {
        let e = err(&format!("interval = \"5 parsecs\"\n{MINIMAL}"));
        assert!(
            e.contains("interval") && e.contains("invalid duration"),
            "{e}"
        );
        let e = err(&format!("stall_timeout = \"0s\"\n{MINIMAL}"));
        assert!(e.contains("stall_timeout"), "{e}");
    }

    #[test]
    fn duplicate_names_and_dests_are_rejected() {
        let two = format!(
            "{MINIMAL}{}",
            MINIMAL.replace("dest = \"talos\"", "dest = \"other\"")
        );
        let e = err(&two);
        assert!(
            e.contains("target[1].name") && e.contains("duplicate"),
            "{e}"
        );
        let two = format!(
            "{MINIMAL}{}",
            MINIMAL.replace("name = \"t\"", "name = \"u\"")
        );
        let e = err(&two);
        assert!(
            e.contains("target[1]") && e.contains("dest") && e.contains("overlaps"),
            "{e}"
        );
        let nested = MINIMAL
            .replace("name = \"t\"", "name = \"u\"")
            .replace("\"talos\"", "\"talos/sub\"");
        assert!(err(&format!("{MINIMAL}{nested}")).contains("overlaps"));
    }

    #[test]
    fn files_are_checked() {
        let base = "[[target]]\nname = \"t\"\nreference = \"r.example/a:b\"\ndest = \"/srv/a\"\n";
        let e = err(base);
        assert!(e.contains("no files"), "{e}");
        let e = err(&format!(
            "{base}[[target.files]]\nsource = \"../etc/passwd\"\n"
        ));
        assert!(e.contains("files[0].source"), "{e}");
        let e = err(&format!(
            "{base}[[target.files]]\nsource = \"a/b\"\nsource_dir = \"a\"\n"
        ));
        assert!(e.contains("exactly one"), "{e}");
        let e = err(&format!(
            "{base}[[target.files]]\nsource = \"a/b\"\nname = \"current\"\n"
        ));
        assert!(e.contains("files[0].name"), "{e}");
        let e = err(&format!(
            "{base}[[target.files]]\nsource = \"a/k\"\nname = \"k\"\n[[target.files]]\nsource = \"b/k\"\n"
        ));
        assert!(e.contains("two files"), "{e}");
        let s = parse(&format!(
            "{base}[[target.files]]\nsource = \"/./usr//install/k\"\n"
        ))
        .unwrap();
        assert_eq!(s.targets[0].layouts[0].files[0].source, "usr/install/k");
        assert_eq!(s.targets[0].layouts[0].files[0].name, "k");
    }

    #[test]
    fn other_fields_are_checked() {
        assert!(
            err(&MINIMAL.replace("preset = \"demo\"", "preset = \"nope\""))
                .contains("unknown preset")
        );
        assert!(err(&format!("retain = 0\n{MINIMAL}")).contains("retain"));
        assert!(err(&format!("listen = \"localhost\"\n{MINIMAL}")).contains("listen"));
        assert!(err(&MINIMAL.replace("dest = \"talos\"", "dest = \"../etc\"")).contains("dest"));
        assert!(err(&format!("{MINIMAL}platform = \"arm64\"\n")).contains("platform"));
        let rel = parse(&format!("assets_root = \"assets\"\n{MINIMAL}")).unwrap();
        assert_eq!(
            rel.targets[0].dest,
            std::env::current_dir().unwrap().join("assets/talos")
        );
        assert!(err(&MINIMAL.replace(":demo-stable", ":Bad Tag!")).contains("reference"));
        let reg = "[[registry]]\nhost = \"https://x\"\n";
        assert!(err(&format!("{reg}{MINIMAL}")).contains("registry[0].host"));
        let reg = "[[registry]]\nhost = \"x:5000\"\nusername = \"u\"\n";
        assert!(err(&format!("{reg}{MINIMAL}")).contains("password_file"));
        assert!(err("interval = \"5m\"\n").contains("at least one [[target]]"));
        assert!(err("interval = [").contains("invalid TOML"));
    }

    #[test]
    fn kinds_are_set_by_presets_inferred_or_explicit() {
        let base = "[[target]]\nname = \"t\"\nreference = \"r.example/a:b\"\ndest = \"/srv/a\"\n";
        let s = parse(&format!(
            "{base}[[target.files]]\nsource = \"a/vmlinuz\"\n[[target.files]]\nsource = \"a/initramfs.xz\"\n\
             [[target.files]]\nsource = \"a/boot.cfg\"\n[[target.files]]\nsource = \"a/x\"\nname = \"k\"\nkind = \"kernel\"\n"
        ))
        .unwrap();
        let kinds: Vec<Kind> = s.targets[0].layouts[0]
            .files
            .iter()
            .map(|f| f.kind)
            .collect();
        assert_eq!(
            kinds,
            [Kind::Kernel, Kind::Initramfs, Kind::Raw, Kind::Kernel]
        );

        let s = parse(&format!("{base}[[target.files]]\nsource = \"usr/install/arm64/vmlinuz.efi\"\nname = \"talos\"\nkind = \"uki\"\n")).unwrap();
        assert_eq!(
            s.targets[0].layouts[0].files[0].outputs(),
            ["talos.vmlinuz", "talos.initramfs", "talos.cmdline"]
        );
        // a UKI named like a kernel is not guessed to be a plain kernel
        let s = parse(&format!(
            "{base}[[target.files]]\nsource = \"usr/install/arm64/vmlinuz.efi\"\n"
        ))
        .unwrap();
        assert_eq!(s.targets[0].layouts[0].files[0].kind, Kind::Raw);

        assert!(err(&format!(
            "{base}[[target.files]]\nsource = \"a\"\nkind = \"elf\"\n"
        ))
        .contains("unknown kind"));
        assert!(err(&format!(
            "{base}[[target.files]]\nsource_dir = \"a\"\nkind = \"kernel\"\n"
        ))
        .contains("only kind"));
    }

    #[test]
    fn talos_installer_takes_both_layouts_and_the_profile_follows_the_uki() {
        let text = MINIMAL.replace(
            "preset = \"demo\"",
            "preset = \"talos-installer\"\npublish_uki = true",
        );
        let s = parse(&format!(
            "{text}[target.profile]\npath = \"/var/lib/matchbox/profiles/t.json\"\n"
        ))
        .unwrap();
        let t = &s.targets[0];
        assert_eq!(
            t.name_sets(),
            [
                vec![
                    "vmlinuz-arm64".to_string(),
                    "initramfs-arm64.xz".to_string()
                ],
                vec![
                    "vmlinuz-arm64".to_string(),
                    "initramfs-arm64.xz".to_string(),
                    "cmdline-arm64".to_string(),
                    "vmlinuz-arm64.efi".to_string()
                ]
            ]
        );
        assert_eq!(
            t.layouts[1].files[0].source,
            "usr/install/arm64/vmlinuz.efi"
        );
        let p = t.profile.as_ref().unwrap();
        assert_eq!(p.kernel, "vmlinuz-arm64");
        // a hand-written UKI: the profile takes its parts without being told
        let base = "[[target]]\nname = \"t\"\nreference = \"r.example/a:b\"\ndest = \"/srv/a\"\n";
        let s = parse(&format!("{base}[[target.files]]\nsource = \"v.efi\"\nname = \"talos\"\nkind = \"uki\"\n[target.profile]\npath = \"/p/x.json\"\nurl_prefix = \"/assets/a\"\n")).unwrap();
        let p = s.targets[0].profile.as_ref().unwrap();
        assert_eq!(
            (p.kernel.as_str(), p.initrd.as_slice()),
            ("talos.vmlinuz", &["talos.initramfs".to_string()][..])
        );
    }

    #[test]
    fn profiles_default_from_presets_and_dest() {
        let s = parse(&format!("{MINIMAL}[target.profile]\npath = \"/var/lib/matchbox/profiles/talos.json\"\nargs = [\"talos.platform=metal\"]\n")).unwrap();
        let p = s.targets[0].profile.as_ref().unwrap();
        assert_eq!(p.url_prefix, "/assets/talos");
        assert_eq!(p.kernel, "vmlinuz-arm64");
        assert_eq!(p.initrd, ["initramfs-arm64.xz"]);
        assert_eq!(p.template_id, "talos");
        let e = err(&format!(
            "{MINIMAL}[target.profile]\npath = \"/p/x.json\"\nkernel = \"nope\"\n"
        ));
        assert!(
            e.contains("not one of this target's published files"),
            "{e}"
        );
    }

    #[test]
    fn api_token_is_required_off_loopback() {
        let e = err(&format!("listen = \"0.0.0.0:9090\"\n{MINIMAL}"));
        assert!(e.contains("token_file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let s = parse(&format!(
            "listen = \"0.0.0.0:9090\"\ntoken_file = {:?}\n{MINIMAL}",
            token
        ))
        .unwrap();
        assert_eq!(s.api_token.unwrap().0, "s3cret");
        std::fs::write(&token, "").unwrap();
        assert!(err(&format!("token_file = {:?}\n{MINIMAL}", token)).contains("empty"));
    }

    #[test]
    fn modes_and_groups_are_checked() {
        let s = parse(&format!(
            "file_mode = \"0640\"\ndir_mode = \"0750\"\ngroup = \"0\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            s.modes,
            Modes {
                file: 0o640,
                dir: 0o750,
                gid: Some(0)
            }
        );
        assert!(err(&format!("file_mode = \"0600\"\n{MINIMAL}")).contains("hide"));
        assert!(err(&format!("file_mode = \"rw\"\n{MINIMAL}")).contains("octal"));
        assert!(err(&format!("group = \"no-such-group-here\"\n{MINIMAL}")).contains("no group"));
    }

    #[test]
    fn drop_ins_are_merged_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("bootsync.toml");
        std::fs::write(&main, format!("interval = \"5m\"\n{MINIMAL}")).unwrap();
        std::fs::create_dir(dir.path().join("config.d")).unwrap();
        std::fs::write(
            dir.path().join("config.d/20-late.toml"),
            "interval = \"3m\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config.d/10-early.toml"),
            "interval = \"1m\"\nretain = 7\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("config.d/ignored.txt"), "garbage").unwrap();
        let s = Settings::load(&main).unwrap();
        assert_eq!(s.interval, Duration::from_secs(180));
        assert_eq!(s.retain, 7);
        assert_eq!(s.sources.len(), 3);
        std::fs::write(dir.path().join("config.d/30-bad.toml"), "retian = 1\n").unwrap();
        let e = Settings::load(&main).unwrap_err().to_string();
        assert!(e.contains("30-bad.toml") && e.contains("retian"), "{e}");
    }

    #[test]
    fn sizes_parse() {
        let s = parse(&format!(
            "max_file_size = \"512MiB\"\nmax_download_size = \"3GB\"\nmax_decompressed_size = \"2GiB\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(s.limits.max_file, 512 << 20);
        assert_eq!(s.limits.max_download, 3_000_000_000);
        assert_eq!(s.limits.max_decompressed, 2 << 30);
        assert!(err(&format!("max_file_size = \"12 parsecs\"\n{MINIMAL}")).contains("unknown unit"));
        assert!(err(&format!("max_file_size = \"0\"\n{MINIMAL}")).contains("positive"));
        assert!(err(&format!("max_compression_ratio = 1\n{MINIMAL}")).contains("at least 2"));
    }

    #[test]
    fn platforms_parse() {
        assert_eq!(
            parse_platform("linux/arm64/v8").unwrap().variant.as_deref(),
            Some("v8")
        );
        assert!(parse_platform("linux").is_none());
        assert!(parse_platform("linux//").is_none());
        assert!(parse_platform("a/b/c/d").is_none());
    }
}
