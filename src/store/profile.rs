//! Pair-consistent boots: a matchbox profile rewritten to the version-specific paths of the
//! current version, so a node that fetched its boot script gets the kernel and the initramfs of
//! one release even if a publish happens between its two downloads.
//!
//! matchbox reads profiles from disk on every request, so an atomic rewrite takes effect at
//! once. Every field other than `boot.kernel` and `boot.initrd` is kept as it was, except
//! `boot.args` when the version's kernel was split out of a UKI: a node that netboots the split
//! kernel gets only the command line its iPXE script gives it, so the UKI's own `.cmdline`
//! (`talos.platform=metal console=...`) must be carried into the profile
//! (siderolabs/talos#9947), with the configured `args` winning on conflict and the `initrd=`
//! argument the EFI stub needs to find the initramfs iPXE hands it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::fs::{create_dirs, remove_temp_files};
use super::VersionManifest;
use crate::config::{Modes, Profile};

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("matchbox profile {}: {reason}; the file was left untouched", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("matchbox profile {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The URLs the profile should hold for version `hex`.
fn urls(p: &Profile, hex: &str) -> (String, Vec<String>) {
    let at = |name: &str| format!("{}/versions/{hex}/{name}", p.url_prefix);
    (at(&p.kernel), p.initrd.iter().map(|n| at(n)).collect())
}

/// Splits a kernel command line into arguments, keeping double-quoted values (`a="b c"`) whole.
fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    args.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        args.push(cur);
    }
    args
}

fn arg_key(arg: &str) -> &str {
    arg.split_once('=').map_or(arg, |(k, _)| k)
}

/// The arguments of a profile whose kernel came from a UKI: the UKI's command line without the
/// keys the configured arguments set, then the configured arguments, then `initrd=NAME` for
/// each initramfs (unless configured): the EFI stub loads the initrd iPXE registered under that
/// name.
pub fn uki_args(cmdline: &str, configured: &[String], initrds: &[String]) -> Vec<String> {
    let keys: Vec<&str> = configured.iter().map(|a| arg_key(a)).collect();
    let mut args: Vec<String> = split_cmdline(cmdline)
        .into_iter()
        .filter(|a| !keys.contains(&arg_key(a)) && arg_key(a) != "initrd")
        .collect();
    args.extend(configured.iter().cloned());
    if !keys.contains(&"initrd") {
        args.extend(initrds.iter().map(|url| {
            let name = url.rsplit('/').next().unwrap_or(url);
            format!("initrd={name}")
        }));
    }
    args
}

/// The version the profile's kernel URL names now (`None`: no profile yet, or not one of ours).
/// Pruning keeps it: a node that fetched its boot script may still be on its way to the files.
pub fn named_version(p: &Profile) -> Option<String> {
    let text = std::fs::read(&p.path).ok()?;
    let doc: Value = serde_json::from_slice(&text).ok()?;
    let kernel = doc.get("boot")?.get("kernel")?.as_str()?;
    let rest = kernel.strip_prefix(&format!("{}/versions/", p.url_prefix))?;
    let (hex, _) = rest.split_once('/')?;
    Some(hex.to_string())
}

