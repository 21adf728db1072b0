//! The command line: every subcommand and its exit codes in one place.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::config::{self, Settings};
use crate::daemon;
use crate::logging::{self, LogFormat};
use crate::status::{Board, Report};
use crate::sync::Outcome;

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
    },
    /// Validate the config file and print what it defines.
    CheckConfig,
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
    logging::init(cli.log_format);
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
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    if let Command::Status { url, json } = &cli.command {
        return status(&cli.config, url.as_deref(), *json).await;
    }
    let settings = match Settings::load(&cli.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    match cli.command {
        Command::Run => run(settings).await,
        Command::Sync { once: _, targets } => sync_once(settings, &targets).await,
        Command::CheckConfig => {
            check_config(&cli.config, &settings);
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { .. } => unreachable!("handled above"),
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
        for f in &t.files {
            let kind = if f.is_dir { "dir " } else { "file" };
            println!("  {kind} {} -> {}", f.source, f.name);
        }
    }
}

async fn sync_once(settings: Settings, only: &[String]) -> Result<ExitCode> {
    let cx = crate::sync::Context::new(settings);
    let settings = cx.settings.clone();
    for name in only {
        if !settings.targets.iter().any(|t| &t.name == name) {
            eprintln!("error: no target named {name:?} in the config");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    }
    let board = Board::new(&settings.targets);
    let mut failed = 0;
    for target in settings
        .targets
        .iter()
        .filter(|t| only.is_empty() || only.contains(&t.name))
    {
        match daemon::sync_and_record(&cx, target, &board).await {
            Ok(outcome) => {
                let (what, m) = match &outcome {
                    Outcome::UpToDate(m) => ("up to date", m),
                    Outcome::Reactivated(m) => ("re-activated", m),
                    Outcome::Published(m) => ("published", m),
                };
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

async fn run(settings: Settings) -> Result<ExitCode> {
    let cx = crate::sync::Context::new(settings);
    let settings = cx.settings.clone();
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let board = Board::new(&settings.targets);
    let (stop_tx, stop_rx) = watch::channel(false);

    let api = {
        let mut stop = stop_rx.clone();
        let app = crate::http::router(board.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    };
    tracing::info!(listen = %settings.listen, targets = settings.targets.len(), "bootsync started");

    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    daemon::run_loops(cx, board, stop_rx).await;
    match api.await {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => Err(e).context("HTTP API failed"),
        Err(e) => bail!("HTTP API task failed: {e}"),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, Ctrl-C still works through the default action.
            std::future::pending::<()>().await;
        }
    }
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
