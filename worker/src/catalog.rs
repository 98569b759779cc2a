//! The catalog: the tasks one process serves, looked up by name. It also
//! does the request checks common to all tasks (name, params) so that every
//! task sees only well-formed parameters.

use std::{collections::BTreeMap, collections::HashMap, sync::Arc};

use crate::{Job, Params, Task, TaskError, tasks, tasks::exec::ExecSpec};

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
    /// The built-in tasks, with or without the debug ones.
    pub fn builtin(options: &CatalogOptions) -> Self {
        let mut all: Vec<Arc<dyn Task>> = Vec::new();
        tasks::hash::register(&mut all);
        tasks::primes::register(&mut all);
        tasks::compress::register(&mut all, options.max_decompressed_bytes);
        tasks::image::register(&mut all);
        if options.debug_tasks {
            tasks::debug::register(&mut all);
        }
        tasks::exec::register(&mut all, &options.exec);
        Self { tasks: all.into_iter().map(|t| (t.spec().name, t)).collect() }
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
        let params = Params::new(params, task.spec().params)?;
        task.prepare(&params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                .map(|p| (p.name.to_string(), "1".to_string()))
                .collect();
            assert!(Catalog::prepare(task.as_ref(), &params).is_ok(), "{}", spec.name);
        }
    }
}
