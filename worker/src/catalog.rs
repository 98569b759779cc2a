//! The catalog: the tasks one process serves, looked up by name. It is
//! made from a [`TaskSet`] (Offload's built-in tasks and a program's own)
//! and the [`CatalogOptions`] of the configuration (debug tasks, exec
//! programs), checked once at start, and it does the request checks common
//! to all tasks (name, params) so that every task sees only well-formed
//! parameters.

use std::{collections::BTreeMap, collections::HashMap, sync::Arc};

use crate::{Job, Task, TaskError, TaskSpec, tasks, tasks::exec::ExecSpec};

/// Which tasks a catalog holds and the limits they obey.
#[derive(Debug, Clone)]
pub struct CatalogOptions {
    /// Include the `debug.*` tasks (for tests and benchmarks only).
    pub debug_tasks: bool,
    /// Largest output `decompress.zstd` may produce, in bytes.
    pub max_decompressed_bytes: usize,
    /// External programs declared as tasks (already validated).
    pub exec: Vec<ExecSpec>,
}

impl Default for CatalogOptions {
    fn default() -> Self {
        Self { debug_tasks: false, max_decompressed_bytes: 256 << 20, exec: Vec::new() }
    }
}

/// Why a request names no task of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The request's task name is empty.
    #[error("task name is empty; call ListTasks for the available tasks")]
    EmptyName,
    /// No task has this name.
    #[error("unknown task {name:?}; available: {}", available.join(", "))]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names the catalog has.
        available: Vec<&'static str>,
    },
}

/// The tasks a program serves besides those of its configuration (debug
/// and exec tasks): Offload's built-in tasks, its own, or both. A program
/// that embeds Offload builds one in its `main` and hands it to the server,
/// which hands it to the worker processes it re-executes from the same
/// binary, so both modes know the same tasks.
///
/// ```
/// use offload_worker::{Catalog, CatalogOptions, TaskSet};
/// # use offload_worker::{Job, Mode, Params, Task, TaskError, TaskSpec};
/// # struct WordCount;
/// # impl Task for WordCount {
/// #     fn spec(&self) -> &TaskSpec {
/// #         &TaskSpec { name: "example.wordcount", description: "", default_mode: Mode::Pool,
/// #             allowed_modes: &[Mode::Pool], params: &[], cacheable: false, version: 1 }
/// #     }
/// #     fn prepare(&self, _: &Params<'_>) -> Result<Box<dyn Job>, TaskError> { unimplemented!() }
/// # }
/// let tasks = TaskSet::builtin().with(WordCount);
/// let catalog = Catalog::new(&tasks, &CatalogOptions::default()).expect("no task is defined twice");
/// assert!(catalog.get("example.wordcount").is_ok() && catalog.get("hash.sha256").is_ok());
///
/// // Only the program's own tasks (the debug tasks still come with `--debug-tasks`):
/// let alone = Catalog::new(&TaskSet::empty().with(WordCount), &CatalogOptions::default()).unwrap();
/// assert!(alone.get("hash.sha256").is_err());
/// ```
#[derive(Clone)]
pub struct TaskSet {
    builtin: bool,
    tasks: Vec<Arc<dyn Task>>,
    debug: Vec<Arc<dyn Task>>,
}

impl TaskSet {
    /// Offload's built-in tasks (hashes, primes, compression, images).
    pub fn builtin() -> Self {
        Self { builtin: true, tasks: Vec::new(), debug: Vec::new() }
    }

    /// No task but those added.
    pub fn empty() -> Self {
        Self { builtin: false, tasks: Vec::new(), debug: Vec::new() }
    }

    /// Adds `task`, always served.
    pub fn with(mut self, task: impl Task) -> Self {
        self.tasks.push(Arc::new(task));
        self
    }

    /// Adds `task`, served only with `--debug-tasks` like Offload's `debug.*`
    /// tasks: for tests and benchmarks of the program.
    pub fn with_debug(mut self, task: impl Task) -> Self {
        self.debug.push(Arc::new(task));
        self
    }
}

impl Default for TaskSet {
    /// The built-in tasks.
    fn default() -> Self {
        Self::builtin()
    }
}

impl std::fmt::Debug for TaskSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |tasks: &[Arc<dyn Task>]| tasks.iter().map(|t| t.spec().name).collect::<Vec<_>>();
        f.debug_struct("TaskSet")
            .field("builtin", &self.builtin)
            .field("tasks", &names(&self.tasks))
            .field("debug", &names(&self.debug))
            .finish()
    }
}

