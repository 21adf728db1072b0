//! Pair-consistent boots: a matchbox profile rewritten to the version-specific paths of the
//! current version, so a node that fetched its boot script gets the kernel and the initramfs of
//! one release even if a publish happens between its two downloads.
//!
//! matchbox reads profiles from disk on every request, so an atomic rewrite takes effect at
//! once. Every field other than `boot.kernel` and `boot.initrd` is kept as it was.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

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

/// Points the profile at version `hex`. Returns whether the file changed.
pub fn update(p: &Profile, hex: &str, modes: &Modes) -> Result<bool, ProfileError> {
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
            "boot": {"kernel": "", "initrd": [], "args": p.template_args},
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
    let new_initrd = Value::from(initrd);
    if boot.get("kernel").and_then(Value::as_str) == Some(kernel.as_str())
        && boot.get("initrd") == Some(&new_initrd)
    {
        return Ok(false);
    }
    boot.insert("kernel".into(), Value::from(kernel));
    boot.insert("initrd".into(), new_initrd);
    let mut text = serde_json::to_vec_pretty(&doc).map_err(|e| invalid(e.to_string()))?;
    text.push(b'\n');
    write_atomic(&p.path, &text, modes).map_err(io_err)?;
    Ok(true)
}

/// Temp file in the same directory, fsync, rename, fsync the directory.
fn write_atomic(path: &Path, data: &[u8], modes: &Modes) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    crate::store::create_dirs(dir, modes)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.bootsync-");
    // Temp files of an earlier run that was killed mid-write (matchbox ignores them; tidy up).
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let tmp = dir.join(format!(
        "{prefix}{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        crate::store::apply_file_modes(&f, modes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(dir: &Path) -> Profile {
        Profile {
            path: dir.join("profiles/talos.json"),
            url_prefix: "/assets/talos".into(),
            kernel: "vmlinuz-arm64".into(),
            initrd: vec!["initramfs-arm64.xz".into()],
            template_id: "talos".into(),
            template_name: "Talos".into(),
            template_args: vec!["talos.platform=metal".into(), "console=ttyAMA0".into()],
        }
    }

    #[test]
    fn creates_from_template() {
        let tmp = tempfile::tempdir().unwrap();
        let p = profile(tmp.path());
        assert!(update(&p, "abc", &Modes::default()).unwrap());
        let doc: Value = serde_json::from_slice(&fs::read(&p.path).unwrap()).unwrap();
        assert_eq!(doc["id"], "talos");
        assert_eq!(
            doc["boot"]["kernel"],
            "/assets/talos/versions/abc/vmlinuz-arm64"
        );
        assert_eq!(
            doc["boot"]["initrd"][0],
            "/assets/talos/versions/abc/initramfs-arm64.xz"
        );
        assert_eq!(doc["boot"]["args"][1], "console=ttyAMA0");
        assert!(
            !update(&p, "abc", &Modes::default()).unwrap(),
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
        update(&p, "def", &Modes::default()).unwrap();
        let text = fs::read_to_string(&p.path).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["name"], "mine");
        assert_eq!(doc["generic_id"], "g");
        assert_eq!(doc["zzz"], json!([1, 2]));
        assert_eq!(doc["boot"]["args"], json!(["a=1"]));
        assert_eq!(doc["boot"]["extra"], true);
        assert_eq!(
            doc["boot"]["kernel"],
            "/assets/talos/versions/def/vmlinuz-arm64"
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
        update(&p, "0ff", &Modes::default()).unwrap();
        assert_eq!(fs::read_dir(p.path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn invalid_json_is_an_error_and_the_file_is_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let p = profile(tmp.path());
        fs::create_dir_all(p.path.parent().unwrap()).unwrap();
        fs::write(&p.path, b"{not json").unwrap();
        let e = update(&p, "abc", &Modes::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not valid JSON") && e.contains("untouched"),
            "{e}"
        );
        assert_eq!(fs::read(&p.path).unwrap(), b"{not json");
        fs::write(&p.path, b"[1]").unwrap();
        assert!(update(&p, "abc", &Modes::default()).is_err());
    }
}
