//! Framing of the worker protocol (`offload.worker.v1`): a 4-byte
//! big-endian length, then one protobuf message whose field 15, `payload`,
//! is written last and separately, so large inputs and outputs go from the
//! caller's buffer to the socket without an encoding copy. Readers decode a
//! frame as an ordinary message.

use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len},
};

/// The protocol version both ends must speak. Version 2: the front may
/// pipeline RunTask frames (see [`MAX_OUTSTANDING`]). Version 3: workers
/// report their spans in TaskDone instead of exporting them.
pub const PROTOCOL_VERSION: u32 = 3;

/// Tasks a front may have sent to one worker and not yet seen answered; the
/// worker runs them one at a time in arrival order and treats more as a
/// protocol error.
pub const MAX_OUTSTANDING: usize = 64;

/// The field number of `payload` in WorkerRequest and WorkerReply.
const PAYLOAD_FIELD: u32 = 15;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// The bytes to write before a payload of `payload_len` bytes: the length
/// prefix, `message` (whose own `payload` must be empty), and the payload's
/// field key and length. The frame is this followed by the payload.
pub fn frame_head<M: Message>(message: &M, payload_len: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(LENGTH_PREFIX + message.encoded_len() + 16);
    append_head(message, payload_len, &mut head);
    head
}

/// [`frame_head`] appended to `out`, so that several frames can go out in
/// one write from one reused buffer.
pub fn append_head<M: Message>(message: &M, payload_len: usize, out: &mut Vec<u8>) {
    let payload_part = if payload_len == 0 {
        0
    } else {
        key_len(PAYLOAD_FIELD) + encoded_len_varint(payload_len as u64) + payload_len
    };
    let message_len = message.encoded_len();
    let body_len = message_len + payload_part;
    out.reserve(LENGTH_PREFIX + message_len + 16);
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    message.encode(out).expect("a Vec grows as needed");
    if payload_len > 0 {
        encode_key(PAYLOAD_FIELD, WireType::LengthDelimited, out);
        encode_varint(payload_len as u64, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::worker::v1::{RunTask, WorkerRequest, worker_request::Body};
    use bytes::Bytes;

    #[test]
    fn a_head_plus_payload_decodes_as_one_message() {
        let run = RunTask { id: 7, task: "hash.sha256".into(), ..Default::default() };
        let message = WorkerRequest { body: Some(Body::Run(run.clone())), payload: Bytes::new() };
        for payload in [Vec::new(), b"abc".to_vec(), vec![9u8; 300_000]] {
            let mut frame = frame_head(&message, payload.len());
            frame.extend_from_slice(&payload);
            let announced = u32::from_be_bytes(frame[..LENGTH_PREFIX].try_into().unwrap()) as usize;
            assert_eq!(announced, frame.len() - LENGTH_PREFIX);
            let decoded = WorkerRequest::decode(&frame[LENGTH_PREFIX..]).unwrap();
            assert_eq!(decoded.body, Some(Body::Run(run.clone())));
            assert_eq!(decoded.payload.as_ref(), payload.as_slice());
        }
    }
}
