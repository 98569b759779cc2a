//! The smallest complete program serving a task of its own, as the README's
//! "Your own tasks" section shows it (built by `cargo test`, so the README's
//! copy cannot rot): `my.repeat`, the input `times` times, in POOL or
//! ISOLATED, beside the built-in tasks.

use std::time::Duration;

use bytes::Bytes;
use offload_task::{Context, Job, Mode, ParamSpec, Params, Task, TaskError, TaskSpec};

struct Repeat;

impl Task for Repeat {
    fn spec(&self) -> &TaskSpec {
        const SPEC: TaskSpec = TaskSpec {
            name: "my.repeat",
            cacheable: true,
            version: 1,
            description: "the input, `times` times",
            default_mode: Mode::Pool,
            allowed_modes: &[Mode::Pool, Mode::Isolated],
            params: &[ParamSpec::required("times", "how many times, 0..=100")],
        };
        &SPEC
    }

    fn prepare(&self, params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
        Ok(Box::new(Times(params.int("times", 0..=100)?)))
    }
}

struct Times(usize);

impl Job for Times {
    // Admission's estimate (copying runs at about a byte a nanosecond); the
    // server corrects it from measured runs.
    fn estimate(&self, input_len: usize) -> Option<Duration> {
        Some(Duration::from_nanos((input_len * self.0) as u64))
    }

    fn run(&self, ctx: &Context, input: Bytes) -> Result<Bytes, TaskError> {
        ctx.check()?;
        Ok(input.repeat(self.0).into())
    }
}

fn main() -> std::process::ExitCode {
    offload_server::main(offload_server::TaskSet::builtin().with(Repeat))
}
