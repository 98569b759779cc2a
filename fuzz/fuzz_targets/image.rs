//! `image.thumbnail` on hostile images of every accepted format (the format
//! is guessed from the data); the first two bytes pick the box and the
//! output format.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [size, format, image @ ..] = data else { return };
    let side = (1 + u32::from(*size) % 64).to_string();
    let format = ["png", "jpeg", "webp"][usize::from(*format) % 3];
    let _ = offload_fuzz::run("image.thumbnail", &[("width", &side), ("height", &side), ("format", format)], image);
});
