//! `exec.*`: external programs that operators declare in the server's TOML
//! config. Each runs only in a worker process, with a cleared environment and
//! no shell: the input is its stdin, its stdout the output. Clients choose
//! only declared params, each checked against its pattern and passed as one
//! argument (after its flag, if declared); they never name a program or raw
//! arguments. A non-zero exit fails the call with its status and the tail of
//! its stderr; cancellation, the deadline or the task's timeout kill it.

use std::{
    io::{Read, Write},
    process::{Child, Command, Stdio},
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use bytes::Bytes;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::{Context, Job, Mode, ParamSpec, Params, Task, TaskError, TaskSpec};

/// Bytes of stderr kept for the error message.
const STDERR_TAIL: usize = 2048;
/// How often a running program is checked on.
const POLL: Duration = Duration::from_millis(5);

/// An external program declared as a task (`[[exec]]` in the config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// Task name; must start with `exec.`.
    pub name: String,
    /// What it does, for ListTasks.
    #[serde(default)]
    pub description: String,
    /// Absolute path of the program.
    pub program: String,
    /// Fixed arguments, before any param's.
    #[serde(default)]
    pub args: Vec<String>,
    /// Longest a run may take, in seconds, whatever the call's deadline.
    pub timeout_secs: Option<f64>,
    /// Params clients may give, each becoming an argument.
    #[serde(default)]
    pub params: Vec<ExecParam>,
    /// Largest output accepted, in bytes. Default: 64 MiB.
    pub max_output_bytes: Option<usize>,
    /// What the worker sandbox lets it use besides its own program (which
    /// it may always run): paths to read, write or run, the network.
    #[serde(default)]
    pub sandbox: crate::Allowances,
    /// Whether the program's output is a pure function of its params and
    /// input, so that results may be cached (see `TaskSpec::cacheable`).
    #[serde(default)]
    pub cacheable: bool,
    /// Bumped when the program's output changes (see `TaskSpec::version`).
    #[serde(default = "first_version")]
    pub version: u32,
}

fn first_version() -> u32 {
    1
}

/// A client-settable param of an exec task.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecParam {
    /// Param name.
    pub name: String,
    /// What it means.
    #[serde(default)]
    pub description: String,
    /// A regular expression the whole value must match.
    pub pattern: String,
    /// An argument put before the value (e.g. "--lines"); none: the value alone.
    pub flag: Option<String>,
    /// Value used when the client gives none; none: the param is required.
    pub default: Option<String>,
}

/// Why an exec declaration is unusable.
#[derive(Debug, thiserror::Error)]
#[error("exec task {name:?}: {reason}")]
pub struct ExecSpecError {
    name: String,
    reason: String,
}

impl ExecSpec {
    /// Checks the declaration: name, program, patterns, defaults.
    pub fn validate(&self) -> Result<(), ExecSpecError> {
        let fail = |reason: String| Err(ExecSpecError { name: self.name.clone(), reason });
        if !self.name.starts_with("exec.") || self.name.len() == 5 {
            return fail("the name must start with \"exec.\"".into());
        }
        let program = std::path::Path::new(&self.program);
        if !program.is_absolute() || !program.is_file() {
            return fail(format!("program {:?} is not an absolute path to a file", self.program));
        }
        if self.timeout_secs.is_some_and(|t| !(t > 0.0 && t <= 86_400.0)) {
            return fail("timeout_secs must be in (0, 86400]".into());
        }
        for param in &self.params {
            let regex = match anchored(&param.pattern) {
                Ok(r) => r,
                Err(e) => return fail(format!("param {:?}: bad pattern: {e}", param.name)),
            };
            if let Some(default) = &param.default
                && !regex.is_match(default)
            {
                return fail(format!("param {:?}: default {default:?} does not match its pattern", param.name));
            }
        }
        Ok(())
    }
}

