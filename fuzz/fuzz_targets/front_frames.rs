//! The front reading a worker's frames, as its socket delivers them in
//! pieces: the first byte sets the piece size.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use offload_proto::framing::{self, FrameCodec};
use tokio_util::codec::Decoder as _;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, stream)) = data.split_first() else { return };
    let mut codec = FrameCodec::new(offload_fuzz::MAX_FRAME);
    let mut buf = BytesMut::new();
    for chunk in stream.chunks(usize::from(piece).max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let _ = framing::decode_reply(frame.freeze());
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