/// Why a set of tasks cannot be served: a spec the server could not honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// Two tasks have the same name.
    #[error("task {0:?} is defined twice")]
    Duplicate(&'static str),
    /// A task's spec is unusable.
    #[error("task {name:?}: {problem}")]
    BadSpec {
        /// The task's name.
        name: &'static str,
        /// What is wrong with its spec.
        problem: String,
    },
}

/// Longest task name: names are metric labels and log fields.
const MAX_NAME_LEN: usize = 64;

/// Checks a task's name and its params' names, wherever the task comes
/// from (a Rust spec, a worker program's declaration): the problem, if any.
pub fn check_names<'a>(name: &str, params: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
    let name_ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !name_ok {
        return Err(format!("a name is 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '.', '_', '-'"));
    }
    let mut seen: Vec<&str> = Vec::new();
    for param in params {
        if param.is_empty() || param.chars().any(char::is_whitespace) {
            return Err(format!("param {param:?}: a param name is non-empty, without spaces"));
        }
        if seen.contains(&param) {
            return Err(format!("param {param:?} is declared twice"));
        }
        seen.push(param);
    }
    Ok(())
}

/// Checks what the server relies on in a spec.
fn check_spec(spec: &TaskSpec) -> Result<(), CatalogError> {
    let bad = |problem: String| CatalogError::BadSpec { name: spec.name, problem };
    check_names(spec.name, spec.params.iter().map(|p| p.name)).map_err(bad)?;
    if !spec.allowed_modes.contains(&spec.default_mode) {
        return Err(bad(format!("its default mode {} is not one of its allowed modes", spec.default_mode.as_str())));
    }
    Ok(())
}

/// The tasks a process serves, by name.
#[derive(Clone)]
pub struct Catalog {
    tasks: BTreeMap<&'static str, Arc<dyn Task>>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tasks.keys()).finish()
    }
}

impl Catalog {
    /// The tasks of `set` and those `options` ask for (debug, exec), each
    /// spec checked, no name twice.
    pub fn new(set: &TaskSet, options: &CatalogOptions) -> Result<Self, CatalogError> {
        let mut all: Vec<Arc<dyn Task>> = Vec::new();
        if set.builtin {
            tasks::hash::register(&mut all);
            tasks::primes::register(&mut all);
            tasks::compress::register(&mut all, options.max_decompressed_bytes);
            tasks::image::register(&mut all);
        }
        all.extend(set.tasks.iter().cloned());
        if options.debug_tasks {
            tasks::debug::register(&mut all);
            all.extend(set.debug.iter().cloned());
        }
        tasks::exec::register(&mut all, &options.exec);
        let mut by_name = BTreeMap::new();
        for task in all {
            check_spec(task.spec())?;
            let name = task.spec().name;
            if by_name.insert(name, task).is_some() {
                return Err(CatalogError::Duplicate(name));
            }
        }
        Ok(Self { tasks: by_name })
    }

    /// The built-in tasks, with those `options` ask for.
    pub fn builtin(options: &CatalogOptions) -> Self {
        Self::new(&TaskSet::builtin(), options).expect("the built-in tasks have valid, distinct specs")
    }

