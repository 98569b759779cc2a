//! Worker programs: processes in any language that speak the worker
//! protocol (`docs/worker-protocol.md`) and declare their own tasks, run by
//! a supervisor of their own. This module holds their configuration
//! (`[[worker_program]]` in the config file), the checks of what a program
//! declares in its Hello, and the tasks the front builds from a declaration.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use offload_proto::offload::worker::v1::TaskDecl;
use offload_worker::{
    Allowances, Context, Job, Mode, ParamSpec, Params, Task, TaskError, TaskSpec, catalog::check_names,
};
use serde::Deserialize;

use super::{IsolatedOptions, Launch, Supervisor, WorkerOptions, sandbox::Sandbox};
use crate::cost::CostModel;

/// A `[[worker_program]]` table of the config file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramSpec {
    /// The program's name; every task it declares is named `<name>.<task>`.
    pub name: String,
    /// The argv to start one worker; no shell. A relative path (in the
    /// program or an argument) is relative to the config file's folder.
    pub command: Vec<String>,
    /// Warm processes kept running. Default: 1.
    pub workers: Option<usize>,
    /// Variables added to the environment the front passes on (its own,
    /// without its OFFLOAD_* settings).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory. Default: the config file's folder.
    pub cwd: Option<PathBuf>,
    /// Resident memory a worker may reach while it runs a task: past it,
    /// the worker is killed and the call fails with RESOURCE_EXHAUSTED (0:
    /// no limit). An RSS watch, not RLIMIT_AS, which kills runtimes that
    /// reserve address space (V8 reserves gigabytes at start). Default: the
    /// server's --worker-memory-limit-bytes.
    pub memory_limit_bytes: Option<u64>,
    /// Tasks after which a worker is replaced (0: never). Default: the
    /// server's --worker-max-tasks.
    pub max_tasks: Option<u64>,
    /// Resident memory after which a worker is replaced between tasks (0:
    /// never). Default: the server's --worker-max-rss-bytes.
    pub max_rss_bytes: Option<u64>,
    /// Nice level, 0..=19. Default: the server's --worker-nice.
    pub nice: Option<i32>,
    /// Time a new worker has to say Hello, in ms. Default: 10000.
    pub handshake_timeout_ms: Option<u64>,
    /// Interval between pings, in ms. Default: the server's --worker-heartbeat-ms.
    pub heartbeat_ms: Option<u64>,
    /// Silence after which a worker counts as hung, in ms. Default: the
    /// server's --worker-heartbeat-timeout-ms.
    pub heartbeat_timeout_ms: Option<u64>,
    /// Wait between the rungs of the stop ladder, in ms. Default: the
    /// server's --worker-kill-grace-ms.
    pub kill_grace_ms: Option<u64>,
    /// What the worker sandbox lets it use beyond what it is given anyway
    /// (its interpreter and that one's folder, the folders of the files in
    /// its command, its working directory, the paths of its NODE_PATH and
    /// PYTHONPATH).
    #[serde(default)]
    pub sandbox: Allowances,
}

/// Longest program name.
const MAX_PROGRAM_NAME: usize = 32;