/// Points the profile at version `m`. Returns whether the file changed.
pub fn update(p: &Profile, m: &VersionManifest, modes: &Modes) -> Result<bool, ProfileError> {
    let hex = m.hex();
    let invalid = |reason: String| ProfileError::Invalid {
        path: p.path.clone(),
        reason,
    };
    let io_err = |source: io::Error| ProfileError::Io {
        path: p.path.clone(),
        source,
    };
    let (kernel, initrd) = urls(p, hex);
    let mut doc = match fs::read(&p.path) {
        Ok(bytes) => serde_json::from_slice::<Value>(&bytes)
            .map_err(|e| invalid(format!("not valid JSON: {e}")))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => json!({
            "id": p.template_id,
            "name": p.template_name,
            "boot": {"kernel": "", "initrd": [], "args": p.args},
        }),
        Err(e) => return Err(io_err(e)),
    };
    let root = doc
        .as_object_mut()
        .ok_or_else(|| invalid("not a JSON object".into()))?;
    let boot = root
        .entry("boot")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| invalid("\"boot\" is not an object".into()))?;
    let args = m
        .boot
        .as_ref()
        .filter(|b| b.kernel == p.kernel)
        .map(|b| Value::from(uki_args(&b.cmdline, &p.args, &initrd)));
    let new_initrd = Value::from(initrd);
    if boot.get("kernel").and_then(Value::as_str) == Some(kernel.as_str())
        && boot.get("initrd") == Some(&new_initrd)
        && args.as_ref().is_none_or(|a| boot.get("args") == Some(a))
    {
        return Ok(false);
    }
    boot.insert("kernel".into(), Value::from(kernel));
    boot.insert("initrd".into(), new_initrd);
    if let Some(args) = args {
        boot.insert("args".into(), args);
    }
    let mut text = serde_json::to_vec_pretty(&doc).map_err(|e| invalid(e.to_string()))?;
    text.push(b'\n');
    write_atomic(&p.path, &text, modes).map_err(io_err)?;
    Ok(true)
}

/// Temp files beside a profile start with this (and do not end in `.json`: matchbox reads
/// profiles and groups by name).
const TMP_PREFIX: &str = ".bootsync-tmp-";

