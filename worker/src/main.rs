//! `offload-worker`: a worker process, started by `offload-server` (which
//! can also re-execute itself in this role); not meant to be run by hand.

fn main() -> std::process::ExitCode {
    offload_worker::process::main()
}
