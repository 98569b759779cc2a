//! `compress.zstd` and `decompress.zstd`: standard zstd frames, readable and
//! writable by the zstd CLI. Decompression stops at a configured output cap
//! and never allocates past it, so a small bomb cannot exhaust memory.

use std::{
    io::{Read, Write},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;

use super::{BOTH_MODES, CHUNK, per_byte};
use crate::{Context, Job, Mode, ParamSpec, Params, Task, TaskError, TaskSpec};

/// Adds the zstd tasks to `out`; decompression output is capped at `max_output` bytes.
pub fn register(out: &mut Vec<Arc<dyn Task>>, max_output: usize) {
    out.push(Arc::new(CompressTask));
    out.push(Arc::new(DecompressTask { max_output }));
}

struct CompressTask;

const COMPRESS: TaskSpec = TaskSpec {
    name: "compress.zstd",
    cacheable: true,
    version: 1,
    description: "compresses the input into one zstd frame (with its content size), as `zstd -LEVEL` would",
    default_mode: Mode::Pool,
    allowed_modes: BOTH_MODES,
    params: &[ParamSpec::optional("level", "compression level, an integer in 1..=19", "3")],
};

impl Task for CompressTask {
    fn spec(&self) -> &TaskSpec {
        &COMPRESS
    }

    fn prepare(&self, params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
        Ok(Box::new(CompressJob { level: params.int("level", 1..=19)? }))
    }
}

struct CompressJob {
    level: i32,
}

impl Job for CompressJob {
    fn estimate(&self, input_len: usize) -> Option<Duration> {
        Some(per_byte(input_len, 2.0 + f64::from(self.level) * f64::from(self.level) / 4.0))
    }

    fn run(&self, ctx: &Context, input: Bytes) -> Result<Bytes, TaskError> {
        let failed = |e: std::io::Error| TaskError::Failed(format!("zstd compression failed: {e}"));
        let mut encoder =
            zstd::stream::write::Encoder::new(Vec::with_capacity(input.len() / 2 + 64), self.level).map_err(failed)?;
        encoder.include_contentsize(true).map_err(failed)?;
        encoder.set_pledged_src_size(Some(input.len() as u64)).map_err(failed)?;
        for chunk in input.chunks(CHUNK) {
            ctx.check()?;
            encoder.write_all(chunk).map_err(failed)?;
        }
        Ok(Bytes::from(encoder.finish().map_err(failed)?))
    }
}

struct DecompressTask {
    max_output: usize,
}

// Decompression of untrusted data: a worker process by default.
const DECOMPRESS: TaskSpec = TaskSpec {
    name: "decompress.zstd",
    cacheable: true,
    version: 1,
    description: "decompresses one or more zstd frames; output larger than the server's cap fails with RESOURCE_EXHAUSTED",
    default_mode: Mode::Isolated,
    allowed_modes: BOTH_MODES,
    params: &[],
};

impl Task for DecompressTask {
    fn spec(&self) -> &TaskSpec {
        &DECOMPRESS
    }

    fn prepare(&self, _params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
        Ok(Box::new(DecompressJob { max_output: self.max_output }))
    }
}

struct DecompressJob {
    max_output: usize,
}

impl DecompressJob {
    fn too_large(&self) -> TaskError {
        TaskError::TooLarge(format!(
            "decompressed output exceeds the server's cap of {} bytes (--max-decompressed-bytes)",
            self.max_output
        ))
    }
}

impl DecompressJob {
    /// The largest window (as a power of two) a frame may ask for: enough
    /// for any output within the cap, at least 2^23 (what levels up to 19
    /// use), at most zstd's own default limit of 2^27.
    fn window_log(&self) -> u32 {
        let cap_log = usize::BITS - self.max_output.saturating_sub(1).leading_zeros();
        cap_log.clamp(23, 27)
    }
}

/// The format version of a frame written by zstd before 1.0 (its magic
/// number says which), if `input` starts with one. libzstd's decoders for
/// them are left out of the build: they allocate whatever window a frame
/// names, ignoring the limit set below (a 6-byte v0.6 frame asked for
/// hundreds of MiB, found by fuzzing).
fn legacy_format(input: &[u8]) -> Option<u32> {
    let magic = u32::from_le_bytes(input.get(..4)?.try_into().ok()?);
    match magic {
        0x1EB5_2FFD => Some(1),
        0xFD2F_B522..=0xFD2F_B527 => Some(magic - 0xFD2F_B520),
        _ => None,
    }
}

impl Job for DecompressJob {
    fn estimate(&self, input_len: usize) -> Option<Duration> {
        Some(per_byte(input_len, 3.0))
    }

    fn run(&self, ctx: &Context, input: Bytes) -> Result<Bytes, TaskError> {
        if input.is_empty() {
            return Err(TaskError::InvalidInput("input is empty; expected a zstd frame".into()));
        }
        if let Some(version) = legacy_format(&input) {
            return Err(TaskError::InvalidInput(format!(
                "input is a legacy zstd frame (format v0.{version}, from before zstd 1.0), which is not supported"
            )));
        }
        let invalid = |e: std::io::Error| TaskError::InvalidInput(format!("input is not valid zstd data: {e}"));
        // The first frame's declared size, when present, sizes the output once.
        let declared = zstd::zstd_safe::get_frame_content_size(&input).ok().flatten();
        if declared.is_some_and(|size| size > self.max_output as u64) {
            return Err(self.too_large());
        }
        let mut out = Vec::with_capacity(declared.map_or(CHUNK, |size| size as usize).min(self.max_output));
        let mut decoder = zstd::stream::read::Decoder::with_buffer(&input[..]).map_err(invalid)?;
        // The decoder allocates the window a frame asks for before it
        // produces a byte: a 20-byte frame could ask for 128 MiB (found by
        // fuzzing). Windows up to 8 MiB (every level up to 19) always work;
        // larger ones only where the output cap could need them.
        let window_log = self.window_log();
        decoder.window_log_max(window_log).map_err(invalid)?;
        let invalid = |e: std::io::Error| {
            if e.to_string().contains("too much memory") {
                TaskError::TooLarge(format!(
                    "the frame asks for a window of more than {} bytes (the limit follows --max-decompressed-bytes, 8 MiB at least)",
                    1u64 << window_log
                ))
            } else {
                invalid(e)
            }
        };
        let mut buf = vec![0u8; 64 << 10];
        loop {
            ctx.check()?;
            let n = decoder.read(&mut buf).map_err(invalid)?;
            if n == 0 {
                break;
            }
            let needed = out.len() + n;
            if needed > self.max_output {
                return Err(self.too_large());
            }
            if needed > out.capacity() {
                // Grow geometrically, but never past the cap.
                let target = (out.capacity() * 2).max(needed).min(self.max_output);
                out.reserve_exact(target - out.len());
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CancelFlag;

    fn ctx() -> Context {
        Context::new(None, CancelFlag::new(), None)
    }

    #[test]
    fn round_trip_and_interop_with_the_reference_library() {
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8 ^ (i / 4096) as u8).collect();
        for level in [1, 3, 19] {
            let packed = CompressJob { level }.run(&ctx(), Bytes::from(data.clone())).unwrap();
            assert!(packed.len() < data.len());
            // Plain libzstd reads it (the CLI uses the same format).
            assert_eq!(zstd::decode_all(&packed[..]).unwrap(), data);
            let unpacked = DecompressJob { max_output: 1 << 30 }.run(&ctx(), packed).unwrap();
            assert_eq!(unpacked, data);
        }
        // And a frame made by plain libzstd, without content size, decodes too.
        let mut foreign = Vec::new();
        zstd::stream::copy_encode(&data[..], &mut foreign, 5).unwrap();
        foreign.extend(zstd::encode_all(&b"tail"[..], 1).unwrap());
        let mut expected = data.clone();
        expected.extend_from_slice(b"tail");
        assert_eq!(DecompressJob { max_output: 1 << 30 }.run(&ctx(), Bytes::from(foreign)).unwrap(), expected);
    }

    #[test]
    fn a_bomb_is_refused_at_the_cap() {
        // 64 MiB of zeros compresses to a few KiB.
        let zeros = vec![0u8; 64 << 20];
        let bomb = CompressJob { level: 19 }.run(&ctx(), Bytes::from(zeros)).unwrap();
        assert!(bomb.len() < 64 << 10);
        let job = DecompressJob { max_output: 1 << 20 };
        assert!(matches!(job.run(&ctx(), bomb.clone()), Err(TaskError::TooLarge(_))));

        // Same bomb without a declared size: refused while streaming.
        let mut streamed = Vec::new();
        zstd::stream::copy_encode(&vec![0u8; 8 << 20][..], &mut streamed, 3).unwrap();
        let err = job.run(&ctx(), Bytes::from(streamed)).unwrap_err();
        assert!(err.to_string().contains("cap of 1048576 bytes"), "{err}");
    }

    #[test]
    fn a_frame_asking_for_a_huge_window_is_refused_before_it_is_allocated() {
        // Found by fuzzing: magic, a header without content size, a window
        // descriptor asking for 64 MiB, then a block.
        let frame = b"\x28\xb5\x2f\xfd\x00\x80\x48\xc5\x00\x00\x90offloa";
        let job = DecompressJob { max_output: 8 << 20 };
        assert_eq!(job.window_log(), 23);
        let err = job.run(&ctx(), Bytes::from_static(frame)).unwrap_err();
        assert!(matches!(err, TaskError::TooLarge(_)), "{err}");
        assert!(err.to_string().contains("window of more than 8388608 bytes"), "{err}");
        // The default cap allows zstd's own default window limit.
        assert_eq!(DecompressJob { max_output: 256 << 20 }.window_log(), 27);
        assert_eq!(DecompressJob { max_output: 1 }.window_log(), 23);
    }

    #[test]
    fn a_legacy_frame_is_refused_by_name() {
        // Found by fuzzing: a v0.6 frame header whose decoder allocated a
        // window far past the limit before failing.
        let job = DecompressJob { max_output: 1 << 20 };
        let err = job.run(&ctx(), Bytes::from_static(b"\x26\xb5\x2f\xfd\x0f\x00")).unwrap_err();
        assert!(matches!(err, TaskError::InvalidInput(_)), "{err}");
        assert!(err.to_string().contains("legacy zstd frame (format v0.6"), "{err}");
        assert_eq!(legacy_format(b"\xfd\x2f\xb5\x1e"), Some(1));
        assert_eq!(legacy_format(b"\x27\xb5\x2f\xfd"), Some(7));
        assert_eq!(legacy_format(b"\x28\xb5\x2f\xfd"), None);
        assert_eq!(legacy_format(b"\x28\xb5"), None);
        // A later frame in legacy format is not decoded either.
        let mut mixed = zstd::encode_all(&b"first"[..], 1).unwrap();
        mixed.extend_from_slice(b"\x26\xb5\x2f\xfd\x0f\x00");
        let err = job.run(&ctx(), Bytes::from(mixed)).unwrap_err();
        assert!(matches!(err, TaskError::InvalidInput(_)), "{err}");
    }

    #[test]
    fn garbage_is_invalid_input() {
        let job = DecompressJob { max_output: 1 << 20 };
        assert!(matches!(job.run(&ctx(), Bytes::from_static(b"not zstd")), Err(TaskError::InvalidInput(_))));
        assert!(matches!(job.run(&ctx(), Bytes::new()), Err(TaskError::InvalidInput(_))));
    }
}
