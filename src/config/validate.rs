//! Turns raw config fragments into typed [`Settings`], with errors that name the file, the key
//! and the reason.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::raw::{RawConfig, RawFile, RawRegistry, RawTarget};
use super::{FileSpec, Platform, RegistrySettings, Settings, Target, Timeouts};

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

pub(super) fn validate(path: &Path, raw: RawConfig) -> Result<Settings, ConfigError> {
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
        timeouts,
        registries,
        targets,
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
    Ok(RegistrySettings {
        host,
        insecure: r.insecure.unwrap_or(false),
        ca_file: r.ca_file.map(PathBuf::from),
        username: r.username,
        password_file: r.password_file.map(PathBuf::from),
        token_file: r.token_file.map(PathBuf::from),
    })
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
    let reference: oci_client::Reference = reference_text
        .parse()
        .map_err(|e| cx.err(key("reference"), format!("{reference_text:?}: {e}")))?;

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

    let mut files = match t.preset.as_deref() {
        None => Vec::new(),
        Some(p) => preset(p, &platform.architecture).ok_or_else(|| {
            cx.err(
                key("preset"),
                format!(
                    "unknown preset {p:?} (known: talos-installer, talos-imager, cozystack, demo)"
                ),
            )
        })?,
    };
    for (j, f) in t.files.into_iter().enumerate() {
        files.push(file_spec(
            cx,
            &format!("target[{i}] ({name}).files[{j}]"),
            f,
        )?);
    }
    if files.is_empty() {
        return Err(cx.err(
            key("files"),
            "no files to take: set `preset` or add [[target.files]]",
        ));
    }
    let mut names = HashSet::new();
    for f in &files {
        if !names.insert(f.name.as_str()) {
            return Err(cx.err(
                key("files"),
                format!("two files are published as {:?}", f.name),
            ));
        }
    }

    Ok(Target {
        name,
        reference: reference.whole(),
        platform,
        dest,
        files,
    })
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
    Ok(FileSpec {
        source: normalised,
        is_dir,
        name,
    })
}

/// The file sets of the common image layouts (see README, "Presets").
fn preset(name: &str, arch: &str) -> Option<Vec<FileSpec>> {
    let file = |source: String, name: String| FileSpec {
        source,
        is_dir: false,
        name,
    };
    let (dir, kernel, initrd) = match name {
        "talos-installer" | "talos-imager" => (
            format!("usr/install/{arch}"),
            format!("vmlinuz-{arch}"),
            format!("initramfs-{arch}.xz"),
        ),
        "demo" => (
            format!("assets/talos/{arch}"),
            format!("vmlinuz-{arch}"),
            format!("initramfs-{arch}.xz"),
        ),
        "cozystack" => (
            "var/lib/matchbox/assets".to_string(),
            "vmlinuz".to_string(),
            "initramfs.xz".to_string(),
        ),
        _ => return None,
    };
    Some(vec![
        file(format!("{dir}/vmlinuz"), kernel),
        file(format!("{dir}/initramfs.xz"), initrd),
    ])
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
            t.reference,
            "ghcr.io/urmanac/talos-cozystack-demo:demo-stable"
        );
        assert_eq!(
            t.files,
            vec![
                FileSpec {
                    source: "assets/talos/arm64/vmlinuz".into(),
                    is_dir: false,
                    name: "vmlinuz-arm64".into()
                },
                FileSpec {
                    source: "assets/talos/arm64/initramfs.xz".into(),
                    is_dir: false,
                    name: "initramfs-arm64.xz".into()
                },
            ]
        );
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
        assert_eq!(s.targets[0].reference, "docker.io/library/busybox:latest");
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
        assert_eq!(s.targets[0].files[0].source, "usr/install/k");
        assert_eq!(s.targets[0].files[0].name, "k");
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
