//! `bootsync inspect REFERENCE`: what an image offers for netboot, before any config is
//! written. The platforms of its index, the chosen manifest's layers, every boot-file-like file
//! (read top-down, streamed and verified, only until a layer holds a kernel or a UKI) with its
//! checked format, and a ready `[[target]]` snippet. Nothing is written but a private scratch
//! directory, removed on exit.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::bootfile::Kind;
use crate::config::{Limits, Platform, RegistrySettings, Settings, Timeouts};
use crate::digest::Digest;
use crate::pipeline::{self, Candidate, PipelineError};
use crate::registry::{
    Access, Clients, Credentials, HelperCache, Observer, Registry, RegistryError,
};
use crate::signature::Claim;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("invalid reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("invalid platform {0:?}: expected os/arch[/variant]")]
    Platform(String),
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Pipeline(#[from] PipelineError),
    #[error("scratch directory {}: {source}", path.display())]
    Scratch {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `inspect` found (printed as text, or as this JSON with `--json`).
#[derive(Debug, Serialize)]
pub struct Report {
    pub reference: String,
    /// What the reference resolved to.
    pub digest: Digest,
    /// The platforms the index offers (empty for a single-platform image).
    pub platforms: Vec<String>,
    pub platform: String,
    /// The chosen image manifest.
    pub manifest: Digest,
    pub layers: Vec<LayerInfo>,
    pub candidates: Vec<CandidateInfo>,
    /// A `[[target]]` for the config that syncs this image, or why none could be made.
    pub snippet: Option<String>,
    /// The signatures found for `digest`, as they claim (not verified: inspect has no policy).
    pub signatures: Vec<Claim>,
    /// Where they were looked for, and what each place answered.
    pub signatures_searched: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct LayerInfo {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CandidateInfo {
    pub path: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub via: Vec<String>,
    pub layer: Option<String>,
    pub size: u64,
    /// kernel, initramfs or uki: what the content is (not what the name says).
    pub kind: Option<String>,
    /// The check's verdict, e.g. "arm64 EFI zboot (zstd payload, 21.0 MB)".
    pub format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uki: Option<UkiInfo>,
    /// Why it is not a usable boot file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct UkiInfo {
    pub kernel: String,
    pub initramfs: String,
    pub cmdline: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os_release: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Inspects `reference`. Registry settings (insecure, CA, credentials) and limits come from
/// `settings` when a config was readable.
pub async fn inspect(
    reference_text: &str,
    platform: Option<&str>,
    settings: Option<&Settings>,
    insecure: bool,
    observer: Option<Arc<dyn Observer>>,
) -> Result<Report, InspectError> {
    let reference = crate::reference::parse_reference(reference_text).map_err(|reason| {
        InspectError::Reference {
            reference: reference_text.to_string(),
            reason,
        }
    })?;
    let host = reference.resolve_registry().to_string();
    let (mut registry_settings, timeouts, limits) = match settings {
        Some(s) => (s.registry(&host), s.timeouts, s.limits),
        None => (
            RegistrySettings {
                host: host.clone(),
                ..Default::default()
            },
            Timeouts {
                connect: std::time::Duration::from_secs(10),
                request: std::time::Duration::from_secs(30),
                stall: std::time::Duration::from_secs(60),
            },
            Limits::default(),
        ),
    };
    registry_settings.insecure |= insecure;
    let helpers = HelperCache::default();
    let credentials = |h: &str| Credentials::for_host(settings, h, &helpers);
    let clients = Clients::default();
    let access = Access {
        settings: &registry_settings,
        credentials: &credentials,
        clients: &clients,
    };
    let registry = Registry::connect(&reference, access, timeouts)?.with_observer(observer);
    let digest = registry.resolve(&reference).await?;
    let (signatures, signatures_searched) = match registry.signatures(&digest).await {
        Ok(found) => (
            found
                .material
                .iter()
                .map(|m| crate::signature::claim(m, &digest))
                .collect(),
            found.searched,
        ),
        Err(e) => (Vec::new(), vec![format!("signature discovery failed: {e}")]),
    };
    let platforms = registry.offered(&digest).await?.unwrap_or_default();
    let platform = match platform {
        Some(p) => {
            crate::config::parse_platform(p).ok_or_else(|| InspectError::Platform(p.to_string()))?
        }
        // The config's default, unless the index offers one platform only.
        None => match platforms.as_slice() {
            [only] => crate::config::parse_platform(only)
                .ok_or_else(|| InspectError::Platform(only.clone()))?,
            _ => Platform {
                os: "linux".into(),
                architecture: "arm64".into(),
                variant: None,
            },
        },
    };
    let image = registry.image_manifest(&digest, &platform).await?;
    let scratch = Scratch(std::env::temp_dir().join(format!(
        "bootsync-inspect-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )));
    fs::create_dir(&scratch.0).map_err(|source| InspectError::Scratch {
        path: scratch.0.clone(),
        source,
    })?;
    let found = pipeline::find_candidates(&registry, &image.layers, &scratch.0, &limits).await?;
    let scratch_dir = scratch.0.clone();
    let candidates = tokio::task::spawn_blocking(move || {
        found
            .into_iter()
            .enumerate()
            .map(|(i, c)| check(c, &scratch_dir, i, &limits))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| InspectError::Pipeline(PipelineError::Join(e.to_string())))?;
    drop(scratch);
    let snippet = snippet(&reference.whole(), &platform, &candidates);
    Ok(Report {
        reference: reference.whole(),
        digest,
        platforms,
        platform: platform.to_string(),
        manifest: image.digest,
        layers: image
            .layers
            .iter()
            .rev()
            .map(|l| LayerInfo {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size,
                title: l.annotations.get("org.opencontainers.image.title").cloned(),
            })
            .collect(),
        candidates,
        snippet,
        signatures,
        signatures_searched,
    })
}

/// Checks a candidate by its content: a UKI, a kernel or an initramfs (in the order its name
/// suggests), or none of them.
fn check(c: Candidate, scratch: &Path, i: usize, limits: &Limits) -> CandidateInfo {
    let mut info = CandidateInfo {
        path: c.path.clone(),
        via: c.via,
        layer: c.layer,
        size: c.size,
        kind: None,
        format: None,
        uki: None,
        error: c.problem,
    };
    let Some(file) = c.staged else {
        return info;
    };
    let check_limits = limits.check();
    let base = c
        .path
        .rsplit('/')
        .next()
        .unwrap_or(&c.path)
        .to_ascii_lowercase();
    let order: [Kind; 3] = if base.ends_with(".efi") {
        [Kind::Uki, Kind::Kernel, Kind::Initramfs]
    } else if base.starts_with("initr") {
        [Kind::Initramfs, Kind::Kernel, Kind::Uki]
    } else {
        [Kind::Kernel, Kind::Uki, Kind::Initramfs]
    };
    let mut errors = Vec::new();
    for kind in order {
        let result = match kind {
            Kind::Uki => {
                let part = |p: &str| scratch.join(format!("c{i}.{p}"));
                crate::bootfile::extract_uki_with(
                    &file,
                    &part("linux"),
                    &part("initrd"),
                    &part("cmdline"),
                    &check_limits,
                )
                .map(|parts| {
                    info.uki = Some(UkiInfo {
                        kernel: parts.kernel.to_string(),
                        initramfs: parts.initramfs.to_string(),
                        os_release: parts.os_release(),
                        kernel_release: parts.uname.clone(),
                        cmdline: parts.cmdline.clone(),
                    });
                    format!(
                        "UKI: {}{}",
                        parts.kernel,
                        parts
                            .os_release()
                            .map(|o| format!(", {o}"))
                            .unwrap_or_default()
                    )
                })
            }
            Kind::Kernel => fs::File::open(&file)
                .and_then(|f| Ok((f.metadata()?.len(), f)))
                .map_err(|e| crate::bootfile::CheckError {
                    check: "kernel read",
                    offset: 0,
                    reason: e.to_string(),
                })
                .and_then(|(len, f)| {
                    crate::bootfile::check_kernel_with(
                        std::io::BufReader::new(f),
                        len,
                        &check_limits,
                    )
                })
                .map(|v| v.to_string()),
            _ => fs::File::open(&file)
                .map_err(|e| crate::bootfile::CheckError {
                    check: "initramfs read",
                    offset: 0,
                    reason: e.to_string(),
                })
                .and_then(|f| {
                    crate::bootfile::check_initramfs_with(
                        std::io::BufReader::with_capacity(256 * 1024, f),
                        &check_limits,
                    )
                })
                .map(|v| v.to_string()),
        };
        match result {
            // A PE file without `.linux` is an EFI application (systemd-boot), not a kernel.
            Ok(format)
                if kind == Kind::Kernel
                    && format.starts_with("PE/EFI application")
                    && !format.contains("UKI") =>
            {
                errors.push(format!("an EFI application, not a kernel: {format}"));
                break;
            }
            Ok(format) => {
                info.kind = Some(kind.to_string());
                info.format = Some(format);
                return info;
            }
            Err(e) => errors.push(format!("not a {kind}: {e}")),
        }
    }
    info.error = Some(errors.join("; "));
    info
}

/// A `[[target]]` that takes what was found: a preset when one of its layouts is there, else
/// the files themselves.
fn snippet(reference: &str, platform: &Platform, found: &[CandidateInfo]) -> Option<String> {
    let arch = platform.normalized().architecture;
    let kind_at = |path: &str| {
        found
            .iter()
            .find(|c| c.path == path)
            .and_then(|c| c.kind.clone())
    };
    let repo = reference
        .rsplit_once('@')
        .map_or(reference, |(r, _)| r)
        .rsplit('/')
        .next()
        .unwrap_or("image");
    let name: String = repo
        .split(':')
        .next()
        .unwrap_or(repo)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let head = format!(
        "[[target]]\nname = {name:?}\nreference = {reference:?}\nplatform = {:?}\ndest = {name:?}\n",
        platform.to_string()
    );
    for preset in crate::config::PRESETS {
        let Some(layouts) = crate::config::preset(preset, &arch) else {
            continue;
        };
        let fits = layouts.iter().any(|l| {
            l.files
                .iter()
                .all(|f| kind_at(&f.source).as_deref() == Some(f.kind.as_str()))
        });
        if fits {
            return Some(format!("{head}preset = {preset:?}\n"));
        }
    }
    let of = |kind: &'static str| {
        found
            .iter()
            .filter(move |c| c.kind.as_deref() == Some(kind))
    };
    if let Some(uki) = of("uki").next() {
        return Some(format!(
            "{head}[[target.files]]\nsource = {:?}\nname = {name:?}\nkind = \"uki\"\n",
            uki.path
        ));
    }
    let kernel = of("kernel").next()?;
    let dir = |p: &str| p.rsplit_once('/').map_or("", |(d, _)| d).to_string();
    let initrd = of("initramfs")
        .find(|c| dir(&c.path) == dir(&kernel.path))
        .or_else(|| of("initramfs").next())?;
    let file = |c: &CandidateInfo, kind: &str| {
        let base = c.path.rsplit('/').next().unwrap_or(&c.path);
        format!(
            "[[target.files]]\nsource = {:?}\nname = {base:?}\nkind = {kind:?}\n",
            c.path
        )
    };
    Some(format!(
        "{head}{}{}",
        file(kernel, "kernel"),
        file(initrd, "initramfs")
    ))
}

/// The report as text for a terminal.
pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "{} -> {}", r.reference, r.digest);
    if !r.platforms.is_empty() {
        let _ = writeln!(s, "platforms: {}", r.platforms.join(", "));
    }
    let _ = writeln!(s, "platform {}: manifest {}", r.platform, r.manifest);
    let _ = writeln!(s, "layers, top first:");
    for l in &r.layers {
        let _ = writeln!(
            s,
            "  {}  {:>9.1} MB  {}{}",
            l.digest,
            l.size as f64 / 1e6,
            l.media_type,
            l.title
                .as_ref()
                .map(|t| format!("  title {t}"))
                .unwrap_or_default()
        );
    }
    if r.candidates.is_empty() {
        let _ = writeln!(s, "no boot-file-like paths found in the image");
    } else {
        let _ = writeln!(s, "boot files:");
    }
    for c in &r.candidates {
        let via = if c.via.is_empty() {
            String::new()
        } else {
            format!(" (via {})", c.via.join(", "))
        };
        match (&c.kind, &c.format, &c.error) {
            (Some(k), Some(f), _) => {
                let _ = writeln!(s, "  {}{via}: {k}: {f}", c.path);
            }
            (_, _, Some(e)) => {
                let _ = writeln!(s, "  {}{via}: {e}", c.path);
            }
            _ => {
                let _ = writeln!(s, "  {}{via}", c.path);
            }
        }
        if let Some(u) = &c.uki {
            let _ = writeln!(s, "    kernel: {}", u.kernel);
            let _ = writeln!(s, "    initramfs: {}", u.initramfs);
            let _ = writeln!(s, "    cmdline: {}", u.cmdline);
            if let Some(k) = &u.kernel_release {
                let _ = writeln!(s, "    uname: {k}");
            }
        }
    }
    if r.signatures.is_empty() {
        let _ = writeln!(s, "signatures of {}: none found", r.digest);
    } else {
        let _ = writeln!(
            s,
            "signatures of {} (as they claim; verified only by a [target.verify] policy):",
            r.digest
        );
    }
    for c in &r.signatures {
        let who = match (&c.subject, &c.issuer) {
            (Some(sub), Some(iss)) => format!("certificate for {sub} (issuer {iss})"),
            (Some(sub), None) => format!("certificate for {sub}"),
            _ => c.signed_with.clone(),
        };
        let problem = c
            .problem
            .as_ref()
            .map(|p| format!(": {p}"))
            .unwrap_or_default();
        // Subjects and issuers come from certificates anyone can push: escape them.
        let line = format!("{}: {}, {who}{problem}", c.source, c.format);
        let _ = writeln!(s, "  {}", crate::text::printable(&line));
    }
    for place in &r.signatures_searched {
        let _ = writeln!(s, "    looked at {}", crate::text::printable(place));
    }
    match &r.snippet {
        Some(snippet) => {
            let _ = writeln!(s, "\na config that syncs it:\n\n{snippet}");
        }
        None => {
            let _ = writeln!(
                s,
                "\nno kernel with an initramfs, and no UKI: nothing to sync"
            );
        }
    }
    s
}
