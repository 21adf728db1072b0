//! How bootsync authenticates: credentials from files or a Docker `config.json` (its `auths`,
//! or a credential helper named by `credHelpers` / `credsStore`), never printed; the
//! Bearer-token dance a `WWW-Authenticate` challenge asks for, and a token cache shared across
//! syncs and refreshed on a 401.
//!
//! A credential helper is run only when a registry asks for credentials, as Docker defines the
//! protocol (`docker-credential-<name> get`, the server on stdin, `{"Username", "Secret"}` JSON
//! on stdout), with a timeout; its answer is kept until the registry rejects it (a 401, or the
//! 403 with which ECR answers an expired token), then asked once more.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    /// Asked of `docker-credential-<helper>` when the registry wants credentials.
    Helper {
        helper: String,
        server: String,
        cache: HelperCache,
    },
}

/// How long a credential helper may take (ECR's asks AWS STS and ECR over the network).
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// A helper's answer larger than this is refused.
const MAX_HELPER_OUTPUT: u64 = 64 << 10;

/// What credential helpers answered, by helper and server, kept across syncs until a
/// registry rejects it.
#[derive(Clone, Default)]
pub struct HelperCache(Arc<Mutex<HashMap<HelperKey, UserSecret>>>);

/// (helper, server)
type HelperKey = (String, String);
/// (username, secret)
type UserSecret = (String, String);

impl Credentials {
    /// Basic credentials to send: the configured ones, or a helper's (run when its answer is
    /// not cached).
    pub(crate) async fn basic(&self) -> Result<Option<(String, String)>, RegistryError> {
        match self {
            Credentials::Basic { username, password } => {
                Ok(Some((username.clone(), password.clone())))
            }
            Credentials::Helper {
                helper,
                server,
                cache,
            } => {
                let key = (helper.clone(), server.clone());
                if let Some(c) = cache.0.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
                    return Ok(Some(c.clone()));
                }
                let answer = run_helper(helper, server).await?;
                if let Some(c) = &answer {
                    cache
                        .0
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, c.clone());
                }
                Ok(answer)
            }
            Credentials::Anonymous | Credentials::Bearer(_) => Ok(None),
        }
    }

    /// Whether new credentials could be asked for after a rejection (a helper's).
    pub(crate) fn renewable(&self) -> bool {
        matches!(self, Credentials::Helper { .. })
    }

    /// Forgets a helper's cached answer (the registry rejected it).
    pub(crate) fn forget(&self) {
        if let Credentials::Helper {
            helper,
            server,
            cache,
        } = self
        {
            cache
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(helper.clone(), server.clone()));
        }
    }
}

