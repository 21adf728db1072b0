//! The command line: every subcommand and its exit codes in one place.

mod logging;
mod progress;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::agent::decide::Step;
use crate::agent::{self, Context, Done, Reporter, Runner};
use crate::config::{self, ConfigError, Settings, Target};
use crate::registry::Observer;
use crate::service::daemon::{self, Daemon};
use crate::service::status::Report;
use crate::text::{error_chain, printable};
use logging::LogFormat;

/// Exit code for an invalid config or bad usage.
const EXIT_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "bootsync",
    version,
    about = "Keeps matchbox boot assets in step with an OCI image tag"
)]
pub struct Cli {
    /// Config file.
    #[arg(long, global = true, env = "BOOTSYNC_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: sync every target now, then poll each every `interval`; serve the HTTP API.
    Run,
    /// One pass over the targets, then exit: 0 when all are published, 1 when any failed.
    Sync {
        /// One pass, then exit (required: the daemon is `bootsync run`).
        #[arg(long, required = true)]
        once: bool,
        /// Only these targets (repeatable).
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        /// Resolve and report what would be downloaded; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Switch a target back to a retained version (re-verified first) and pin it there. Asks
    /// the running daemon when there is one; otherwise does it here.
    Rollback {
        target: String,
        /// Digest (or unique hex prefix) of the version [default: the one before the current].
        #[arg(long, value_name = "DIGEST")]
        to: Option<String>,
    },
    /// Lift a rollback pin and sync: the target follows its reference again (through the
    /// daemon when one runs).
    Unpin { target: String },
    /// Validate the config file and print what it defines.
    CheckConfig,
    /// Show what an image offers for netboot: platforms, layers, boot files and their formats,
    /// and a `[[target]]` for the config. Reads layers only until a kernel or UKI is found;
    /// writes nothing. Registry settings come from the config when there is one.
    Inspect {
        /// An image reference, e.g. ghcr.io/siderolabs/installer:v1.11.5
        reference: String,
        /// os/arch[/variant] [default: linux/arm64, or the index's only platform]
        #[arg(long)]
        platform: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Talk plain HTTP to the registry (a local registry or mirror without TLS).
        #[arg(long)]
        insecure: bool,
    },
    /// Show the daemon's status (from its `/status`).
    Status {
        /// Base URL of the daemon's API [default: http://<listen from the config>].
        #[arg(long)]
        url: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The config is read once: it may set the log level (RUST_LOG wins); its errors are printed
    // by the command that needs it.
    let loaded = Settings::load(&cli.config);
    logging::init(
        cli.log_format,
        loaded.as_ref().ok().and_then(|s| s.log_level.as_deref()),
    );
    // reqwest is built without a TLS provider of its own (aws-lc is slow to build); use ring.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli, loaded));
    match result {
        Ok(code) => code,
        Err(e) => {
            // Each cause once, control characters escaped.
            let e: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("error: {}", printable(&error_chain(e)));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli, loaded: Result<Settings, ConfigError>) -> Result<ExitCode> {
    let settings = match cli.command {
        Command::Status { url, json } => {
            return status(loaded.as_ref().ok(), url.as_deref(), json).await
        }
        Command::Inspect {
            reference,
            platform,
            json,
            insecure,
        } => return inspect(loaded, &reference, platform.as_deref(), json, insecure).await,
        _ => match loaded {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        },
    };
    match cli.command {
        Command::Run => run(settings, &cli.config).await,
        Command::Sync {
            targets,
            dry_run: false,
            ..
        } => sync_once(settings, &targets).await,
        Command::Sync {
            targets,
            dry_run: true,
            ..
        } => dry_run(settings, &targets).await,
        Command::Rollback { target, to } => rollback(settings, &target, to).await,
        Command::Unpin { target } => unpin(settings, &target).await,
        Command::CheckConfig => {
            check_config(&cli.config, &settings);
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { .. } | Command::Inspect { .. } => Ok(ExitCode::SUCCESS),
    }
}

fn check_config(path: &Path, s: &Settings) {
    println!(
        "{}: ok (interval {}, listen {}, retain {})",
        path.display(),
        humantime::format_duration(s.interval),
        s.listen,
        s.retain
    );
    for t in &s.targets {
        println!(
            "target {}: {} [{}] -> {}",
            t.name,
            t.reference,
            t.platform,
            t.dest.display()
        );
        for (i, layout) in t.layouts.iter().enumerate() {
            if t.layouts.len() > 1 {
                println!("  layout {}:", i + 1);
            }
            for f in &layout.files {
                let what = if f.is_dir { "dir " } else { "file" };
                println!(
                    "  {what} {} -> {} ({})",
                    f.source,
                    f.outputs().join(", "),
                    f.kind
                );
            }
        }
    }
}

fn selected<'a>(settings: &'a Settings, only: &[String]) -> Result<Vec<&'a Target>, String> {
    for name in only {
        if settings.target(name).is_none() {
            return Err(format!("no target named {name:?} in the config"));
        }
    }
    Ok(settings
        .targets
        .iter()
        .filter(|t| only.is_empty() || only.contains(&t.name))
        .collect())
}

/// What a one-shot command reports: a progress line per layer on a terminal.
struct Terminal {
    progress: bool,
}

impl Reporter for Terminal {
    fn observer(&self, target: &str) -> Option<Arc<dyn Observer>> {
        self.progress.then(|| progress::observer(target))
    }
}

fn one_shot(settings: Settings) -> Context {
    let progress = std::io::stderr().is_terminal();
    Context::new(settings, Arc::new(Terminal { progress }))
}

async fn sync_once(settings: Settings, only: &[String]) -> Result<ExitCode> {
    let cx = one_shot(settings);
    let targets = match selected(&cx.settings, only) {
        Ok(t) => t.into_iter().cloned().collect::<Vec<_>>(),
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let mut failed = 0;
    for target in targets {
        let mut runner = Runner::new(cx.clone(), target.clone()).await;
        match runner.sync(false).await {
            Ok(done) => print_done(&target.name, &done),
            Err(f) => {
                eprintln!("error: {}", f.text);
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_done(name: &str, done: &Done) {
    match &done.serving {
        Some(m) => println!(
            "{name}: {} {} ({} files)",
            done.label.replace('_', " "),
            m.digest,
            m.files.len()
        ),
        None => println!("{name}: {}", done.label.replace('_', " ")),
    }
}

async fn dry_run(settings: Settings, only: &[String]) -> Result<ExitCode> {
    let cx = one_shot(settings);
    let targets = match selected(&cx.settings, only) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let mut failed = false;
    for target in targets {
        let plan = match agent::plan(&cx, target).await {
            Ok(plan) => plan,
            Err(e) => {
                eprintln!(
                    "error: target {}: {}",
                    target.name,
                    printable(&error_chain(&e))
                );
                failed = true;
                continue;
            }
        };
        let name = &target.name;
        if let Some(d) = &plan.stale_pin {
            println!("{name}: a pin to {d} was made under another config; a sync removes it");
        }
        let manifest = plan
            .manifest
            .as_ref()
            .map_or_else(String::new, ToString::to_string);
        let tag = plan
            .tag
            .as_ref()
            .map_or_else(String::new, ToString::to_string);
        match &plan.step {
            Step::UpToDate => println!("{name}: up to date ({manifest}); nothing would be downloaded"),
            Step::Retag => println!("{name}: up to date ({manifest}); the tag moved to {tag}, which would be recorded"),
            Step::ServePinned { switch: false } => println!("{name}: pinned; nothing would be downloaded"),
            Step::ServePinned { switch: true } => println!("{name}: pinned; would switch to the pinned version (no download)"),
            Step::PinnedMissing => {
                println!("{name}: would fail: pinned to a version that is not intact in the store");
                failed = true;
            }
            Step::PinnedUnverified => {
                println!("{name}: would fail: pinned to a version not signed as the [verify] policy asks");
                failed = true;
            }
            Step::VerifyCurrent | Step::VerifyPinned => println!("{name}: would re-hash what is served before trusting it"),
            Step::VerifyRetained => println!(
                "{name}: would re-hash the retained version {manifest} (tag {tag}) and switch to it without a download, or download it again if it is damaged"
            ),
            Step::Reactivate => println!("{name}: would switch to the retained version {manifest} (no download)"),
            Step::Download => {
                let mut problems = plan
                    .preview
                    .as_ref()
                    .map(|p| p.problems.clone())
                    .unwrap_or_default();
                problems.extend(plan.no_space.clone());
                if problems.is_empty() {
                    println!(
                        "{name}: would download {manifest} (tag {tag}) and publish it once its files are found and checked"
                    );
                } else {
                    println!(
                        "{name}: would fail to publish {manifest} (tag {tag}): {}",
                        printable(&problems.join("; "))
                    );
                    failed = true;
                }
                if let Some(p) = &plan.preview {
                    if !p.known {
                        println!("  which layers hold the files is known only once they are read; layers, top first, read until a layout is complete:");
                    }
                    for (digest, size, note) in &p.layers {
                        println!("  {digest}  {:.1} MB  {}", *size as f64 / 1e6, printable(note));
                    }
                }
            }
            Step::Resolve | Step::FetchManifest | Step::VerifySignature => {
                println!("{name}: undecided");
            }
        }
        match (&plan.signer, target.verify.is_some()) {
            (Some(s), _) => println!(
                "  {tag} is signed by {s}, found at {}",
                printable(&s.source)
            ),
            (None, false) => {
                println!("  unverified: no [target.verify] policy, signatures are not checked")
            }
            (None, true) => {}
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Where the daemon's API listens, as seen from here.
fn api_base(settings: Option<&Settings>) -> String {
    let listen = settings
        .map(|s| s.listen)
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 9090)));
    // A daemon listening on every address is reached on loopback.
    let host = if listen.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port())
    } else {
        listen
    };
    format!("http://{host}")
}

/// A client for the daemon's own API: no proxy (the environment's would apply to loopback too).
fn api_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(150))
        .no_proxy()
        .build()
        .context("building HTTP client")
}

/// Sends a command to the running daemon. `None` when no daemon answers (then the CLI does it
/// itself); otherwise the daemon's JSON answer, or its error.
async fn ask_daemon(
    settings: &Settings,
    path: &str,
    body: serde_json::Value,
) -> Result<Option<serde_json::Value>> {
    let url = format!("{}{path}", api_base(Some(settings)));
    let mut req = api_client()?
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string());
    if let Some(token) = &settings.api_token {
        req = req.bearer_auth(&token.0);
    }
    let response = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("asking the daemon at {url}")),
    };
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("reading the daemon's answer from {url}"))?;
    let answer: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("the daemon at {url} did not answer JSON"))?;
    if !status.is_success() {
        let why = answer["error"].as_str().unwrap_or("no reason given");
        bail!("the daemon at {url} answered {status}: {}", printable(why));
    }
    Ok(Some(answer))
}

