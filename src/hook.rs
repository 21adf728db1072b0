//! Post-publish hooks: a command per target run after each change of what is served, with the
//! target, digest and file paths in its environment, under a timeout. A failing hook is logged
//! and counted; it never undoes the publish.

use std::process::Stdio;

use tokio::io::AsyncReadExt;

use crate::config::{Hook, Target};
use crate::store::VersionManifest;

/// Most of a hook's output that is kept for the log.
const OUTPUT_LIMIT: u64 = 4096;

/// The environment a hook sees.
pub fn environment(target: &Target, m: &VersionManifest) -> Vec<(String, String)> {
    let version_dir = target.dest.join("versions").join(m.hex());
    let files: Vec<String> = m
        .files
        .iter()
        .map(|f| version_dir.join(&f.name).display().to_string())
        .collect();
    // Also one variable per file, e.g. BOOTSYNC_FILE_VMLINUZ_ARM64, for hooks in shell.
    let per_file = m.files.iter().map(|f| {
        let key: String = f
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        (
            format!("BOOTSYNC_FILE_{key}"),
            version_dir.join(&f.name).display().to_string(),
        )
    });
    let mut env = vec![
        ("BOOTSYNC_TARGET".into(), target.name.clone()),
        ("BOOTSYNC_REFERENCE".into(), target.reference.clone()),
        ("BOOTSYNC_PLATFORM".into(), target.platform.to_string()),
        ("BOOTSYNC_DIGEST".into(), m.digest.clone()),
        ("BOOTSYNC_TAG_DIGEST".into(), m.tag_digest.clone()),
        ("BOOTSYNC_DEST".into(), target.dest.display().to_string()),
        (
            "BOOTSYNC_VERSION_DIR".into(),
            version_dir.display().to_string(),
        ),
        ("BOOTSYNC_FILES".into(), files.join("\n")),
    ];
    env.extend(per_file);
    env
}

/// Runs the hook; `Err` carries a one-line description for logs and `/status`.
pub async fn run(hook: &Hook, target: &Target, m: &VersionManifest) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(&hook.argv[0]);
    cmd.args(&hook.argv[1..])
        .envs(environment(target, m))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("hook {:?} could not start: {e}", hook.argv[0]))?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let collect = async {
        let mut out = String::new();
        let mut err = String::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.take(OUTPUT_LIMIT).read_to_string(&mut out).await;
        }
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(OUTPUT_LIMIT).read_to_string(&mut err).await;
        }
        let status = child.wait().await;
        (status, out, err)
    };
    match tokio::time::timeout(hook.timeout, collect).await {
        // Dropping the future drops the child, which kill_on_drop kills.
        Err(_) => Err(format!(
            "hook {:?} timed out after {:?} and was killed",
            hook.argv[0], hook.timeout
        )),
        Ok((Err(e), _, _)) => Err(format!("hook {:?}: {e}", hook.argv[0])),
        Ok((Ok(status), out, err)) => {
            if !out.trim().is_empty() {
                tracing::info!(target = %target.name, "hook output: {}", out.trim());
            }
            if status.success() {
                Ok(())
            } else {
                Err(format!(
                    "hook {:?} failed ({status}): {}",
                    hook.argv[0],
                    err.trim()
                ))
            }
        }
    }
}