impl ProgramSpec {
    /// Checks the table and resolves its paths against `base` (the config
    /// file's folder); unset values come from `defaults`.
    pub fn validate(&self, base: &Path, defaults: &ProgramDefaults) -> Result<ProgramConfig, String> {
        let name = &self.name;
        let name_ok = !name.is_empty()
            && name.len() <= MAX_PROGRAM_NAME
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
        if !name_ok {
            return Err(format!(
                "name {name:?}: 1 to {MAX_PROGRAM_NAME} characters of a-z, 0-9, '_', '-', starting with a letter"
            ));
        }
        let fail = |reason: String| Err(format!("worker program {name:?}: {reason}"));
        let Some((program, args)) = self.command.split_first() else {
            return fail("command is empty; give the program and its arguments, e.g. [\"python3\", \"app.py\"]".into());
        };
        if program.is_empty() {
            return fail("command's program is empty".into());
        }
        let workers = self.workers.unwrap_or(1);
        if !(1..=256).contains(&workers) {
            return fail(format!("workers = {workers} is not in 1..=256"));
        }
        let nice = self.nice.unwrap_or(defaults.nice);
        if !(0..=19).contains(&nice) {
            return fail(format!("nice = {nice} is not in 0..=19"));
        }
        let millis = |value: Option<u64>, default: Duration| value.map_or(default, Duration::from_millis);
        let heartbeat = millis(self.heartbeat_ms, defaults.heartbeat);
        let heartbeat_timeout = millis(self.heartbeat_timeout_ms, defaults.heartbeat_timeout);
        if heartbeat.is_zero() || heartbeat_timeout <= heartbeat {
            return fail("heartbeat_timeout_ms must be longer than a non-zero heartbeat_ms".into());
        }
        let handshake_timeout = millis(self.handshake_timeout_ms, Duration::from_secs(10));
        if handshake_timeout.is_zero() {
            return fail("handshake_timeout_ms must not be 0".into());
        }
        if let Some(key) = self.env.keys().find(|k| k.is_empty() || k.contains(['=', '\0'])) {
            return fail(format!("env key {key:?} is not a variable name"));
        }
        let cwd = base.join(self.cwd.as_deref().unwrap_or(Path::new(".")));
        if !cwd.is_dir() {
            return fail(format!("working directory {} is not a folder", cwd.display()));
        }
        // A bare name is looked up in PATH; a path with a slash is a file.
        let program = if program.contains('/') { base.join(program) } else { PathBuf::from(program) };
        if program.components().count() > 1 && !program.is_file() {
            return fail(format!("program {} is not a file", program.display()));
        }
        let (executable, sandbox) = program_allowances(&program, args, &cwd, &self.env, &self.sandbox);
        Ok(ProgramConfig {
            name: name.clone(),
            executable,
            sandbox,
            program,
            args: args.to_vec(),
            cwd,
            env: self.env.clone(),
            workers,
            nice,
            memory_limit: self.memory_limit_bytes.unwrap_or(defaults.memory_limit),
            max_tasks: self.max_tasks.unwrap_or(defaults.max_tasks),
            max_rss_bytes: self.max_rss_bytes.unwrap_or(defaults.max_rss_bytes),
            handshake_timeout,
            heartbeat,
            heartbeat_timeout,
            kill_grace: millis(self.kill_grace_ms, defaults.kill_grace),
        })
    }
}

/// The file `program` runs (looked up in PATH when it is a bare name), and
/// what a worker of it is allowed: its table's `sandbox`, plus what any
/// interpreter needs to start: to read its installation (the folder above
/// its `bin`, for the program as named and as resolved: a venv and the
/// Python it links to), the folders of the files its arguments name, its
/// working directory, its NODE_PATH and PYTHONPATH entries, and the file
/// NODE_EXTRA_CA_CERTS names.
fn program_allowances(
    program: &Path,
    args: &[String],
    cwd: &Path,
    env: &BTreeMap<String, String>,
    extra: &Allowances,
) -> (PathBuf, Allowances) {
    let named = if program.components().count() > 1 {
        Some(program.to_owned())
    } else {
        std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file()))
    };
    let executable = named.as_ref().and_then(|p| p.canonicalize().ok()).unwrap_or_else(|| program.to_owned());
    let installation = |file: &Path| {
        let dir = file.parent()?;
        Some(if dir.file_name().is_some_and(|n| n == "bin") { dir.parent().unwrap_or(dir) } else { dir }.to_owned())
    };
    let mut allow = extra.clone();
    allow.read.extend(named.as_deref().and_then(installation));
    allow.read.extend(installation(&executable));
    allow.read.push(cwd.to_owned());
    for arg in args {
        let file = cwd.join(arg);
        if file.is_file()
            && let Some(dir) = file.canonicalize().ok().and_then(|f| f.parent().map(Path::to_owned))
        {
            allow.read.push(dir);
        }
    }
    let var = |key: &str| env.get(key).cloned().or_else(|| std::env::var(key).ok()).unwrap_or_default();
    for key in ["NODE_PATH", "PYTHONPATH"] {
        allow.read.extend(std::env::split_paths(&var(key)).filter(|p| p.is_absolute()));
    }
    // Node reads this file at every start, and warns when it cannot.
    allow.read.extend(Some(PathBuf::from(var("NODE_EXTRA_CA_CERTS"))).filter(|file| file.is_absolute()));
    (executable, allow)
}