async fn rollback(settings: Settings, name: &str, to: Option<String>) -> Result<ExitCode> {
    let Some(target) = settings.target(name).cloned() else {
        eprintln!("error: no target named {name:?} in the config");
        return Ok(ExitCode::from(EXIT_CONFIG));
    };
    let path = format!("/targets/{name}/rollback");
    let digest = match ask_daemon(&settings, &path, serde_json::json!({ "to": to })).await? {
        Some(answer) => answer["digest"].as_str().unwrap_or_default().to_string(),
        None => {
            let mut runner = Runner::new(one_shot(settings), target).await;
            runner
                .rollback(to)
                .await
                .map_err(|e| anyhow::anyhow!(e))
                .with_context(|| format!("rolling back {name}"))?
                .digest
                .to_string()
        }
    };
    println!(
        "{name}: now serving {digest} (pinned; `bootsync unpin {name}` follows the reference again)"
    );
    Ok(ExitCode::SUCCESS)
}

async fn unpin(settings: Settings, name: &str) -> Result<ExitCode> {
    let Some(target) = settings.target(name).cloned() else {
        eprintln!("error: no target named {name:?} in the config");
        return Ok(ExitCode::from(EXIT_CONFIG));
    };
    let reference = target.reference.to_string();
    let path = format!("/targets/{name}/unpin");
    let (was, synced) = match ask_daemon(&settings, &path, serde_json::json!({})).await? {
        Some(answer) => (answer["was_pinned"].as_bool().unwrap_or(false), None),
        None => {
            let mut runner = Runner::new(one_shot(settings), target).await;
            let (was, synced) = runner.unpin().await.map_err(|e| anyhow::anyhow!(e))?;
            (was, Some(synced))
        }
    };
    if was {
        println!("{name}: unpinned; following {reference}");
    } else {
        println!("{name}: was not pinned");
    }
    match synced {
        Some(Ok(done)) => print_done(name, &done),
        Some(Err(f)) => {
            eprintln!("error: {}", f.text);
            return Ok(ExitCode::FAILURE);
        }
        None => println!("{name}: the daemon syncs it now"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(settings: Settings, config_path: &Path) -> Result<ExitCode> {
    // Absolute, so the watcher and reloads do not depend on the working directory.
    let config_path =
        &std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf());
    let listen = settings.listen;
    let daemon_settings_files: Vec<PathBuf> = settings
        .targets
        .iter()
        .filter_map(|t| t.verify.as_ref())
        .flat_map(|p| p.files())
        .collect();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let daemon = Daemon::new(settings, config_path);
    let (stop_tx, stop_rx) = watch::channel(false);

    let api = {
        let mut stop = stop_rx.clone();
        let app = crate::service::http::router(daemon.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    };
    let supervisor = tokio::spawn(daemon.clone().run(stop_rx.clone()));
    // Ready once every target's startup recovery is done (each loop's first step).
    daemon.recovered().await;
    tracing::info!(%listen, targets = daemon.target_names().len(), "bootsync started");
    crate::service::systemd::ready();
    crate::service::systemd::status(&daemon.board().summary());
    crate::service::systemd::spawn_watchdog();
    {
        // STATUS= follows the board.
        let (board, mut changes) = (daemon.board().clone(), daemon.board().subscribe());
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                crate::service::systemd::status(&board.summary());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    // Reload on SIGHUP and when the config files change; stop on SIGTERM/SIGINT.
    // Files named by the config are watched too (keys and trusted roots: a refreshed
    // trusted_root.json takes effect without a reload by hand). Absolute, as the config path.
    let named: Vec<PathBuf> = daemon_settings_files
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let _config_watch = match daemon::watch_config(config_path, &named) {
        Some((watcher, events)) => {
            tokio::spawn(daemon::reload_on_change(
                daemon.clone(),
                events,
                stop_rx.clone(),
            ));
            Some(watcher)
        }
        None => None,
    };
    {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            handle_signals(daemon).await;
            tracing::info!("shutting down");
            crate::service::systemd::stopping();
            let _ = stop_tx.send(true);
        });
    }
    if let Err(e) = supervisor.await {
        bail!("the supervisor task failed: {e}");
    }
    match api.await {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => Err(e).context("HTTP API failed"),
        Err(e) => bail!("HTTP API task failed: {e}"),
    }
}

/// Reloads on SIGHUP; returns on SIGTERM or SIGINT.
async fn handle_signals(daemon: Arc<Daemon>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                daemon.reload();
            }
        }
    }
}