/// Writes the profile atomically, after removing temp files of an earlier run killed
/// mid-write.
fn write_atomic(path: &Path, data: &[u8], modes: &Modes) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dirs(dir, modes)?;
    remove_temp_files(dir, TMP_PREFIX);
    // The prefix an earlier release used.
    if let Some(name) = path.file_name() {
        remove_temp_files(dir, &format!(".{}.bootsync-", name.to_string_lossy()));
    }
    super::fs::write_atomic(path, data, TMP_PREFIX, modes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    fn profile(dir: &Path) -> Profile {
        Profile {
            path: dir.join("profiles/talos.json"),
            url_prefix: "/assets/talos".into(),
            kernel: "vmlinuz-arm64".into(),
            initrd: vec!["initramfs-arm64.xz".into()],
            template_id: "talos".into(),
            template_name: "Talos".into(),
            args: vec!["talos.platform=metal".into(), "console=ttyAMA0".into()],
        }
    }

    /// `hex` padded to a digest's 64 digits.
    fn pad(hex: &str) -> String {
        format!("{hex:0<64}")
    }

    fn version(hex: &str) -> VersionManifest {
        VersionManifest {
            target: "t".into(),
            reference: "r/x:y".into(),
            platform: "linux/arm64".into(),
            digest: Digest::from_hex(&pad(hex)).unwrap(),
            tag_digest: Digest::from_hex(&pad(hex)).unwrap(),
            published_at: String::new(),
            files: Vec::new(),
            boot: None,
            signature: None,
        }
    }

    #[test]
    fn creates_from_template() {
        let tmp = tempfile::tempdir().unwrap();
        let p = profile(tmp.path());
        assert!(update(&p, &version("abc"), &Modes::default()).unwrap());
        let doc: Value = serde_json::from_slice(&fs::read(&p.path).unwrap()).unwrap();
        assert_eq!(doc["id"], "talos");
        assert_eq!(
            doc["boot"]["kernel"],
            format!("/assets/talos/versions/{}/vmlinuz-arm64", pad("abc"))
        );
        assert_eq!(
            doc["boot"]["initrd"][0],
            format!("/assets/talos/versions/{}/initramfs-arm64.xz", pad("abc"))
        );
        assert_eq!(doc["boot"]["args"][1], "console=ttyAMA0");
        assert!(
            !update(&p, &version("abc"), &Modes::default()).unwrap(),
            "unchanged profile rewritten"
        );
    }

    #[test]
    fn keeps_every_other_field_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let p = profile(tmp.path());
        fs::create_dir_all(p.path.parent().unwrap()).unwrap();
        let before = r#"{"id":"x","name":"mine","boot":{"kernel":"/old","initrd":["/old-i"],"args":["a=1"],"extra":true},"generic_id":"g","zzz":[1,2]}"#;
        fs::write(&p.path, before).unwrap();
        update(&p, &version("def"), &Modes::default()).unwrap();
        let text = fs::read_to_string(&p.path).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["name"], "mine");
        assert_eq!(doc["generic_id"], "g");
        assert_eq!(doc["zzz"], json!([1, 2]));
        assert_eq!(doc["boot"]["args"], json!(["a=1"]));
        assert_eq!(doc["boot"]["extra"], true);
        assert_eq!(
            doc["boot"]["kernel"],
            format!("/assets/talos/versions/{}/vmlinuz-arm64", pad("def"))
        );
        // key order survives (operators diff these files)
        let keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "name", "boot", "generic_id", "zzz"]);
        // no temp files left beside it, also none from an earlier, killed run
        fs::write(
            p.path.parent().unwrap().join(".talos.json.bootsync-1-2"),
            b"{",
        )
        .unwrap();
        update(&p, &version("0ff"), &Modes::default()).unwrap();
        assert_eq!(fs::read_dir(p.path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn invalid_json_is_an_error_and_the_file_is_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let p = profile(tmp.path());
        fs::create_dir_all(p.path.parent().unwrap()).unwrap();
        fs::write(&p.path, b"{not json").unwrap();
        let e = update(&p, &version("abc"), &Modes::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not valid JSON") && e.contains("untouched"),
            "{e}"
        );
        assert_eq!(fs::read(&p.path).unwrap(), b"{not json");
        fs::write(&p.path, b"[1]").unwrap();
        assert!(update(&p, &version("abc"), &Modes::default()).is_err());
    }

    #[test]
    fn a_uki_command_line_becomes_the_args_and_configured_ones_win() {
        let cmdline = "talos.platform=metal console=tty0 console=ttyAMA0 init_on_alloc=1 foo=\"a b\" initrd=\\old";
        let configured = [
            "console=ttyS0".to_string(),
            "talos.config=http://x/c".to_string(),
        ];
        let args = uki_args(
            cmdline,
            &configured,
            &["/assets/t/versions/aa/initramfs-arm64.xz".into()],
        );
        assert_eq!(
            args,
            [
                "talos.platform=metal",
                "init_on_alloc=1",
                "foo=\"a b\"",
                "console=ttyS0",
                "talos.config=http://x/c",
                "initrd=initramfs-arm64.xz"
            ]
        );
        // a configured initrd= is kept as it is
        let args = uki_args("a=1", &["initrd=mine".into()], &["/x/i".into()]);
        assert_eq!(args, ["a=1", "initrd=mine"]);
    }

    #[test]
    fn a_version_from_a_uki_rewrites_the_profile_args() {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = profile(tmp.path());
        p.args = vec!["console=ttyS0".into()];
        let mut m = version("abc");
        m.boot = Some(crate::store::BootInfo {
            kernel: "vmlinuz-arm64".into(),
            cmdline: "talos.platform=metal console=ttyAMA0".into(),
            os_release: Some("Talos (v1.11.5)".into()),
            kernel_release: None,
        });
        assert!(update(&p, &m, &Modes::default()).unwrap());
        let doc: Value = serde_json::from_slice(&fs::read(&p.path).unwrap()).unwrap();
        assert_eq!(
            doc["boot"]["args"],
            json!([
                "talos.platform=metal",
                "console=ttyS0",
                "initrd=initramfs-arm64.xz"
            ])
        );
        assert!(
            !update(&p, &m, &Modes::default()).unwrap(),
            "unchanged profile rewritten"
        );
        // a version without a UKI leaves the args as they are
        assert!(update(&p, &version("def"), &Modes::default()).unwrap());
        let doc: Value = serde_json::from_slice(&fs::read(&p.path).unwrap()).unwrap();
        assert_eq!(doc["boot"]["args"][0], "talos.platform=metal");
    }
}
