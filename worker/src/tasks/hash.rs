//! `hash.sha256` and `hash.blake3`: the raw 32-byte digest of the input,
//! computed in chunks so that a cancelled call over a large input stops.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use sha2::Digest;

use super::{BOTH_MODES, CHUNK, per_byte};
use crate::{Context, Job, Mode, Params, Task, TaskError, TaskSpec};

/// Adds the hash tasks to `out`.
pub fn register(out: &mut Vec<Arc<dyn Task>>) {
    out.push(Arc::new(HashTask { spec: SHA256, algo: Algo::Sha256 }));
    out.push(Arc::new(HashTask { spec: BLAKE3, algo: Algo::Blake3 }));
}

const SHA256: TaskSpec = TaskSpec {
    name: "hash.sha256",
    cacheable: true,
    version: 1,
    description: "SHA-256 of the input; output is the raw 32-byte digest",
    default_mode: Mode::Pool,
    allowed_modes: BOTH_MODES,
    params: &[],
};

const BLAKE3: TaskSpec = TaskSpec {
    name: "hash.blake3",
    cacheable: true,
    version: 1,
    description: "BLAKE3 of the input; output is the raw 32-byte digest",
    default_mode: Mode::Pool,
    allowed_modes: BOTH_MODES,
    params: &[],
};

#[derive(Debug, Clone, Copy)]
enum Algo {
    Sha256,
    Blake3,
}

struct HashTask {
    spec: TaskSpec,
    algo: Algo,
}

impl Task for HashTask {
    fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    fn prepare(&self, _params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
        Ok(Box::new(HashJob(self.algo)))
    }
}

struct HashJob(Algo);

impl Job for HashJob {
    fn estimate(&self, input_len: usize) -> Option<Duration> {
        Some(match self.0 {
            Algo::Sha256 => per_byte(input_len, 2.0),
            Algo::Blake3 => per_byte(input_len, 0.7),
        })
    }

    fn run(&self, ctx: &Context, input: Bytes) -> Result<Bytes, TaskError> {
        let digest: [u8; 32] = match self.0 {
            Algo::Sha256 => {
                let mut h = sha2::Sha256::new();
                feed(ctx, &input, |c| h.update(c))?;
                h.finalize().into()
            }
            Algo::Blake3 => {
                let mut h = blake3::Hasher::new();
                feed(ctx, &input, |c| {
                    h.update(c);
                })?;
                h.finalize().into()
            }
        };
        Ok(Bytes::copy_from_slice(&digest))
    }
}

/// Feeds `input` to `update` chunk by chunk, stopping if the call must stop.
fn feed(ctx: &Context, input: &[u8], mut update: impl FnMut(&[u8])) -> Result<(), TaskError> {
    let chunks = input.len().div_ceil(CHUNK).max(1);
    for (i, chunk) in input.chunks(CHUNK).enumerate() {
        ctx.check()?;
        update(chunk);
        ctx.progress((i + 1) as f64 / chunks as f64, "");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CancelFlag;

    fn run(algo: Algo, input: &[u8]) -> String {
        let ctx = Context::new(None, CancelFlag::new(), None);
        hex::encode(HashJob(algo).run(&ctx, Bytes::copy_from_slice(input)).unwrap())
    }

    #[test]
    fn sha256_matches_nist_vectors() {
        assert_eq!(run(Algo::Sha256, b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(run(Algo::Sha256, b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(
            run(Algo::Sha256, b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        // One million 'a': crosses the chunk boundary.
        assert_eq!(
            run(Algo::Sha256, &vec![b'a'; 1_000_000]),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
        assert_eq!(
            run(Algo::Sha256, &vec![b'a'; 3 * CHUNK + 7]),
            hex::encode(sha2::Sha256::digest(vec![b'a'; 3 * CHUNK + 7]))
        );
    }

    #[test]
    fn blake3_matches_reference_vectors() {
        assert_eq!(run(Algo::Blake3, b""), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
        // The official test vectors' input: bytes 0..=250 repeating, length 1023.
        let input: Vec<u8> = (0..1023u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(run(Algo::Blake3, &input), "10108970eeda3eb932baac1428c7a2163b0e924c9a9e25b35bba72b28f70bd11");
    }

    #[test]
    fn a_cancelled_hash_stops() {
        let flag = CancelFlag::new();
        flag.cancel();
        let ctx = Context::new(None, flag, None);
        let err = HashJob(Algo::Sha256).run(&ctx, Bytes::from(vec![0u8; 4 * CHUNK])).unwrap_err();
        assert_eq!(err, TaskError::Cancelled);
    }
}