    /// Every task, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Task>> {
        self.tasks.values()
    }

    /// The task called `name`.
    pub fn get(&self, name: &str) -> Result<&Arc<dyn Task>, LookupError> {
        if name.is_empty() {
            return Err(LookupError::EmptyName);
        }
        self.tasks.get(name).ok_or_else(|| LookupError::Unknown {
            name: name.to_string(),
            available: self.tasks.keys().copied().collect(),
        })
    }

    /// Checks `params` against `task` and prepares its job.
    pub fn prepare(task: &dyn Task, params: &HashMap<String, String>) -> Result<Box<dyn Job>, TaskError> {
        crate::prepare(task, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Mode, ParamSpec, Params};

    /// A task with the given spec whose job is never run.
    struct Named(TaskSpec);

    impl Task for Named {
        fn spec(&self) -> &TaskSpec {
            &self.0
        }

        fn prepare(&self, _params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
            Err(TaskError::Failed("not run".into()))
        }
    }

    const fn spec(name: &'static str) -> TaskSpec {
        TaskSpec {
            name,
            description: "a test task",
            default_mode: Mode::Pool,
            allowed_modes: &[Mode::Pool, Mode::Isolated],
            params: &[],
            cacheable: false,
            version: 1,
        }
    }

    #[test]
    fn a_program_adds_its_tasks_beside_or_instead_of_the_builtin_ones() {
        let debug = CatalogOptions { debug_tasks: true, ..Default::default() };
        let set = TaskSet::builtin().with(Named(spec("my.task"))).with_debug(Named(spec("my.debug")));
        let plain = Catalog::new(&set, &CatalogOptions::default()).unwrap();
        assert!(plain.get("my.task").is_ok() && plain.get("hash.sha256").is_ok());
        assert!(plain.get("my.debug").is_err() && plain.get("debug.echo").is_err());
        let with_debug = Catalog::new(&set, &debug).unwrap();
        assert!(with_debug.get("my.debug").is_ok() && with_debug.get("debug.echo").is_ok());

        let alone = Catalog::new(&TaskSet::empty().with(Named(spec("my.task"))), &debug).unwrap();
        let names: Vec<&str> = alone.iter().map(|t| t.spec().name).filter(|n| !n.starts_with("debug.")).collect();
        assert_eq!(names, ["my.task"]);
    }

    #[test]
    fn a_task_set_the_server_cannot_honour_is_refused_with_the_task_named() {
        let refused = |set: TaskSet| Catalog::new(&set, &CatalogOptions::default()).unwrap_err().to_string();
        assert_eq!(
            refused(TaskSet::builtin().with(Named(spec("hash.sha256")))),
            "task \"hash.sha256\" is defined twice"
        );
        let twice = TaskSet::empty().with(Named(spec("a.b"))).with(Named(spec("a.b")));
        assert_eq!(refused(twice), "task \"a.b\" is defined twice");
        let err = refused(TaskSet::empty().with(Named(spec("has space"))));
        assert!(err.starts_with("task \"has space\": a name is 1 to 64 characters"), "{err}");
        let err = refused(TaskSet::empty().with(Named(TaskSpec { allowed_modes: &[Mode::Isolated], ..spec("a.b") })));
        assert_eq!(err, "task \"a.b\": its default mode POOL is not one of its allowed modes");
        const PARAMS: &[ParamSpec] = &[ParamSpec::optional("n", "a number", "1"), ParamSpec::required("n", "again")];
        let err = refused(TaskSet::empty().with(Named(TaskSpec { params: PARAMS, ..spec("a.b") })));
        assert_eq!(err, "task \"a.b\": param \"n\" is declared twice");
    }

    #[test]
    fn debug_tasks_are_listed_only_when_asked_for() {
        let plain = Catalog::builtin(&CatalogOptions::default());
        assert!(plain.get("hash.sha256").is_ok());
        assert!(matches!(plain.get("debug.echo"), Err(LookupError::Unknown { .. })));
        let debug = Catalog::builtin(&CatalogOptions { debug_tasks: true, ..Default::default() });
        assert!(debug.get("debug.echo").is_ok());
        assert!(matches!(debug.get(""), Err(LookupError::EmptyName)));
    }

    #[test]
    fn every_builtin_family_is_listed_as_reserved() {
        let exec = vec![ExecSpec {
            name: "exec.x".into(),
            description: String::new(),
            program: "/bin/true".into(),
            args: Vec::new(),
            timeout_secs: None,
            params: Vec::new(),
            max_output_bytes: None,
            sandbox: Default::default(),
            cacheable: false,
            version: 1,
        }];
        let all = Catalog::builtin(&CatalogOptions { debug_tasks: true, exec, ..Default::default() });
        for task in all.iter() {
            let family = task.spec().name.split('.').next().unwrap();
            assert!(tasks::FAMILIES.contains(&family), "{family} is not in tasks::FAMILIES");
        }
    }

    #[test]
    fn every_default_mode_is_allowed_and_every_default_parses() {
        let all = Catalog::builtin(&CatalogOptions { debug_tasks: true, ..Default::default() });
        for task in all.iter() {
            let spec = task.spec();
            assert!(spec.allowed_modes.contains(&spec.default_mode), "{}", spec.name);
            // With only the required params given a plausible value, prepare succeeds.
            let params: HashMap<String, String> = spec
                .params
                .iter()
                .filter(|p| p.default.is_none())
                .map(|p| (p.name.to_string(), if p.name == "what" { "read" } else { "1" }.to_string()))
                .collect();
            assert!(Catalog::prepare(task.as_ref(), &params).is_ok(), "{}", spec.name);
        }
    }
}
