//! `offload-server`: Offload with its built-in tasks. A program with tasks
//! of its own has the same `main`, with its `TaskSet`.

fn main() -> std::process::ExitCode {
    offload_server::main(offload_server::TaskSet::builtin())
}