fn anchored(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

/// Adds one task per declaration to `out`; the declarations are validated
/// (by the front's config) and live as long as the process.
pub fn register(out: &mut Vec<Arc<dyn Task>>, specs: &[ExecSpec]) {
    for spec in specs {
        let leak = |s: &str| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
        let params: Vec<ParamSpec> = spec
            .params
            .iter()
            .map(|p| ParamSpec {
                name: leak(&p.name),
                description: leak(&format!("{} (must match {})", p.description, p.pattern)),
                default: p.default.as_deref().map(leak),
            })
            .collect();
        let description = if spec.description.is_empty() {
            format!("runs {} with the input as stdin; output is its stdout", spec.program)
        } else {
            spec.description.clone()
        };
        let patterns = spec.params.iter().map(|p| anchored(&p.pattern).expect("validated pattern")).collect();
        out.push(Arc::new(ExecTask {
            spec: TaskSpec {
                name: leak(&spec.name),
                cacheable: spec.cacheable,
                version: spec.version,
                description: leak(&description),
                default_mode: Mode::Isolated,
                allowed_modes: &[Mode::Isolated],
                params: Box::leak(params.into_boxed_slice()),
            },
            exec: spec.clone(),
            patterns,
        }));
    }
}

struct ExecTask {
    spec: TaskSpec,
    exec: ExecSpec,
    patterns: Vec<Regex>,
}

impl Task for ExecTask {
    fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    fn prepare(&self, params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
        let mut args = self.exec.args.clone();
        for (param, pattern) in self.exec.params.iter().zip(&self.patterns) {
            let value = params.raw(&param.name);
            if !pattern.is_match(value) {
                return Err(TaskError::InvalidParam(format!(
                    "param {:?}: {value:?} does not match {}",
                    param.name, param.pattern
                )));
            }
            args.extend(param.flag.iter().cloned());
            args.push(value.to_string());
        }
        Ok(Box::new(ExecJob {
            name: self.spec.name,
            program: self.exec.program.clone(),
            args,
            timeout: self.exec.timeout_secs.map(Duration::from_secs_f64),
            max_output: self.exec.max_output_bytes.unwrap_or(64 << 20),
        }))
    }
}

struct ExecJob {
    name: &'static str,
    program: String,
    args: Vec<String>,
    timeout: Option<Duration>,
    max_output: usize,
}

/// Kills and reaps the program however the job ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Job for ExecJob {
    fn run(&self, ctx: &Context, input: Bytes) -> Result<Bytes, TaskError> {
        let child = Command::new(&self.program)
            .args(&self.args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| TaskError::Failed(format!("{}: cannot start {}: {e}", self.name, self.program)))?;
        let mut running = Running(child);
        let child = &mut running.0;
        let stdin = child.stdin.take().expect("piped stdin");
        let feeder = std::thread::spawn(move || {
            let mut stdin = stdin;
            // A program that exits without reading all its input is not an error.
            let _ = stdin.write_all(&input);
        });
        let max_output = self.max_output;
        let stdout = collect(child.stdout.take().expect("piped stdout"), max_output + 1, false);
        let stderr = collect(child.stderr.take().expect("piped stderr"), STDERR_TAIL, true);

        let started = Instant::now();
        let status = loop {
            if let Some(status) =
                child.try_wait().map_err(|e| TaskError::Failed(format!("{}: wait: {e}", self.name)))?
            {
                break status;
            }
            if let Some(timeout) = self.timeout
                && started.elapsed() >= timeout
            {
                // `running` kills the program on the way out.
                return Err(TaskError::DeadlineExceeded { after: started.elapsed() });
            }
            // Cancellation or the call's deadline: `running` kills the program.
            ctx.sleep(POLL)?;
        };
        let _ = feeder.join();
        let output = stdout.join().unwrap_or_default();
        let stderr_tail = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).trim().to_string();
        if !status.success() {
            let how = match (status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(sig)) => format!("was killed by signal {sig}"),
                _ => "failed".to_string(),
            };
            return Err(TaskError::ProgramFailed(format!(
                "{}: {} {how}; stderr: {stderr_tail:?}",
                self.name, self.program
            )));
        }
        if output.len() > max_output {
            return Err(TaskError::TooLarge(format!("{}: output exceeds {max_output} bytes", self.name)));
        }
        Ok(Bytes::from(output))
    }
}

