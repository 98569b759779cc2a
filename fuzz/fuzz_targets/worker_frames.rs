//! The worker reading the front's frames: any byte stream ends in frames,
//! a clean end, or an error; never a panic or an allocation of a length
//! that was only announced.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use offload_proto::framing;

fuzz_target!(|data: &[u8]| {
    let (mut reader, mut buf) = (data, BytesMut::new());
    while let Ok(Some(frame)) = framing::read_frame(&mut reader, &mut buf, offload_fuzz::MAX_FRAME) {
        let _ = framing::decode_request(frame);
    }
});
