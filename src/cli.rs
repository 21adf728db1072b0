//! The command line: every subcommand and its exit codes in one place.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::config::{self, Settings};
use std::io::IsTerminal;
use std::sync::Arc;

use crate::daemon::{self, Daemon};
use crate::logging::{self, LogFormat};
use crate::status::{Board, Report};
use crate::sync::Context as SyncContext;

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
        /// One pass and exit (the only mode of `sync`; `run` is the daemon).
        #[arg(long)]
        once: bool,
        /// Only these targets (repeatable).
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        /// Resolve and report what would be downloaded; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Switch a target back to a retained version (re-verified first) and pin it there.
    Rollback {
        target: String,
        /// Digest (or unique hex prefix) of the version [default: the one before the current].
        #[arg(long, value_name = "DIGEST")]
        to: Option<String>,
    },
    /// Lift a rollback pin: the target follows its reference again.
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
    // The config may set the log level; RUST_LOG wins. Config errors are printed either way.
    let level = Settings::load(&cli.config).ok().and_then(|s| s.log_level);
    logging::init(cli.log_format, level.as_deref());
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
    let result = runtime.block_on(dispatch(cli));
    match result {
        Ok(code) => code,
        Err(e) => {
            // Each cause once, control characters escaped.
            let e: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("error: {}", daemon::printable(&daemon::error_chain(e)));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    if let Command::Status { url, json } = &cli.command {
        return status(&cli.config, url.as_deref(), *json).await;
    }
    if let Command::Inspect {
        reference,
        platform,
        json,
        insecure,
    } = &cli.command
    {
        return inspect(
            &cli.config,
            reference,
            platform.as_deref(),
            *json,
            *insecure,
        )
        .await;
    }
    let settings = match Settings::load(&cli.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    match cli.command {
        Command::Run => run(settings, &cli.config).await,
        Command::Sync {
            once: _,
            targets,
            dry_run: false,
        } => sync_once(settings, &targets).await,
        Command::Sync {
            targets,
            dry_run: true,
            ..
        } => dry_run(settings, &targets).await,
        Command::Rollback { target, to } => rollback(settings, &target, to.as_deref()),
        Command::Unpin { target } => unpin(settings, &target),
        Command::CheckConfig => {
            check_config(&cli.config, &settings);
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { .. } | Command::Inspect { .. } => unreachable!("handled above"),
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

fn selected<'a>(
    settings: &'a Settings,
    only: &[String],
) -> Result<Vec<&'a crate::config::Target>, String> {
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

async fn sync_once(settings: Settings, only: &[String]) -> Result<ExitCode> {
    let mut cx = SyncContext::new(settings);
    if std::io::stderr().is_terminal() {
        cx.progress = Some(Arc::new(crate::progress::TerminalProgress));
    }
    let targets = match selected(&cx.settings, only) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let board = Board::new(&cx.settings.targets);
    let mut failed = 0;
    for target in targets {
        match daemon::sync_and_record(&cx, target, &board, false)
            .await
            .result
        {
            Ok(outcome) => {
                let m = outcome.manifest();
                let what = outcome.label().replace('_', " ");
                println!(
                    "{}: {what} {} ({} files)",
                    target.name,
                    m.digest,
                    m.files.len()
                );
            }
            Err(text) => {
                eprintln!("error: {text}");
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

async fn dry_run(settings: Settings, only: &[String]) -> Result<ExitCode> {
    let cx = SyncContext::new(settings);
    let targets = match selected(&cx.settings, only) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let mut failed = false;
    for target in targets {
        match crate::sync::plan_target(&cx, target).await {
            Ok(plan) => {
                use crate::sync::PlanAction;
                match plan.action {
                    PlanAction::UpToDate => {
                        println!("{}: up to date ({})", target.name, plan.manifest_digest)
                    }
                    PlanAction::Pinned(d) => println!(
                        "{}: pinned to {d}; nothing would be downloaded",
                        target.name
                    ),
                    PlanAction::Reactivate => {
                        println!(
                            "{}: would switch to the retained version {} (no download)",
                            target.name, plan.manifest_digest
                        )
                    }
                    PlanAction::Download {
                        layers,
                        problems,
                        known,
                    } => {
                        if problems.is_empty() {
                            println!(
                                "{}: would download {} (tag {}) and publish it once its files are found and checked",
                                target.name, plan.manifest_digest, plan.tag_digest
                            );
                        } else {
                            println!(
                                "{}: would fail to publish {} (tag {}): {}",
                                target.name,
                                plan.manifest_digest,
                                plan.tag_digest,
                                daemon::printable(&problems.join("; "))
                            );
                            failed = true;
                        }
                        if !known {
                            println!("  which layers hold the files is known only once they are read; layers, top first, read until a layout is complete:");
                        }
                        for (digest, size, note) in layers {
                            println!(
                                "  {digest}  {:.1} MB  {}",
                                size as f64 / 1e6,
                                daemon::printable(&note)
                            );
                        }
                    }
                }
            }
            Err(e) => {
                eprintln!(
                    "error: target {}: {}",
                    target.name,
                    daemon::printable(&daemon::error_chain(&e))
                );
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn rollback(settings: Settings, name: &str, to: Option<&str>) -> Result<ExitCode> {
    let Some(target) = settings.target(name) else {
        eprintln!("error: no target named {name:?} in the config");
        return Ok(ExitCode::from(EXIT_CONFIG));
    };
    let m = crate::sync::rollback(&settings, target, to)
        .with_context(|| format!("rolling back {name}"))?;
    println!(
        "{name}: now serving {} (pinned; `bootsync unpin {name}` follows the reference again)",
        m.digest
    );
    Ok(ExitCode::SUCCESS)
}

fn unpin(settings: Settings, name: &str) -> Result<ExitCode> {
    if settings.target(name).is_none() {
        eprintln!("error: no target named {name:?} in the config");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    let was = crate::pins::clear(&settings.state_dir, name).with_context(|| {
        format!(
            "removing the pin of {name} in {}",
            settings.state_dir.display()
        )
    })?;
    if was {
        println!(
            "{name}: unpinned; the next sync follows {}",
            settings.target(name).map_or("", |t| t.reference.as_str())
        );
    } else {
        println!("{name}: was not pinned");
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(settings: Settings, config_path: &Path) -> Result<ExitCode> {
    // Absolute, so the watcher and reloads do not depend on the working directory.
    let config_path =
        &std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf());
    let cx = SyncContext::new(settings);
    let listen = cx.settings.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let board = Board::new(&cx.settings.targets);
    let daemon = Daemon::new(cx, board, config_path);
    let (stop_tx, stop_rx) = watch::channel(false);

    let api = {
        let mut stop = stop_rx.clone();
        let app = crate::http::router(daemon.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    };
    daemon.recover_all().await;
    tracing::info!(%listen, targets = daemon.target_names().len(), "bootsync started");
    crate::systemd::ready();
    crate::systemd::status(&daemon.board().summary());
    crate::systemd::spawn_watchdog();

    // Reload on SIGHUP and when the config files change; stop on SIGTERM/SIGINT.
    let _config_watch = match daemon::watch_config(config_path) {
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
            crate::systemd::stopping();
            let _ = stop_tx.send(true);
        });
    }
    daemon.run(stop_rx).await;
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
    config_path: &Path,
    reference: &str,
    platform: Option<&str>,
    json: bool,
    insecure: bool,
) -> Result<ExitCode> {
    // A config is optional here: without one, registries are reached over HTTPS, anonymously.
    let settings = match Settings::load(config_path) {
        Ok(s) => Some(s),
        Err(crate::config::ConfigError::Read { .. }) => None,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let observer: Option<Arc<dyn crate::registry::Observer>> = if std::io::stderr().is_terminal() {
        use crate::sync::ProgressFactory as _;
        Some(crate::progress::TerminalProgress.observer(
            "inspect",
            crate::metrics::Metrics::new().observer("inspect"),
        ))
    } else {
        None
    };
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

async fn status(config_path: &Path, url: Option<&str>, json: bool) -> Result<ExitCode> {
    let base = match url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let listen = Settings::load(config_path)
                .map(|s| s.listen.to_string())
                .unwrap_or_else(|_| "127.0.0.1:9090".to_string());
            format!("http://{listen}")
        }
    };
    let url = format!("{base}/status");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("building HTTP client")?;
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

fn short(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("sha256:{}", &hex[..hex.len().min(12)])
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
                .map_or("-".into(), |p| short(&p.digest)),
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
