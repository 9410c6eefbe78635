//! kilnd: the bridge daemon. Reads its TOML configuration, builds the
//! configured backends, re-adopts unfinished grants and serves the API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kiln_bridge::api::{self, AppState};
use kiln_bridge::backends::{self, BuildContext};
use kiln_bridge::config::Config;
use kiln_bridge::dir_lock::{DirLock, LockError};
use kiln_bridge::fleet::Fleet;
use kiln_bridge::manager::{GrantManager, ManagerSettings, DEFAULT_TAG_TTL};
use kiln_bridge::store::Store;

/// Held in the state directory for kilnd's whole life.
const LOCK_FILE: &str = "kilnd.lock";

#[derive(Parser)]
#[command(about = "kiln's bridge daemon: grants in, instances out")]
struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = "/etc/kiln/kilnd.toml")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kilnd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole chain; the key at fault is in it.
            eprintln!("kilnd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person: logs often go to files (shim.log, journals).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let config = Config::load(&args.config)?;
    if config.capacity.is_some() {
        tracing::warn!(
            "the [capacity] table is deprecated: set reserve_vcpus, reserve_ram_mib and \
             overcommit in each kind = \"local\" [[backend]] table"
        );
    }
    // Before anything reads or changes state (restart recovery, pruning):
    // a second kilnd on this directory would fail the first one's grants.
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("Cannot create {}", config.state_dir.display()))?;
    let _lock = DirLock::acquire(&config.state_dir, LOCK_FILE).map_err(|e| match e {
        LockError::Held { .. } => anyhow::Error::new(e).context("Another kilnd uses this state"),
        _ => anyhow::Error::new(e),
    })?;
    let tokens = config.read_tokens()?;
    // Before anything starts: a bad certificate ends kilnd, not a request.
    let tls = config
        .tls
        .as_ref()
        .map(|t| api::tls::acceptor(&t.cert, &t.key))
        .transpose()
        .context("Invalid configuration key tls")?;
    let store = Arc::new(Store::open(&config.state_dir)?);
    let ctx = BuildContext {
        region: config.region.clone(),
        state_dir: config.state_dir.clone(),
        insecure_registries: config.insecure_registries.clone(),
        bridge_id: kiln_bridge::bridge_id::load_or_create(&config.state_dir)?,
        live_grants: Some(Arc::clone(&store) as Arc<dyn backends::LiveGrants>),
    };
    let backends = backends::build(&config.backends, &ctx)?;
    if backends.is_empty() {
        tracing::warn!("no backends configured: every grant will be refused");
    }
    let fleet = Arc::new(Fleet::new(backends)?);
    let settings = ManagerSettings {
        tag_ttl: Some(
            config
                .image_tag_ttl_secs
                .map_or(DEFAULT_TAG_TTL, Duration::from_secs),
        ),
        insecure_registries: config.insecure_registries.clone(),
        ..ManagerSettings::default()
    };
    let manager = GrantManager::open(store, fleet, settings)?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("Cannot listen on {}", config.listen))?;
    if tls.is_none() && !config.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.listen, "insecure_http: bearer tokens cross the network in clear");
    }
    tracing::info!(listen = %config.listen, tls = tls.is_some(), tokens = tokens.len(), state_dir = %config.state_dir.display(), "kilnd serving");
    let state = AppState {
        manager: Arc::clone(&manager),
        tokens: api::Tokens::new(&tokens),
    };
    api::serve_tls(listener, state, tls, stop_signal()).await?;
    // Instances keep running; the next kilnd re-adopts them.
    manager.shutdown();
    tracing::info!("kilnd stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