/// Runs `docker-credential-<helper> get` for `server`. `None`: the helper has nothing for it
/// (anonymous access is then tried).
async fn run_helper(helper: &str, server: &str) -> Result<Option<(String, String)>, RegistryError> {
    let program = format!("docker-credential-{helper}");
    let fail = |reason: String| RegistryError::Setup {
        host: server.to_string(),
        reason: format!("credential helper {program}: {reason}"),
    };
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(server.as_bytes()).await?;
            stdin.write_all(b"\n").await?;
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let read_out = async {
            if let Some(s) = stdout {
                s.take(MAX_HELPER_OUTPUT).read_to_end(&mut out).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let read_err = async {
            if let Some(s) = stderr {
                s.take(MAX_HELPER_OUTPUT).read_to_end(&mut err).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let (a, b) = tokio::join!(read_out, read_err);
        a?;
        b?;
        let status = child.wait().await?;
        Ok::<_, std::io::Error>((status, out, err))
    };
    let (status, out, err) = tokio::time::timeout(HELPER_TIMEOUT, run)
        .await
        .map_err(|_| fail(format!("no answer within {HELPER_TIMEOUT:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let answer: Option<Answer> = serde_json::from_slice(&out).ok();
    // Its stderr is for the log, with the secret (if it printed it) taken out.
    let mut stderr = String::from_utf8_lossy(&err).trim().to_string();
    if let Some(a) = &answer {
        if !a.secret.is_empty() {
            stderr = stderr.replace(&a.secret, "<redacted>");
        }
    }
    if !stderr.is_empty() {
        tracing::info!(helper = %program, %server, "helper said: {}", crate::text::printable(&stderr.chars().take(300).collect::<String>()));
    }
    if !status.success() {
        // The protocol's "nothing stored": an error message on stdout, such as
        // "credentials not found in native keychain".
        let said = String::from_utf8_lossy(&out);
        if said.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!("exited with {status}")));
    }
    let answer =
        answer.ok_or_else(|| fail("its answer is not {\"Username\", \"Secret\"} JSON".into()))?;
    if answer.username == "<token>" {
        return Err(fail(
            "it gave an identity token, which bootsync does not support".into(),
        ));
    }
    Ok(Some((answer.username, answer.secret)))
}

impl Credentials {
    /// The credentials configured for a registry: its `token_file`, its `username` +
    /// `password_file`, else an `auths` entry for the host in the Docker `config.json`, else
    /// anonymous. Files are read at every sync, so rotating them needs no restart.
    /// The credentials for `host` under `settings` (see [`Credentials::from_settings`]): each
    /// host its own, so a mirror never sees the registry's. Without a config, anonymous.
    pub fn for_host(
        settings: Option<&crate::config::Settings>,
        host: &str,
        helpers: &HelperCache,
    ) -> Result<Credentials, RegistryError> {
        match settings {
            Some(s) => Self::from_settings(&s.registry(host), s.docker_config.as_deref(), helpers),
            None => Ok(Credentials::Anonymous),
        }
    }

    pub fn from_settings(
        settings: &RegistrySettings,
        docker_config: Option<&Path>,
        helpers: &HelperCache,
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
            return docker_auth(&text, &settings.host, helpers)
                .map_err(|e| setup(format!("docker_config {}: {e}", path.display())));
        }
        Ok(Credentials::Anonymous)
    }
}

/// Finds `host` in a Docker `config.json` as Docker does: a `credHelpers` entry for it, else
/// the `credsStore`, else an `auths` entry (keyed by host, with or without a scheme or path;
/// `auth` = base64 of `user:password`, or `username` and `password`).
fn docker_auth(text: &str, host: &str, helpers: &HelperCache) -> Result<Credentials, String> {
    use base64::Engine as _;
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: HashMap<String, DockerAuth>,
        #[serde(default, rename = "credHelpers")]
        cred_helpers: HashMap<String, String>,
        #[serde(rename = "credsStore")]
        creds_store: Option<String>,
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
    let helper = config
        .cred_helpers
        .iter()
        .find(|(k, _)| normalise(k) == host)
        .map(|(_, v)| v.clone())
        .or(config.creds_store.clone())
        .filter(|h| !h.is_empty());
    if let Some(helper) = helper {
        if !helper
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "credential helper name {helper:?} is not a plain name"
            ));
        }
        return Ok(Credentials::Helper {
            helper,
            // Docker Hub's key is its v1 URL; others are the host.
            server: if host == "index.docker.io" {
                "https://index.docker.io/v1/".to_string()
            } else {
                host.to_string()
            },
            cache: helpers.clone(),
        });
    }
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
            Credentials::Helper { helper, .. } => write!(f, "Helper({helper})"),
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

    pub(crate) fn forget(&self, key: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
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
        let h = HelperCache::default();
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
            basic(docker_auth(cfg, "ghcr.io", &h).unwrap()),
            ("robot".into(), "s3cr3t".into())
        );
        assert_eq!(
            basic(docker_auth(cfg, "127.0.0.1:5000", &h).unwrap()),
            ("u".into(), "p".into())
        );
        assert_eq!(
            basic(docker_auth(cfg, "index.docker.io", &h).unwrap()),
            ("d".into(), "h".into())
        );
        assert!(matches!(
            docker_auth(cfg, "quay.io", &h).unwrap(),
            Credentials::Anonymous
        ));
        assert!(docker_auth(cfg, "odd.example", &h)
            .unwrap_err()
            .contains("identity token"));
        let e = docker_auth(
            r#"{"auths": {"x": {"auth": "hunter2 is my password"#,
            "x",
            &h,
        )
        .unwrap_err();
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
