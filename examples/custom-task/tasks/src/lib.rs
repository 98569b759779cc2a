//! Tasks written against Offload's task SDK (`offload-task`) alone: a crate
//! of tasks builds without the server, and is tested without one.
//!
//! - [`WordCount`], `example.wordcount`: words of UTF-8 text.
//! - [`Panic`], `example.panic`: panics (a test of crash isolation).
//! - [`Spin`], `example.spin`: works until stopped (a test of cancellation).

#![forbid(unsafe_code)]

use std::{hint::black_box, time::Duration};

use bytes::Bytes;
use offload_task::{Context, Job, Mode, ParamSpec, Params, Task, TaskError, TaskSpec};

const BOTH_MODES: &[Mode] = &[Mode::Pool, Mode::Isolated];

/// Bytes counted between two looks at the call's cancel flag and deadline
/// (about a millisecond of work).
const CHUNK: usize = 1 << 20;

/// `example.wordcount`: the number of whitespace-separated words of the
/// UTF-8 input, as ASCII decimal; with `min_len`, only the words at least
/// that many characters long.
pub struct WordCount;

const WORDCOUNT: TaskSpec = TaskSpec {
    name: "example.wordcount",
    cacheable: true,
    version: 1,
    description: "counts the whitespace-separated words of the UTF-8 input; output: the count in ASCII decimal",
    default_mode: Mode::Pool,
    allowed_modes: BOTH_MODES,
    params: &[ParamSpec::optional("min_len", "count only words of at least this many characters, 0..=4294967295", "1")],
};

impl Task for WordCount {
    fn spec(&self) -> &TaskSpec {
        &WORDCOUNT
    }

    fn prepare(&self, params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
        let min_len: u32 = params.int("min_len", 0..=u32::MAX)?;
        Ok(Box::new(CountWords { min_len: min_len as usize }))
    }
}

struct CountWords {
    min_len: usize,
}

impl Job for CountWords {
    // Validating and splitting take about 2 ns a byte; counting characters
    // (for a min_len over 1) about as much again. The server corrects the
    // factor from measured runs.
    fn estimate(&self, input_len: usize) -> Option<Duration> {
        let per_byte = if self.min_len > 1 { 4 } else { 2 };
        Some(Duration::from_nanos(input_len as u64 * per_byte))
    }

    fn run(&self, ctx: &Context, input: Bytes) -> Result<Bytes, TaskError> {
        let text = std::str::from_utf8(&input).map_err(|err| {
            let offset = err.valid_up_to();
            TaskError::InvalidInput(match err.error_len() {
                Some(_) => format!("input is not valid UTF-8: invalid byte sequence at byte offset {offset}"),
                None => format!("input is not valid UTF-8: it ends inside a sequence starting at byte offset {offset}"),
            })
        })?;
        let mut count = 0u64;
        let mut done = 0;
        while done < text.len() {
            ctx.check()?;
            let end = chunk_end(text.as_bytes(), done);
            let chunk = &text[done..end];
            count += if self.min_len <= 1 {
                chunk.split_whitespace().count() as u64
            } else {
                chunk.split_whitespace().filter(|w| w.chars().nth(self.min_len - 1).is_some()).count() as u64
            };
            done = end;
            if ctx.wants_progress() {
                ctx.progress(done as f64 / text.len() as f64, "counting");
            }
        }
        Ok(Bytes::from(count.to_string()))
    }
}

/// Where the chunk starting at `start` ends: at the first ASCII whitespace
/// byte from `start + CHUNK` on (always a character boundary and never
/// inside a word), or at the end.
fn chunk_end(text: &[u8], start: usize) -> usize {
    let from = start.saturating_add(CHUNK);
    if from >= text.len() {
        return text.len();
    }
    // The ASCII characters `char::is_whitespace` counts.
    let is_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r');
    text[from..].iter().position(is_space).map_or(text.len(), |i| from + i)
}

/// `example.panic` (debug): panics, to show that a panic fails only its
/// call: in POOL the server serves on; in ISOLATED its worker is replaced.
pub struct Panic;

const PANIC: TaskSpec = TaskSpec {
    name: "example.panic",
    cacheable: false,
    version: 1,
    description: "panics; the call fails with INTERNAL",
    default_mode: Mode::Pool,
    allowed_modes: BOTH_MODES,
    params: &[],
};

impl Task for Panic {
    fn spec(&self) -> &TaskSpec {
        &PANIC
    }

    fn prepare(&self, _params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
        Ok(Box::new(Panic))
    }
}

impl Job for Panic {
    fn run(&self, _ctx: &Context, _input: Bytes) -> Result<Bytes, TaskError> {
        panic!("example.panic was asked to panic");
    }
}

/// `example.spin` (debug): keeps a core busy for `ms` milliseconds, looking
/// at its cancel flag and deadline every millisecond; output: the rounds
/// of work done.
pub struct Spin;