/// The server-wide worker settings a program table falls back on.
#[derive(Debug, Clone)]
pub struct ProgramDefaults {
    /// --worker-nice.
    pub nice: i32,
    /// --worker-memory-limit-bytes.
    pub memory_limit: u64,
    /// --worker-max-tasks.
    pub max_tasks: u64,
    /// --worker-max-rss-bytes.
    pub max_rss_bytes: u64,
    /// --worker-heartbeat-ms.
    pub heartbeat: Duration,
    /// --worker-heartbeat-timeout-ms.
    pub heartbeat_timeout: Duration,
    /// --worker-kill-grace-ms.
    pub kill_grace: Duration,
}

/// A validated worker program.
#[derive(Debug, Clone)]
pub struct ProgramConfig {
    /// Its name, the prefix of its tasks.
    pub name: String,
    /// The executable: a path, or a bare name looked up in PATH.
    pub program: PathBuf,
    /// The file it names (for the sandbox's rules).
    pub executable: PathBuf,
    /// What its sandbox allows.
    pub sandbox: Allowances,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its working directory.
    pub cwd: PathBuf,
    /// Variables added to its environment.
    pub env: BTreeMap<String, String>,
    /// Warm processes.
    pub workers: usize,
    /// Nice level.
    pub nice: i32,
    /// Resident memory at which a busy worker is killed; 0 for none.
    pub memory_limit: u64,
    /// Tasks before recycling; 0 for never.
    pub max_tasks: u64,
    /// Resident memory before recycling; 0 for never.
    pub max_rss_bytes: u64,
    /// Time to say Hello.
    pub handshake_timeout: Duration,
    /// Interval between pings.
    pub heartbeat: Duration,
    /// Silence after which a worker counts as hung.
    pub heartbeat_timeout: Duration,
    /// Wait between the rungs of the stop ladder.
    pub kill_grace: Duration,
}

/// A worker program at run time: its supervisor, and the tasks its workers
/// declared.
#[derive(Debug)]
pub struct Program {
    /// Its name.
    pub name: String,
    /// `<name>.`, the prefix of its tasks.
    prefix: String,
    /// Its worker processes.
    pub supervisor: Supervisor,
    declared: Arc<Declared>,
    handshake_timeout: Duration,
}

/// How the front starts and watches a worker of `config`, whose workers'
/// declarations go to `declared`.
pub fn worker_options(
    config: &ProgramConfig,
    max_frame: usize,
    sandbox: &Sandbox,
    declared: Arc<Declared>,
) -> WorkerOptions {
    WorkerOptions {
        sandbox: sandbox.clone(),
        executable: config.executable.clone(),
        allow: config.sandbox.clone(),
        program: config.program.clone(),
        args: config.args.clone(),
        launch: Launch::Program {
            name: config.name.clone(),
            cwd: config.cwd.clone(),
            env: config.env.clone(),
            nice: config.nice,
            memory_limit: config.memory_limit,
            max_frame,
            declared,
        },
        handshake_timeout: config.handshake_timeout,
        heartbeat_interval: config.heartbeat,
        heartbeat_timeout: config.heartbeat_timeout,
        kill_grace: config.kill_grace,
    }
}

impl Program {
    /// Starts the program's workers.
    pub fn start(config: &ProgramConfig, queue_capacity: usize, max_frame: usize, sandbox: &Sandbox) -> Self {
        let declared = Arc::new(Declared::default());
        let supervisor = Supervisor::start(IsolatedOptions {
            workers: config.workers,
            queue_capacity,
            worker: worker_options(config, max_frame, sandbox, Arc::clone(&declared)),
            max_tasks_per_worker: config.max_tasks,
            max_worker_rss_bytes: config.max_rss_bytes,
        });
        Self {
            name: config.name.clone(),
            prefix: format!("{}.", config.name),
            supervisor,
            declared,
            handshake_timeout: config.handshake_timeout,
        }
    }

