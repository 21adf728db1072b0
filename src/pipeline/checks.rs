//! The last step before a version is committed: every kernel and initramfs checked by its real
//! format, every UKI split into its parts (each checked), so nothing that would not boot is
//! published.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use crate::bootfile::Kind;
use crate::config::{FileSpec, Limits, Modes};
use crate::store::{BootInfo, FileRecord};

use super::{PipelineError, Prechecked};

/// Where a UKI waits in staging until it is split, when it is not published itself (a dot
/// name: never served).
pub(crate) fn uki_staging_name(spec: &FileSpec) -> String {
    match &spec.uki {
        Some(u) if u.keep => spec.name.clone(),
        _ => format!(".uki-{}", spec.name),
    }
}

/// Checks one kernel or initramfs in staging by its real format, unless it was checked as that
/// kind while it was written (`prechecked`).
fn check_file(
    name: &str,
    kind: Kind,
    staging: &Path,
    limits: &crate::bootfile::Limits,
    prechecked: Option<&Prechecked>,
) -> Result<(), PipelineError> {
    let path = staging.join(name);
    let open_err = |source| PipelineError::Write {
        path: path.clone(),
        source,
    };
    let failed = |source| PipelineError::Check {
        file: name.to_string(),
        kind,
        source,
    };
    if let Some(pre) = prechecked.filter(|p| p.kind == kind) {
        let verdict = pre.checked.clone().map_err(failed)?;
        tracing::info!(file = %name, "{kind}: {verdict} (checked as it was written)");
        return Ok(());
    }
    let file = fs::File::open(&path).map_err(open_err)?;
    let len = file.metadata().map_err(open_err)?.len();
    let verdict = crate::bootfile::check_as(kind, file, len, limits).map_err(failed)?;
    tracing::info!(file = %name, "{kind}: {verdict}");
    Ok(())
}

/// Checks every kernel and initramfs of `files` (the chosen layout) and splits its UKIs; returns
/// the records of what is published, and what the first UKI said about itself.
pub(crate) fn check_and_split(
    files: &[FileSpec],
    staging: &Path,
    mut records: Vec<FileRecord>,
    prechecked: &HashMap<String, Prechecked>,
    modes: &Modes,
    limits: &Limits,
) -> Result<(Vec<FileRecord>, Option<BootInfo>), PipelineError> {
    let check_limits = limits.check();
    let open_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PipelineError::Write { path, source }
    };
    // A kernel or initramfs was normally checked as it was written; the rest (small files, a
    // kernel that needs random access) is read back from the page cache, each file on its own
    // thread, so on two cores they are checked side by side.
    std::thread::scope(|scope| {
        let checks: Vec<_> = files
            .iter()
            .filter(|f| !f.is_dir && matches!(f.kind, Kind::Kernel | Kind::Initramfs))
            .map(|spec| {
                let pre = prechecked.get(&spec.name);
                scope.spawn(move || check_file(&spec.name, spec.kind, staging, &check_limits, pre))
            })
            .collect();
        for check in checks {
            check
                .join()
                .map_err(|_| PipelineError::Join("a format check panicked".into()))??;
        }
        Ok::<(), PipelineError>(())
    })?;
    let mut boot = None;
    for spec in files.iter().filter(|f| !f.is_dir) {
        let Some(names) = spec.uki.as_ref().filter(|_| spec.kind == Kind::Uki) else {
            continue;
        };
        let uki = staging.join(uki_staging_name(spec));
        let [kernel, initrd, cmdline] =
            [&names.kernel, &names.initrd, &names.cmdline].map(|n| staging.join(n));
        let parts =
            crate::bootfile::extract_uki_with(&uki, &kernel, &initrd, &cmdline, &check_limits)
                .map_err(|source| PipelineError::Check {
                    file: spec.name.clone(),
                    kind: spec.kind,
                    source,
                })?;
        tracing::info!(file = %spec.name, os = ?parts.os_release(), "UKI: kernel {}, {}, cmdline {:?}", parts.kernel, parts.initramfs, parts.cmdline);
        if !names.keep {
            fs::remove_file(&uki).map_err(open_err(&uki))?;
            records.retain(|r| r.name != uki_staging_name(spec));
        }
        for (name, section) in [
            (&names.kernel, ".linux"),
            (&names.initrd, ".initrd"),
            (&names.cmdline, ".cmdline"),
        ] {
            let path = staging.join(name);
            let file = fs::File::open(&path).map_err(open_err(&path))?;
            crate::store::fs::apply_file_modes(&file, modes).map_err(open_err(&path))?;
            file.sync_all().map_err(open_err(&path))?;
            let (size, digest) = crate::store::fs::hash_file(&path).map_err(open_err(&path))?;
            let sha256 = digest.hex().to_string();
            records.push(FileRecord {
                name: name.clone(),
                size,
                sha256,
                source: format!("{}#{section}", spec.source),
            });
        }
        boot.get_or_insert(BootInfo {
            kernel: names.kernel.clone(),
            os_release: parts.os_release(),
            kernel_release: parts.uname.clone(),
            cmdline: parts.cmdline,
        });
    }
    Ok((records, boot))
}
