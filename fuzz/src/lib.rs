//! What the fuzz targets share: the task catalog they run hostile input
//! through, and a context with no deadline.

use std::sync::LazyLock;

use bytes::Bytes;
use offload_worker::{CancelFlag, Catalog, CatalogOptions, Context, TaskError};

/// The largest frame the frame targets accept: far larger than any input,
/// so that an allocation of an announced length (rather than of the bytes
/// received) trips libFuzzer's `-malloc_limit_mb` (64 in `fuzz/run`).
pub const MAX_FRAME: usize = 1 << 30;

/// Largest output `decompress.zstd` may produce here.
pub const MAX_DECOMPRESSED: usize = 8 << 20;

/// Every built-in task, the debug ones included.
pub static CATALOG: LazyLock<Catalog> = LazyLock::new(|| {
    Catalog::builtin(&CatalogOptions {
        debug_tasks: true,
        max_decompressed_bytes: MAX_DECOMPRESSED,
        ..Default::default()
    })
});

/// Runs `task` with `params` on `input` as a pool thread would; any error
/// is a fine answer to hostile input, a panic or a crash is not.
pub fn run(task: &str, params: &[(&str, &str)], input: &[u8]) -> Result<Bytes, TaskError> {
    let task = CATALOG.get(task).expect("a built-in task");
    let params = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let job = Catalog::prepare(task.as_ref(), &params)?;
    let ctx = Context::new(None, CancelFlag::new(), None);
    // Not `run_job`: it would turn a panic into an error and hide it.
    job.run(&ctx, Bytes::copy_from_slice(input))
}
