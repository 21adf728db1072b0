//! How bootsync authenticates: credentials from files or a Docker `config.json` (never
//! printed), the Bearer-token dance a `WWW-Authenticate` challenge asks for, and a token cache
//! shared across syncs and refreshed on a 401.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::RegistryError;
use crate::config::RegistrySettings;

/// How to authenticate to a registry.
#[derive(Clone, Default)]
pub enum Credentials {
    #[default]
    Anonymous,
    /// Sent as Basic auth when the registry asks for it, and to the token endpoint.
    Basic { username: String, password: String },
    /// A ready-made bearer token, sent as is.
    Bearer(String),
}

impl Credentials {
    /// The credentials configured for a registry: its `token_file`, its `username` +
    /// `password_file`, else an `auths` entry for the host in the Docker `config.json`, else
    /// anonymous. Files are read at every sync, so rotating them needs no restart.
    pub fn from_settings(
        settings: &RegistrySettings,
        docker_config: Option<&Path>,
    ) -> Result<Credentials, RegistryError> {
        let setup = |reason: String| RegistryError::Setup {
            host: settings.host.clone(),
            reason,
        };
        let read = |key: &str, file: &Path| {
            std::fs::read_to_string(file)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| setup(format!("{key} {}: {e}", file.display())))
        };
        if let Some(file) = &settings.token_file {
            return Ok(Credentials::Bearer(read("token_file", file)?));
        }
        if let (Some(username), Some(file)) = (&settings.username, &settings.password_file) {
            return Ok(Credentials::Basic {
                username: username.clone(),
                password: read("password_file", file)?,
            });
        }
        if let Some(path) = docker_config {
            let text = read("docker_config", path)?;
            return docker_auth(&text, &settings.host)
                .map_err(|e| setup(format!("docker_config {}: {e}", path.display())));
        }
        Ok(Credentials::Anonymous)
    }
}

/// Finds `host` in a Docker `config.json` (`auths` entries keyed by host, with or without a
/// scheme or path; `auth` = base64 of `user:password`, or `username` and `password`).
fn docker_auth(text: &str, host: &str) -> Result<Credentials, String> {
    use base64::Engine as _;
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: HashMap<String, DockerAuth>,
    }
    #[derive(Deserialize)]
    struct DockerAuth {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
        identitytoken: Option<String>,
    }
    // Parse errors from serde_json quote the input: keep them out of messages (secrets).
    let config: DockerConfig = serde_json::from_str(text)
        .map_err(|e| format!("not valid JSON (line {}, column {})", e.line(), e.column()))?;
    let normalise = |key: &str| -> String {
        let k = key.split_once("://").map_or(key, |(_, rest)| rest);
        let k = k.split('/').next().unwrap_or(k);
        if k == "docker.io" || k == "registry-1.docker.io" {
            "index.docker.io".to_string()
        } else {
            k.to_string()
        }
    };
    let Some(entry) = config
        .auths
        .iter()
        .find(|(k, _)| normalise(k) == host)
        .map(|(_, v)| v)
    else {
        return Ok(Credentials::Anonymous);
    };
    if entry.identitytoken.is_some() {
        return Err(format!("the entry for {host} holds an identity token, which bootsync does not support; use username and password"));
    }
    if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
        return Ok(Credentials::Basic {
            username: username.clone(),
            password: password.clone(),
        });
    }
    let auth = entry
        .auth
        .as_deref()
        .ok_or_else(|| format!("the entry for {host} has no auth"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| format!("the auth of {host} is not base64"))?;
    let decoded =
        String::from_utf8(decoded).map_err(|_| format!("the auth of {host} is not UTF-8"))?;
    let (username, password) = decoded
        .split_once(':')
        .ok_or_else(|| format!("the auth of {host} is not user:password"))?;
    Ok(Credentials::Basic {
        username: username.to_string(),
        password: password.to_string(),
    })
}

// Never print secrets, even in debug output.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// Bearer tokens by `host/repository`, kept across syncs (GHCR's anonymous tokens do not
/// expire); a 401 replaces a stale one.
#[derive(Clone, Default)]
pub struct TokenCache(Arc<Mutex<HashMap<String, String>>>);

impl TokenCache {
    pub(crate) fn get(&self, key: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    pub(crate) fn put(&self, key: &str, token: String) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), token);
    }
}

pub(crate) enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
    },
    Basic,
}

pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let challenges = http_auth::parse_challenges(header).ok()?;
    for c in challenges {
        if c.scheme.eq_ignore_ascii_case("bearer") {
            let param = |name: &str| {
                c.params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_unescaped())
            };
            return Some(Challenge::Bearer {
                realm: param("realm")?,
                service: param("service"),
            });
        }
        if c.scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        match parse_challenge(
            r#"Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:a/b:pull""#,
        ) {
            Some(Challenge::Bearer { realm, service }) => {
                assert_eq!(realm, "https://ghcr.io/token");
                assert_eq!(service.as_deref(), Some("ghcr.io"));
            }
            _ => panic!("bearer challenge not recognised"),
        }
        assert!(matches!(
            parse_challenge(r#"Basic realm="test""#),
            Some(Challenge::Basic)
        ));
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn docker_config_entries_are_found_by_host() {
        let cfg = r#"{"auths": {
            "https://ghcr.io": {"auth": "cm9ib3Q6czNjcjN0"},
            "127.0.0.1:5000": {"username": "u", "password": "p"},
            "https://index.docker.io/v1/": {"auth": "ZDpo"},
            "odd.example": {"identitytoken": "x"}
        }}"#;
        let basic = |c: Credentials| match c {
            Credentials::Basic { username, password } => (username, password),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            basic(docker_auth(cfg, "ghcr.io").unwrap()),
            ("robot".into(), "s3cr3t".into())
        );
        assert_eq!(
            basic(docker_auth(cfg, "127.0.0.1:5000").unwrap()),
            ("u".into(), "p".into())
        );
        assert_eq!(
            basic(docker_auth(cfg, "index.docker.io").unwrap()),
            ("d".into(), "h".into())
        );
        assert!(matches!(
            docker_auth(cfg, "quay.io").unwrap(),
            Credentials::Anonymous
        ));
        assert!(docker_auth(cfg, "odd.example")
            .unwrap_err()
            .contains("identity token"));
        let e =
            docker_auth(r#"{"auths": {"x": {"auth": "hunter2 is my password"#, "x").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn credentials_never_print_secrets() {
        let c = Credentials::Basic {
            username: "robot".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Credentials::Bearer("tok123".into())).contains("tok123"));
    }
}