async fn inspect(
    loaded: Result<Settings, crate::config::ConfigError>,
    reference: &str,
    platform: Option<&str>,
    json: bool,
    insecure: bool,
) -> Result<ExitCode> {
    // A config is optional here: without one, registries are reached over HTTPS, anonymously.
    let settings = match loaded {
        Ok(s) => Some(s),
        Err(ConfigError::Read { .. }) => None,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let observer = std::io::stderr()
        .is_terminal()
        .then(|| progress::observer("inspect"));
    let report =
        crate::inspect::inspect(reference, platform, settings.as_ref(), insecure, observer)
            .await
            .with_context(|| format!("inspecting {reference}"))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        );
    } else {
        print!("{}", crate::inspect::render(&report));
    }
    Ok(if report.snippet.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn status(settings: Option<&Settings>, url: Option<&str>, json: bool) -> Result<ExitCode> {
    let base = match url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => api_base(settings),
    };
    let url = format!("{base}/status");
    let client = api_client()?;
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("cannot reach bootsync at {url}"))?;
    let body = response
        .error_for_status()
        .with_context(|| format!("GET {url}"))?
        .text()
        .await
        .with_context(|| format!("reading {url}"))?;
    if json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let report: Report = serde_json::from_str(&body)
        .with_context(|| format!("{url} did not return a status document"))?;
    print!("{}", render_table(&report));
    Ok(if report.targets.iter().all(|t| t.last_error.is_none()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A plain table, one line per target, then one line per error.
pub fn render_table(report: &Report) -> String {
    let mut rows = vec![[
        "TARGET".to_string(),
        "STATE".into(),
        "DIGEST".into(),
        "PUBLISHED".into(),
        "LAST CHECK".into(),
        "FAILURES".into(),
        "NEXT CHECK".into(),
    ]];
    for t in &report.targets {
        rows.push([
            t.name.clone(),
            format!("{:?}", t.state).to_lowercase(),
            t.published
                .as_ref()
                .map_or("-".into(), |p| p.digest.short().to_string()),
            t.published
                .as_ref()
                .map_or("-".into(), |p| p.published_at.clone()),
            t.last_check.clone().unwrap_or_else(|| "-".into()),
            t.consecutive_failures.to_string(),
            t.next_check.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for t in &report.targets {
        if let Some(e) = &t.last_error {
            out.push_str(&format!("{}: {e}\n", t.name));
        }
    }
    out
}