const SPIN: TaskSpec = TaskSpec {
    name: "example.spin",
    cacheable: false,
    version: 1,
    description: "keeps one core busy for ms milliseconds, checking for cancellation every millisecond; \
                  output: the rounds done, in ASCII decimal",
    default_mode: Mode::Pool,
    allowed_modes: BOTH_MODES,
    params: &[ParamSpec::optional("ms", "how long to spin, 0..=3600000", "60000")],
};

impl Task for Spin {
    fn spec(&self) -> &TaskSpec {
        &SPIN
    }

    fn prepare(&self, params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
        Ok(Box::new(SpinFor(Duration::from_millis(params.int("ms", 0..=3_600_000)?))))
    }
}

struct SpinFor(Duration);

impl Job for SpinFor {
    fn estimate(&self, _input_len: usize) -> Option<Duration> {
        Some(self.0)
    }

    fn run(&self, ctx: &Context, _input: Bytes) -> Result<Bytes, TaskError> {
        let start = std::time::Instant::now();
        let mut rounds = 0u64;
        let mut x = 1u64;
        while start.elapsed() < self.0 {
            // Stops here once the call is cancelled or past its deadline.
            ctx.check()?;
            let round = std::time::Instant::now();
            while round.elapsed() < Duration::from_millis(1) {
                for i in 0..1_000 {
                    x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
                }
            }
            rounds += 1;
            ctx.progress(start.elapsed().as_secs_f64() / self.0.as_secs_f64(), "spinning");
        }
        Ok(Bytes::from(rounds.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use offload_task::{CancelFlag, prepare, run_job};

    use super::*;

    /// Runs `task` as the server would, with no deadline.
    fn run(task: &dyn Task, params: &[(&str, &str)], input: &[u8]) -> Result<Bytes, TaskError> {
        let params: HashMap<String, String> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let job = prepare(task, &params)?;
        run_job(job.as_ref(), &Context::new(None, CancelFlag::new(), None), Bytes::copy_from_slice(input))
    }

    #[test]
    fn words_are_counted_with_and_without_a_minimum_length() {
        let text = "the quick  brown\tfox\njumps über  a lazy dog\u{3000}ok ";
        assert_eq!(run(&WordCount, &[], text.as_bytes()).unwrap(), "10");
        assert_eq!(run(&WordCount, &[("min_len", "4")], text.as_bytes()).unwrap(), "5");
        // Characters, not bytes: "über" is 4 characters in 5 bytes.
        assert_eq!(run(&WordCount, &[("min_len", "5")], "über fünfe".as_bytes()).unwrap(), "1");
        assert_eq!(run(&WordCount, &[("min_len", "0")], b"a b").unwrap(), "2");
        assert_eq!(run(&WordCount, &[], b"").unwrap(), "0");
        assert_eq!(run(&WordCount, &[], b" \n\t ").unwrap(), "0");
    }

    #[test]
    fn words_across_chunk_boundaries_are_counted_once() {
        // Words of 7 letters and one space, so chunk ends fall inside words.
        let text = "abcdefg ".repeat(3 * CHUNK / 8 + 123);
        let words = (3 * CHUNK / 8 + 123).to_string();
        assert_eq!(run(&WordCount, &[], text.as_bytes()).unwrap(), words);
        assert_eq!(run(&WordCount, &[("min_len", "7")], text.as_bytes()).unwrap(), words);
        // One word longer than a chunk.
        let long = format!("x {} y", "z".repeat(2 * CHUNK + 5));
        assert_eq!(run(&WordCount, &[], long.as_bytes()).unwrap(), "3");
    }

    #[test]
    fn invalid_utf8_and_bad_params_are_invalid_arguments_that_say_where() {
        let err = run(&WordCount, &[], b"ok fine \xff more").unwrap_err();
        assert_eq!(
            err,
            TaskError::InvalidInput("input is not valid UTF-8: invalid byte sequence at byte offset 8".into())
        );
        let err = run(&WordCount, &[], "ab \u{e9}".as_bytes().split_last().unwrap().1).unwrap_err();
        assert!(err.to_string().contains("starting at byte offset 3"), "{err}");
        let err = run(&WordCount, &[("min_len", "-1")], b"a").unwrap_err();
        assert!(matches!(err, TaskError::InvalidParam(ref m) if m.contains("\"min_len\"")), "{err:?}");
        let err = run(&WordCount, &[("max_len", "3")], b"a").unwrap_err();
        assert!(matches!(err, TaskError::InvalidParam(ref m) if m.contains("unknown param \"max_len\"")), "{err:?}");
    }

    #[test]
    fn a_panic_is_an_error_and_spin_stops_when_cancelled() {
        assert!(matches!(run(&Panic, &[], b""), Err(TaskError::Panicked(m)) if m.contains("asked to panic")));
        let job = prepare(&Spin, &HashMap::new()).unwrap();
        let cancel = CancelFlag::new();
        let ctx = Context::new(None, cancel.clone(), None);
        let spinning = std::thread::spawn(move || run_job(job.as_ref(), &ctx, Bytes::new()));
        cancel.cancel();
        assert_eq!(spinning.join().unwrap(), Err(TaskError::Cancelled));
        assert_eq!(run(&Spin, &[("ms", "3")], b"").map(|out| out.is_empty()), Ok(false));
    }
}
