//! The config file as written: every key optional, unknown keys rejected.
//!
//! Nothing here is checked beyond TOML types; `validate` turns these fragments into typed
//! settings (the split zincati uses in its `src/config/`).

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub interval: Option<String>,
    pub listen: Option<String>,
    pub retain: Option<i64>,
    pub assets_root: Option<String>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub stall_timeout: Option<String>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub name: Option<String>,
    pub reference: Option<String>,
    pub platform: Option<String>,
    pub dest: Option<String>,
    pub preset: Option<String>,
    #[serde(default)]
    pub files: Vec<RawFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub source: Option<String>,
    pub source_dir: Option<String>,
    pub name: Option<String>,
}
