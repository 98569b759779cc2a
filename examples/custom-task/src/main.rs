//! Offload with a task of its own: `example.wordcount` beside the built-in
//! tasks, and two tasks for tests (`example.panic`, `example.spin`) served
//! only with `--debug-tasks`, like Offload's own `debug.*` tasks. Every flag,
//! environment variable and config key of `offload-server` works unchanged,
//! and ISOLATED calls run in worker processes re-executed from this binary.

use example_tasks::{Panic, Spin, WordCount};
use offload_server::TaskSet;

fn main() -> std::process::ExitCode {
    let tasks = TaskSet::builtin().with(WordCount).with_debug(Panic).with_debug(Spin);
    offload_server::main(tasks)
}
