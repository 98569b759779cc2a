//! `decompress.zstd` on hostile frames: output within its cap or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(output) = offload_fuzz::run("decompress.zstd", &[], data) {
        assert!(output.len() <= offload_fuzz::MAX_DECOMPRESSED);
    }
});