    /// Whether `task` is in the program's namespace.
    pub fn owns(&self, task: &str) -> bool {
        task.starts_with(&self.prefix)
    }

    /// The program's tasks, once a worker has declared them.
    pub fn tasks(&self) -> Option<&ProgramTasks> {
        self.declared.get()
    }

    /// Why the program's tasks cannot run now: no worker has started yet.
    pub fn not_ready(&self) -> String {
        match self.supervisor.check_available() {
            Err(err) => format!("worker program {:?} is not running: {err}", self.name),
            Ok(()) => format!("worker program {:?} is starting; retry shortly", self.name),
        }
    }

    /// Waits until a worker has declared the program's tasks, a start has
    /// failed, or the handshake timeout (and a little) has passed; true
    /// when the tasks are known.
    pub async fn wait_ready(&self) -> bool {
        let give_up = tokio::time::Instant::now() + self.handshake_timeout + Duration::from_secs(1);
        loop {
            if self.tasks().is_some() {
                return true;
            }
            if self.supervisor.check_available().is_err() || tokio::time::Instant::now() >= give_up {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// What a program's workers serve: learned from the first worker that
/// shook hands, and required of every later one.
pub struct ProgramTasks {
    /// The declarations as received, to compare later workers' with.
    declared: Vec<TaskDecl>,
    /// The tasks, by name.
    pub tasks: BTreeMap<&'static str, Arc<dyn Task>>,
    /// Their expected costs (in a worker of this program).
    pub costs: CostModel,
}

impl std::fmt::Debug for ProgramTasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tasks.keys()).finish()
    }
}

/// A program's tasks, once known; shared by its supervisor's handshakes and
/// the dispatcher.
#[derive(Debug, Default)]
pub struct Declared {
    tasks: OnceLock<ProgramTasks>,
}

impl Declared {
    /// The program's tasks, if a worker has declared them yet.
    pub fn get(&self) -> Option<&ProgramTasks> {
        self.tasks.get()
    }

