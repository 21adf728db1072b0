//! The config file as written: every key optional, unknown keys rejected.
//!
//! Nothing here is checked beyond TOML types; `validate` turns these fragments into typed
//! settings (the split zincati uses in its `src/config/`). The main file and each drop-in are
//! fragments of this same shape; `merge` lays drop-ins over the main file.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub interval: Option<String>,
    pub listen: Option<String>,
    pub retain: Option<i64>,
    pub grace: Option<String>,
    pub assets_root: Option<String>,
    pub state_dir: Option<String>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub stall_timeout: Option<String>,
    pub max_concurrent_syncs: Option<i64>,
    pub backoff_start: Option<String>,
    pub backoff_max: Option<String>,
    pub verify_interval: Option<String>,
    pub token_file: Option<String>,
    pub file_mode: Option<String>,
    pub dir_mode: Option<String>,
    pub group: Option<String>,
    pub log_level: Option<String>,
    pub docker_config: Option<String>,
    pub max_file_size: Option<String>,
    pub max_download_size: Option<String>,
    pub max_decompressed_size: Option<String>,
    pub max_compression_ratio: Option<i64>,
    #[serde(default)]
    pub registry: Vec<RawRegistry>,
    #[serde(default)]
    pub target: Vec<RawTarget>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    pub host: Option<String>,
    pub insecure: Option<bool>,
    pub ca_file: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<String>,
    pub token_file: Option<String>,
    pub mirrors: Option<Vec<RawMirror>>,
    pub proxy: Option<String>,
    pub proxy_credentials_file: Option<String>,
}

/// One `mirrors = [{ url = ..., insecure = ..., resolve = ... }]` entry of a `[[registry]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMirror {
    pub url: Option<String>,
    pub insecure: Option<bool>,
    pub resolve: Option<bool>,
    pub ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub name: Option<String>,
    pub reference: Option<String>,
    pub platform: Option<String>,
    pub dest: Option<String>,
    pub preset: Option<String>,
    /// Publish each UKI itself too, beside the parts split out of it.
    pub publish_uki: Option<bool>,
    pub hook: Option<Vec<String>>,
    pub hook_timeout: Option<String>,
    pub profile: Option<RawProfile>,
    pub verify: Option<RawVerify>,
    #[serde(default)]
    pub files: Vec<RawFile>,
}

/// `[target.verify]`: who must have signed the images.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVerify {
    pub keys: Option<Vec<String>>,
    pub identities: Option<Vec<RawIdentity>>,
    pub trusted_root: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub subject_regexp: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub source: Option<String>,
    pub source_dir: Option<String>,
    pub name: Option<String>,
    pub kind: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub path: Option<String>,
    pub url_prefix: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<Vec<String>>,
    pub id: Option<String>,
    pub name: Option<String>,
    pub args: Option<Vec<String>>,
}

/// Lays `over` onto `base`: top-level keys replace; `[[target]]` entries with a `name` (and
/// `[[registry]]` entries with a `host`) already in `base` are merged key by key, others added.
pub fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (key.as_str(), base.get_mut(&key), value) {
            ("target", Some(toml::Value::Array(old)), toml::Value::Array(new)) => {
                merge_entries(old, new, "name")
            }
            ("registry", Some(toml::Value::Array(old)), toml::Value::Array(new)) => {
                merge_entries(old, new, "host")
            }
            (_, _, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn merge_entries(old: &mut Vec<toml::Value>, new: Vec<toml::Value>, id: &str) {
    for entry in new {
        let key = entry.get(id).cloned();
        let existing = key
            .as_ref()
            .and_then(|k| old.iter_mut().find(|o| o.get(id) == Some(k)));
        match (existing, entry) {
            (Some(toml::Value::Table(o)), toml::Value::Table(n)) => {
                for (k, v) in n {
                    o.insert(k, v);
                }
            }
            (_, entry) => old.push(entry),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_ins_replace_keys_and_merge_entries_by_id() {
        let mut base: toml::Table = toml::from_str(
            r#"
interval = "5m"
retain = 3
[[target]]
name = "a"
reference = "r/a:1"
[[target]]
name = "b"
reference = "r/b:1"
"#,
        )
        .unwrap();
        let over: toml::Table = toml::from_str(
            r#"
interval = "1m"
[[target]]
name = "b"
reference = "r/b:2"
[[target]]
name = "c"
reference = "r/c:1"
"#,
        )
        .unwrap();
        merge(&mut base, over);
        assert_eq!(base["interval"].as_str(), Some("1m"));
        assert_eq!(base["retain"].as_integer(), Some(3));
        let targets = base["target"].as_array().unwrap();
        let refs: Vec<&str> = targets
            .iter()
            .map(|t| t["reference"].as_str().unwrap())
            .collect();
        assert_eq!(refs, ["r/a:1", "r/b:2", "r/c:1"]);
    }
}
