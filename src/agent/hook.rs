//! Post-publish hooks: a command per target run after each change of what is served, with the
//! target, digest and file paths in its environment, under a timeout. A failing hook is logged
//! and counted; it never undoes the publish.

use std::process::Stdio;
use std::time::Duration;

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
        ("BOOTSYNC_REFERENCE".into(), target.reference.whole()),
        ("BOOTSYNC_PLATFORM".into(), target.platform.to_string()),
        ("BOOTSYNC_DIGEST".into(), m.digest.to_string()),
        ("BOOTSYNC_TAG_DIGEST".into(), m.tag_digest.to_string()),
        ("BOOTSYNC_DEST".into(), target.dest.display().to_string()),
        (
            "BOOTSYNC_VERSION_DIR".into(),
            version_dir.display().to_string(),
        ),
        ("BOOTSYNC_FILES".into(), files.join("\n")),
    ];
    env.extend(per_file);
    if let Some(boot) = &m.boot {
        env.push(("BOOTSYNC_CMDLINE".into(), boot.cmdline.clone()));
        if let Some(os) = &boot.os_release {
            env.push(("BOOTSYNC_OS_RELEASE".into(), os.clone()));
        }
    }
    // Who signed it: `unverified` without a signature policy; else the key's fingerprint, or
    // the certificate's subject and issuer, each in its own variable too.
    match &m.signature {
        None => env.push(("BOOTSYNC_SIGNED_BY".into(), "unverified".into())),
        Some(s) => {
            env.push(("BOOTSYNC_SIGNED_BY".into(), s.to_string()));
            let parts = [
                ("BOOTSYNC_SIGNER_KEY", &s.key),
                ("BOOTSYNC_SIGNER_ISSUER", &s.issuer),
                ("BOOTSYNC_SIGNER_SUBJECT", &s.subject),
            ];
            for (name, value) in parts {
                if let Some(v) = value {
                    env.push((name.into(), v.clone()));
                }
            }
        }
    }
    env
}

/// Runs the hook; `Err` carries a one-line description for logs and `/status`. The hook is the
/// leader of its own process group, so a timeout kills everything it started; a hook that exits
/// but leaves a background process behind (holding its output open) still counts as finished.
pub async fn run(hook: &Hook, target: &Target, m: &VersionManifest) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(&hook.argv[0]);
    cmd.args(&hook.argv[1..])
        .envs(environment(target, m))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("hook {:?} could not start: {e}", hook.argv[0]))?;
    let pgid = child.id();
    let out = tokio::spawn(read_some(child.stdout.take()));
    let err = tokio::spawn(read_some(child.stderr.take()));
    let status = match tokio::time::timeout(hook.timeout, child.wait()).await {
        Ok(status) => status.map_err(|e| format!("hook {:?}: {e}", hook.argv[0])),
        Err(_) => {
            kill_group(pgid);
            let _ = child.wait().await;
            Err(format!(
                "hook {:?} timed out after {:?}; it and its children were killed",
                hook.argv[0], hook.timeout
            ))
        }
    };
    // Output still held open by a background child is not waited for.
    let collect = |task: tokio::task::JoinHandle<String>| async move {
        match tokio::time::timeout(Duration::from_millis(200), task).await {
            Ok(Ok(text)) => text,
            _ => String::new(),
        }
    };
    let (out, err) = (collect(out).await, collect(err).await);
    if !out.trim().is_empty() {
        tracing::info!(target = %target.name, "hook output: {}", out.trim());
    }
    let status = status?;
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

async fn read_some(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> String {
    let mut text = String::new();
    if let Some(p) = pipe {
        let _ = p.take(OUTPUT_LIMIT).read_to_string(&mut text).await;
    }
    text
}

fn kill_group(pgid: Option<u32>) {
    if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a negative pid signals the process group we created.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}
