//! The whole `offload-server` program as one function, [`main`], for
//! `offload-server` itself and for any program that embeds Offload with
//! tasks of its own: it parses the flags, environment and config file,
//! checks the tasks, and serves until SIGTERM or SIGINT (or supervises
//! replicas of itself, or, re-executed, is one of its own worker processes).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use offload_worker::{Catalog, TaskSet};

use crate::{
    cluster,
    config::{Args, Config},
    server, shutdown, telemetry,
};

/// Exit status for a bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Runs Offload serving `tasks`, configured by this process's arguments and
/// environment exactly as `offload-server` is, and returns its exit status:
/// 0 after a clean shutdown, 64 for a bad configuration (a task spec the
/// server cannot honour included), 1 for a failure while serving.
///
/// Call it from `main` and nowhere else: the process re-executes itself for
/// its worker processes (and its replicas), which must find the same tasks.
///
/// ```ignore
/// fn main() -> std::process::ExitCode {
///     offload_server::main(offload_server::TaskSet::builtin().with(WordCount))
/// }
/// ```
pub fn main(tasks: TaskSet) -> ExitCode {
    // Re-executed by the front as one of its worker processes.
    if std::env::args_os().nth(1).is_some_and(|a| a == server::WORKER_PROCESS_FLAG) {
        return offload_worker::process::main_with(&tasks);
    }
    // Before any thread or child exists: descriptors inherited from whoever
    // started the front stay with the front.
    if let Err(err) = offload_worker::process::close_on_exec_all() {
        eprintln!("offload-server: cannot mark inherited descriptors close-on-exec: {err}");
        return ExitCode::FAILURE;
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
    let check_only = args.check_config;
    let config = match Config::load(args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("offload-server: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Checked before anything starts, as the rest of the configuration is.
    let catalog = match Catalog::new(&tasks, &config.catalog_options()).map_err(|e| e.to_string()).and_then(|catalog| {
        check_program_names(&config, &catalog)?;
        Ok(catalog)
    }) {
        Ok(catalog) => catalog,
        Err(err) => {
            eprintln!("offload-server: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if check_only {
        return crate::check::run(&config, &catalog);
    }
    match run(config, catalog) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("offload-server: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A worker program's namespace must not hold a task served otherwise.
fn check_program_names(config: &Config, catalog: &Catalog) -> Result<(), String> {
    for program in &config.worker_programs {
        let prefix = format!("{}.", program.name);
        // Offload's own families are taken even where this configuration
        // does not serve them (debug, exec).
        if offload_worker::tasks::FAMILIES.contains(&program.name.as_str()) {
            return Err(format!("worker program {:?}: the name is Offload's own task family", program.name));
        }
        if let Some(task) = catalog.iter().find(|t| t.spec().name.starts_with(&prefix)) {
            return Err(format!(
                "worker program {:?}: its namespace holds task {:?}, served by this program already",
                program.name,
                task.spec().name
            ));
        }
    }
    Ok(())
}

fn run(config: Config, catalog: Catalog) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("offload-io")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let programs = config.worker_programs.iter().map(|p| p.name.as_str());
        let telemetry = telemetry::init(config.log_format, &config.traces, programs);
        // A task's panic fails its call; log it as one line instead of stderr noise.
        std::panic::set_hook(Box::new(|info| tracing::error!(panic = %info, "panic")));
        let stop = shutdown::on_signals().context("cannot install signal handlers")?;
        let served = if config.replicas > 1 {
            let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            let hangups = shutdown::on_hangups().context("cannot install signal handlers")?;
            cluster::supervise(&config, args, stop, hangups).await.context("replica supervisor")
        } else {
            serve_here(&config, catalog, stop).await
        };
        telemetry.shutdown();
        served
    })
}

/// Connections the kernel holds for us before we accept them. The default
/// of 128 overflowed when 200 clients connected in the milliseconds before
/// the accept loop ran (their SYNs were dropped and retried after a second).
const BACKLOG: i32 = 1024;

/// The gRPC listener: address reuse, a backlog of [`BACKLOG`].
fn listener(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Serves in this process (alone, or as one replica of a supervisor).
async fn serve_here(
    config: &Config,
    catalog: Catalog,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let listener = if config.replica {
        // Die with the supervisor (whose runtime thread started us).
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
            .context("PR_SET_PDEATHSIG")?;
        let std_listener = cluster::reuse_port_listener(config.listen, true)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        tokio::net::TcpListener::from_std(std_listener)?
    } else {
        tokio::net::TcpListener::from_std(
            listener(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?,
        )?
    };
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "listening on {local}");
    let replica = config.replica;
    server::serve(config, catalog, listener, stop, move || {
        if replica {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", cluster::READY_LINE);
            let _ = out.flush();
        }
    })
    .await?;
    Ok(())
}