/// Reads `pipe` to its end on a thread, keeping at most `limit` bytes (the
/// first ones, or the last ones when `tail`).
fn collect(mut pipe: impl Read + Send + 'static, limit: usize, tail: bool) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > limit {
                if tail {
                    kept.drain(..kept.len() - limit);
                } else {
                    kept.truncate(limit);
                }
            }
        }
        kept
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CancelFlag;
    use std::collections::HashMap;

    fn spec(program: &str, args: &[&str]) -> ExecSpec {
        ExecSpec {
            name: "exec.test".into(),
            description: String::new(),
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout_secs: None,
            params: Vec::new(),
            max_output_bytes: None,
            sandbox: Default::default(),
            cacheable: false,
            version: 1,
        }
    }

    fn run(spec: ExecSpec, params: &[(&str, &str)], input: &[u8], ctx: &Context) -> Result<Bytes, TaskError> {
        spec.validate().unwrap();
        let mut tasks = Vec::new();
        register(&mut tasks, &[spec]);
        let values: HashMap<String, String> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let job = crate::Catalog::prepare(tasks[0].as_ref(), &values)?;
        job.run(ctx, Bytes::copy_from_slice(input))
    }

    fn ctx() -> Context {
        Context::new(None, CancelFlag::new(), None)
    }

    #[test]
    fn stdin_in_stdout_out_with_checked_params() {
        let mut s = spec("/usr/bin/head", &[]);
        s.params.push(ExecParam {
            name: "bytes".into(),
            description: "bytes to keep".into(),
            pattern: "[0-9]{1,6}".into(),
            flag: Some("-c".into()),
            default: Some("3".into()),
        });
        assert_eq!(run(s.clone(), &[], b"abcdef", &ctx()).unwrap().as_ref(), b"abc");
        assert_eq!(run(s.clone(), &[("bytes", "5")], b"abcdef", &ctx()).unwrap().as_ref(), b"abcde");
        let err = run(s, &[("bytes", "5; rm -rf /")], b"", &ctx()).unwrap_err();
        assert!(matches!(err, TaskError::InvalidParam(_)), "{err:?}");
    }

    #[test]
    fn a_failing_program_reports_its_status_and_stderr() {
        let err = run(spec("/bin/sh", &["-c", "echo oops >&2; exit 3"]), &[], b"", &ctx()).unwrap_err();
        let TaskError::ProgramFailed(message) = err else { panic!("{err:?}") };
        assert!(message.contains("exited with status 3") && message.contains("oops"), "{message}");
    }

    #[test]
    fn the_environment_is_cleared() {
        let out = run(spec("/usr/bin/env", &[]), &[], b"", &ctx()).unwrap();
        assert!(out.is_empty(), "{:?}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn timeout_and_cancellation_kill_the_program() {
        let mut s = spec("/bin/sleep", &["30"]);
        s.timeout_secs = Some(0.2);
        let started = Instant::now();
        assert!(matches!(run(s, &[], b"", &ctx()), Err(TaskError::DeadlineExceeded { .. })));
        assert!(started.elapsed() < Duration::from_secs(5));

        let flag = CancelFlag::new();
        let cancel = flag.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            cancel.cancel();
        });
        let ctx = Context::new(None, flag, None);
        let started = Instant::now();
        assert_eq!(run(spec("/bin/sleep", &["30"]), &[], b"", &ctx).unwrap_err(), TaskError::Cancelled);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn bad_declarations_are_refused() {
        assert!(spec("relative/prog", &[]).validate().is_err());
        let mut s = spec("/bin/true", &[]);
        s.name = "wc".into();
        assert!(s.validate().is_err());
        let mut s = spec("/bin/true", &[]);
        s.params.push(ExecParam {
            name: "p".into(),
            description: String::new(),
            pattern: "(".into(),
            flag: None,
            default: None,
        });
        assert!(s.validate().is_err());
    }
}
