//! `offload-server --check-config`: after the configuration and the tasks
//! are checked (as at every start), starts one of Offload's own worker
//! processes and one worker of each `[[worker_program]]` through the whole
//! handshake, in the sandbox the server would use, prints what each said or
//! why it failed (with what it wrote to stderr), and exits 0 only if every
//! one started. Nothing is served.

use std::{process::ExitCode, sync::Arc};

use offload_worker::Catalog;

use crate::{
    config::Config,
    isolated::{
        program::{self, Declared},
        sandbox::Sandbox,
        worker::{StartError, WorkerOptions, WorkerProcess},
    },
    server,
};

/// Starts one worker of each kind and reports; the exit status says
/// whether all of them started.
pub fn run(config: &Config, catalog: &Catalog) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("offload-server: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let all_started = runtime.block_on(async {
        let sandbox = match Sandbox::detect(config.worker_sandbox) {
            Ok(sandbox) => sandbox,
            Err(err) => {
                println!("worker sandbox: FAILED: {err}");
                return false;
            }
        };
        let mut all_started = true;
        let own = server::isolated_options(config, catalog, &sandbox, 0).worker;
        all_started &= start_one("Offload's worker process", &own, None).await;
        for program in &config.worker_programs {
            let declared = Arc::new(Declared::default());
            let options = program::worker_options(program, server::max_frame(config), &sandbox, Arc::clone(&declared));
            let what = format!("worker program {:?}", program.name);
            all_started &= start_one(&what, &options, Some(&declared)).await;
        }
        all_started
    });
    if all_started { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Starts one worker with `options`, prints how it went, and retires it.
async fn start_one(what: &str, options: &WorkerOptions, declared: Option<&Declared>) -> bool {
    match WorkerProcess::spawn(options).await {
        Ok(worker) => {
            let tasks = declared.and_then(Declared::get).map(|tasks| tasks.tasks.keys().copied().collect::<Vec<_>>());
            match tasks {
                Some(tasks) => println!("{what}: ok, pid {}, serves {}", worker.pid(), tasks.join(", ")),
                None => println!("{what}: ok, pid {}", worker.pid()),
            }
            worker.retire(options.kill_grace * 5).await;
            true
        }
        Err(err) => {
            println!("{what}: FAILED: {err}");
            if let StartError::Handshake { stderr, .. } = &err {
                for line in stderr {
                    println!("  | {line}");
                }
            }
            false
        }
    }
}
