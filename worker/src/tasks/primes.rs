//! `primes.count`: the number of primes <= `limit`, by a segmented sieve of
//! Eratosthenes over odd numbers, with segments sieved in parallel on the
//! current rayon pool and a cancellation check before each segment.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use rayon::prelude::*;

use super::BOTH_MODES;
use crate::{Context, Job, Mode, ParamSpec, Params, Task, TaskError, TaskSpec};

/// The largest `limit` accepted.
pub const MAX_LIMIT: u64 = 10_000_000_000;

/// Odd numbers per segment: 256 KiB of flags, about L2-sized, and a few
/// hundred microseconds of work between cancellation checks.
const SEGMENT: u64 = 1 << 18;

/// Adds `primes.count` to `out`.
pub fn register(out: &mut Vec<Arc<dyn Task>>) {
    out.push(Arc::new(PrimesTask));
}

struct PrimesTask;

const SPEC: TaskSpec = TaskSpec {
    name: "primes.count",
    cacheable: true,
    version: 1,
    description: "counts the primes <= limit (segmented sieve, parallel); input ignored; output is the count in ASCII decimal",
    default_mode: Mode::Pool,
    allowed_modes: BOTH_MODES,
    params: &[ParamSpec::required("limit", "upper bound, an integer in 0..=10000000000")],
};

impl Task for PrimesTask {
    fn spec(&self) -> &TaskSpec {
        &SPEC
    }

    fn prepare(&self, params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
        Ok(Box::new(CountJob { limit: params.int("limit", 0..=MAX_LIMIT)? }))
    }
}

struct CountJob {
    limit: u64,
}

impl Job for CountJob {
    fn estimate(&self, _input_len: usize) -> Option<Duration> {
        // About a nanosecond per number on one core; calibrated by the server.
        Some(Duration::from_nanos(self.limit + 1_000))
    }

    fn run(&self, ctx: &Context, _input: Bytes) -> Result<Bytes, TaskError> {
        Ok(Bytes::from(count_primes(ctx, self.limit)?.to_string()))
    }
}

/// π(limit), stopping early if `ctx` says so.
fn count_primes(ctx: &Context, limit: u64) -> Result<u64, TaskError> {
    if limit < 3 {
        return Ok(u64::from(limit == 2));
    }
    let base = small_odd_primes(limit.isqrt());
    // Index i stands for the odd number 2i+1; sieve indices 1..end (3..=limit).
    let end = (limit - 1) / 2 + 1;
    let segments = (end - 1).div_ceil(SEGMENT);
    let done = AtomicU64::new(0);
    let odd_primes = (0..segments)
        .into_par_iter()
        .map_init(
            || vec![0u8; SEGMENT as usize],
            |flags, s| {
                ctx.check()?;
                let lo = 1 + s * SEGMENT;
                let hi = (lo + SEGMENT).min(end);
                let count = sieve_segment(flags, lo, hi, &base);
                let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                if ctx.wants_progress() && finished.is_multiple_of(64) {
                    ctx.progress(finished as f64 / segments as f64, "");
                }
                Ok(count)
            },
        )
        .try_reduce(|| 0, |a, b| Ok(a + b))?;
    Ok(odd_primes + 1)
}

/// Counts the primes among the odd numbers with indices `lo..hi`.
fn sieve_segment(flags: &mut [u8], lo: u64, hi: u64, base: &[u64]) -> u64 {
    let len = (hi - lo) as usize;
    let flags = &mut flags[..len];
    flags.fill(1);
    let last = 2 * (hi - 1) + 1;
    for &p in base {
        if p * p > last {
            break;
        }
        // First odd multiple of p that is >= p*p and >= the segment's start.
        let start_num = (2 * lo + 1).max(p * p);
        let mut m = start_num.div_ceil(p) * p;
        if m % 2 == 0 {
            m += p;
        }
        let mut i = ((m - 1) / 2 - lo) as usize;
        while i < len {
            flags[i] = 0;
            i += p as usize;
        }
    }
    flags.iter().map(|&f| u64::from(f)).sum()
}

/// The odd primes <= n, by a plain sieve (n <= 10^5 here).
fn small_odd_primes(n: u64) -> Vec<u64> {
    let n = n as usize;
    let mut composite = vec![false; n + 1];
    let mut out = Vec::new();
    for i in (3..=n).step_by(2) {
        if !composite[i] {
            out.push(i as u64);
            for j in (i * i..=n).step_by(2 * i) {
                composite[j] = true;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CancelFlag;

    fn count(limit: u64) -> u64 {
        count_primes(&Context::new(None, CancelFlag::new(), None), limit).unwrap()
    }

    /// A plain whole-range sieve to check the segmented one against.
    fn plain(limit: u64) -> u64 {
        let n = limit as usize;
        let mut composite = vec![false; n + 1];
        let mut count = 0;
        for i in 2..=n {
            if !composite[i] {
                count += 1;
                (i * i..=n).step_by(i).for_each(|j| composite[j] = true);
            }
        }
        count
    }

    #[test]
    fn known_counts() {
        for (limit, pi) in [(0, 0), (1, 0), (2, 1), (3, 2), (10, 4), (100, 25), (1000, 168), (1_000_000, 78498)] {
            assert_eq!(count(limit), pi, "pi({limit})");
        }
        assert_eq!(count(10_000_000), 664_579);
    }

    #[test]
    fn matches_trial_division_across_segment_edges() {
        for limit in (0..3000).chain([2 * SEGMENT - 1, 2 * SEGMENT, 2 * SEGMENT + 1, 2 * SEGMENT + 3, 5 * SEGMENT + 11])
        {
            assert_eq!(count(limit), plain(limit), "pi({limit})");
        }
    }

    #[test]
    fn a_cancelled_count_stops() {
        let flag = CancelFlag::new();
        flag.cancel();
        let ctx = Context::new(None, flag, None);
        assert_eq!(count_primes(&ctx, MAX_LIMIT), Err(TaskError::Cancelled));
    }
}