    /// Checks the declarations of a worker of program `program` (its Hello):
    /// the first valid set becomes the program's tasks; a later worker must
    /// declare the same set.
    pub fn accept(&self, program: &str, declared: &[TaskDecl]) -> Result<(), String> {
        if let Some(known) = self.tasks.get() {
            return if known.declared == declared {
                Ok(())
            } else {
                Err(format!(
                    "it declares other tasks than the program's first worker did ({}); restart the server to change a \
                     program's tasks",
                    names(&known.declared)
                ))
            };
        }
        check(program, declared)?;
        // Two first handshakes may race; the loser's set must match the
        // winner's. Only the winner's text is made to last (leaked, once).
        let mut first = false;
        let winner = self.tasks.get_or_init(|| {
            first = true;
            let tasks: BTreeMap<&'static str, Arc<dyn Task>> = declared
                .iter()
                .map(|decl| {
                    let task = ProgramTask::new(decl);
                    (task.spec.name, Arc::new(task) as Arc<dyn Task>)
                })
                .collect();
            ProgramTasks { declared: declared.to_vec(), costs: CostModel::for_tasks(tasks.keys().copied()), tasks }
        });
        if first {
            tracing::info!("worker program {program} serves {}", names(declared));
        }
        if winner.declared == declared { Ok(()) } else { self.accept(program, declared) }
    }
}

fn names(declared: &[TaskDecl]) -> String {
    declared.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// Checks a declaration without keeping anything of it: a program that
/// keeps failing its handshake costs no memory.
fn check(program: &str, declared: &[TaskDecl]) -> Result<(), String> {
    if declared.is_empty() {
        return Err("it declares no task".into());
    }
    let prefix = format!("{program}.");
    for (i, decl) in declared.iter().enumerate() {
        let name = decl.name.as_str();
        let Some(rest) = name.strip_prefix(&prefix) else {
            return Err(format!(
                "task {name:?} is outside its namespace: every task of program {program:?} is named \"{prefix}...\""
            ));
        };
        // "<program>." alone names no task: checked as an empty name.
        let checked = if rest.is_empty() { rest } else { name };
        check_names(checked, decl.params.iter().map(|p| p.name.as_str())).map_err(|e| format!("task {name:?}: {e}"))?;
        if declared[..i].iter().any(|d| d.name == decl.name) {
            return Err(format!("task {name:?} is declared twice"));
        }
        if !decl.cost_param.is_empty() && !decl.params.iter().any(|p| p.name == decl.cost_param) {
            return Err(format!("task {name:?}: its cost_param {:?} is not one of its params", decl.cost_param));
        }
    }
    Ok(())
}

/// A task of a worker program, as the front sees it: a spec to list and
/// check calls against; the work happens in the program.
struct ProgramTask {
    spec: TaskSpec,
    /// The param whose value its time grows with, if it declared one.
    cost_param: Option<&'static str>,
}

/// Worker program tasks run in their program's workers only.
const ISOLATED_ONLY: &[Mode] = &[Mode::Isolated];

/// Text that lives as long as the server: a program's declarations are
/// accepted once per program, so this leaks a bounded amount.
fn forever(text: &str) -> &'static str {
    Box::leak(text.to_owned().into_boxed_str())
}

impl ProgramTask {
    fn new(decl: &TaskDecl) -> Self {
        let params: Vec<ParamSpec> = decl
            .params
            .iter()
            .map(|p| ParamSpec {
                name: forever(&p.name),
                description: forever(&p.description),
                default: (!p.required).then(|| forever(&p.default_value)),
            })
            .collect();
        Self {
            spec: TaskSpec {
                name: forever(&decl.name),
                cacheable: decl.cacheable,
                version: decl.version.max(1),
                description: forever(&decl.description),
                default_mode: Mode::Isolated,
                allowed_modes: ISOLATED_ONLY,
                params: Box::leak(params.into_boxed_slice()),
            },
            cost_param: (!decl.cost_param.is_empty()).then(|| forever(&decl.cost_param)),
        }
    }
}

impl Task for ProgramTask {
    fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    fn prepare(&self, params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
        // A value that is not a number is the program's to refuse; the call
        // is then sized by its input.
        let units = self
            .cost_param
            .and_then(|name| params.raw(name).trim().parse::<f64>().ok())
            .filter(|units| units.is_finite() && *units >= 0.0);
        Ok(Box::new(InProgram { units }))
    }
}

/// The job of a program task: its params were checked against the
/// declaration; the program prepares and runs the work itself.
struct InProgram {
    /// Its declared cost param's value.
    units: Option<f64>,
}

impl Job for InProgram {
    fn cost_units(&self) -> Option<f64> {
        self.units
    }

    fn run(&self, _ctx: &Context, _input: Bytes) -> Result<Bytes, TaskError> {
        Err(TaskError::Failed("a worker program's task runs only in its workers".into()))
    }
}

/// Params as a worker receives them: the call's, with the declared
/// defaults filled in.
pub fn with_defaults(task: &dyn Task, mut params: HashMap<String, String>) -> HashMap<String, String> {
    for spec in task.spec().params {
        if let Some(default) = spec.default {
            params.entry(spec.name.to_string()).or_insert_with(|| default.to_string());
        }
    }
    params
}

#[cfg(test)]
mod tests {
    use offload_proto::offload::worker::v1::ParamDecl;

    use super::*;

    fn decl(name: &str, params: &[(&str, Option<&str>)]) -> TaskDecl {
        TaskDecl {
            name: name.into(),
            description: format!("{name} does things"),
            params: params
                .iter()
                .map(|(n, default)| ParamDecl {
                    name: n.to_string(),
                    description: "a param".into(),
                    default_value: default.unwrap_or_default().into(),
                    required: default.is_none(),
                })
                .collect(),
            cost_param: String::new(),
            cacheable: false,
            version: 0,
        }
    }

