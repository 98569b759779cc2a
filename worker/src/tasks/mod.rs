//! The built-in tasks, one module per family. Each module's `register`
//! adds its tasks to a catalog under construction.

pub mod compress;
pub mod debug;
pub mod exec;
pub mod hash;
pub mod image;
pub mod primes;

use std::time::Duration;

use crate::Mode;

/// The families of Offload's own tasks (the part of a name before its
/// dot), debug and exec included: names no one else may use.
pub const FAMILIES: &[&str] = &["hash", "primes", "compress", "decompress", "image", "exec", "debug"];

/// Modes of tasks safe to run in the front's own process.
pub(crate) const BOTH_MODES: &[Mode] = &[Mode::Pool, Mode::Isolated];

/// Work is sliced into chunks of this many bytes between cancellation checks:
/// large enough to amortise the check, small enough to stop within 50 ms.
pub(crate) const CHUNK: usize = 1 << 20;

/// A rough cost from a per-byte rate, for [`crate::Job::estimate`].
pub(crate) fn per_byte(input_len: usize, nanos_per_byte: f64) -> Duration {
    Duration::from_nanos((input_len as f64 * nanos_per_byte) as u64 + 200)
}
