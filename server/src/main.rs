//! `offload-server`: parses the configuration, binds the listener and
//! serves until SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use offload_server::{
    config::{Args, Config},
    server, shutdown, telemetry,
};

/// Exit status for a bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // Re-executed by the front as one of its worker processes.
    if std::env::args_os().nth(1).is_some_and(|a| a == server::WORKER_PROCESS_FLAG) {
        return offload_worker::process::main();
    }
    let args = match Args::try_parse() {
        Ok(args) => args,
        // --help and --version print and succeed; a bad flag is a bad configuration.
        Err(err) if !err.use_stderr() => err.exit(),
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match Config::load(args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("offload-server: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("offload-server: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("offload-io")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let telemetry = telemetry::init(config.log_format, &config.traces);
        // A task's panic fails its call; log it as one line instead of stderr noise.
        std::panic::set_hook(Box::new(|info| tracing::error!(panic = %info, "panic")));
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, "listening on {local}");
        let stop = shutdown::on_signals().context("cannot install signal handlers")?;
        let served = server::serve(&config, listener, stop).await;
        telemetry.shutdown();
        Ok(served?)
    })
}