    #[test]
    fn the_first_declaration_defines_the_tasks_and_later_workers_must_match_it() {
        let declared = Declared::default();
        let first = [decl("py.reverse", &[("upper", Some("false"))]), decl("py.count", &[("min", None)])];
        declared.accept("py", &first).unwrap();
        let tasks = &declared.get().unwrap().tasks;
        let reverse = tasks["py.reverse"].spec();
        assert_eq!((reverse.default_mode, reverse.allowed_modes), (Mode::Isolated, ISOLATED_ONLY));
        assert_eq!(reverse.params[0].default, Some("false"));
        assert_eq!(tasks["py.count"].spec().params[0].default, None);
        declared.accept("py", &first).unwrap();
        let err = declared.accept("py", &first[..1]).unwrap_err();
        assert!(err.contains("other tasks than the program's first worker"), "{err}");
    }

    #[test]
    fn a_declared_cost_param_sizes_each_call() {
        let declared = Declared::default();
        let spin =
            TaskDecl { cost_param: "ms".into(), ..decl("py.spin", &[("ms", Some("1000")), ("obey", Some("true"))]) };
        declared.accept("py", &[spin, decl("py.sha256", &[])]).unwrap();
        let tasks = &declared.get().unwrap().tasks;
        let units = |task: &str, params: &[(&str, &str)]| {
            let params = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            offload_worker::Catalog::prepare(tasks[task].as_ref(), &params).unwrap().cost_units()
        };
        assert_eq!(units("py.spin", &[("ms", "250")]), Some(250.0));
        assert_eq!(units("py.spin", &[]), Some(1000.0), "its default");
        assert_eq!(units("py.spin", &[("ms", "soon")]), None, "not a number: sized by the input");
        assert_eq!(units("py.sha256", &[]), None);
    }

    #[test]
    fn declarations_outside_the_namespace_or_malformed_are_refused() {
        let refused = |decls: &[TaskDecl]| Declared::default().accept("py", decls).unwrap_err();
        assert!(refused(&[decl("js.upper", &[])]).contains("outside its namespace"));
        assert!(refused(&[decl("pyreverse", &[])]).contains("outside its namespace"));
        assert!(refused(&[decl("py.", &[])]).contains("a name is 1 to 64"));
        assert!(refused(&[decl("py.a b", &[])]).contains("a name is 1 to 64"));
        assert!(refused(&[]).contains("declares no task"));
        assert!(refused(&[decl("py.a", &[]), decl("py.a", &[])]).contains("declared twice"));
        assert!(refused(&[decl("py.a", &[("n", None), ("n", None)])]).contains("param \"n\" is declared twice"));
        let costed = TaskDecl { cost_param: "rows".into(), ..decl("py.a", &[("n", None)]) };
        assert!(refused(&[costed]).contains("its cost_param \"rows\" is not one of its params"));
    }

    #[test]
    fn program_tables_are_checked_and_resolved_against_the_config_folder() {
        let base = std::env::temp_dir();
        let defaults = ProgramDefaults {
            nice: 10,
            memory_limit: 2 << 30,
            max_tasks: 100,
            max_rss_bytes: 1 << 30,
            heartbeat: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            kill_grace: Duration::from_millis(100),
        };
        let spec = |text: &str| toml::from_str::<ProgramSpec>(text).unwrap();
        let ok = spec("name = \"py\"\ncommand = [\"python3\", \"app.py\"]\nworkers = 2").validate(&base, &defaults);
        let ok = ok.unwrap();
        assert_eq!(
            (ok.program.as_path(), ok.args.as_slice(), ok.workers),
            (Path::new("python3"), &["app.py".to_string()][..], 2)
        );
        assert_eq!((ok.cwd.clone(), ok.max_tasks, ok.nice), (base.join("."), 100, 10));
        let err = |text: &str| spec(text).validate(&base, &defaults).unwrap_err();
        assert!(err("name = \"Py\"\ncommand = [\"x\"]").contains("a-z"));
        assert!(err("name = \"py\"\ncommand = []").contains("command is empty"));
        assert!(err("name = \"py\"\ncommand = [\"./no-such-program\"]").contains("is not a file"));
        assert!(err("name = \"py\"\ncommand = [\"x\"]\nworkers = 0").contains("not in 1..=256"));
        assert!(err("name = \"py\"\ncommand = [\"x\"]\ncwd = \"no-such-dir\"").contains("not a folder"));
        assert!(toml::from_str::<ProgramSpec>("name = \"py\"\ncommand = [\"x\"]\nshell = true").is_err());
    }
}
