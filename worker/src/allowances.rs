//! What a sandboxed worker may use beyond the sandbox's base rules: the
//! `sandbox` table of an `[[exec]]` program or a `[[worker_program]]` in
//! the front's config. The front applies them (see its `isolated::sandbox`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Paths and network a sandboxed worker may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allowances {
    /// Files and folders it may read (a folder: everything beneath).
    #[serde(default)]
    pub read: Vec<PathBuf>,
    /// Files and folders it may read, write, create and delete in.
    #[serde(default)]
    pub write: Vec<PathBuf>,
    /// Programs (or folders of programs) it may run, besides its own.
    #[serde(default)]
    pub exec: Vec<PathBuf>,
    /// Whether it keeps the network (no network namespace, sockets allowed).
    #[serde(default)]
    pub network: bool,
}

impl Allowances {
    /// Adds `other`'s allowances to these.
    pub fn extend(&mut self, other: &Allowances) {
        self.read.extend(other.read.iter().cloned());
        self.write.extend(other.write.iter().cloned());
        self.exec.extend(other.exec.iter().cloned());
        self.network |= other.network;
    }
}
