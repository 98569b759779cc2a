//! Framing of the worker protocol (`offload.worker.v1`): a 4-byte
//! big-endian length, then one protobuf message whose field 15, `payload`,
//! is written last and separately, so large inputs and outputs go from the
//! caller's buffer to the socket without an encoding copy. Readers decode a
//! frame as an ordinary message.

use std::io::Read;

use bytes::{Bytes, BytesMut};
use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len},
};

use crate::offload::worker::v1::{WorkerReply, WorkerRequest, worker_reply, worker_request};

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

/// Buffer room taken for a frame before any of it has arrived. Beyond
/// this, a frame's buffer grows with the bytes received (at most doubling),
/// so a length prefix announcing a large frame allocates nothing by itself.
const FIRST_ROOM: usize = 64 << 10;

/// A frame that breaks the protocol, or a failed read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the peer may send.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame is not a message of the protocol.
    #[error("undecodable frame: {0}")]
    Undecodable(#[from] prost::DecodeError),
    /// The message has no body.
    #[error("frame without a body")]
    NoBody,
    /// Reading failed (or the stream ended inside a frame).
    #[error("reading a frame: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame from a blocking `reader` (the worker's side) into `buf`
/// (reused between frames); None at a clean end of stream.
pub fn read_frame(reader: &mut impl Read, buf: &mut BytesMut, max_frame: usize) -> Result<Option<Bytes>, FrameError> {
    let mut prefix = [0u8; LENGTH_PREFIX];
    match reader.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max_frame {
        return Err(FrameError::TooLong { len, max: max_frame });
    }
    // Reclaims the previous frame's memory once its reader let go of it.
    buf.clear();
    while buf.len() < len {
        let have = buf.len();
        let step = (len - have).min(have.max(FIRST_ROOM));
        buf.resize(have + step, 0);
        reader.read_exact(&mut buf[have..])?;
    }
    Ok(Some(buf.split().freeze()))
}

/// Decodes a frame the worker read: the front's request body and payload.
pub fn decode_request(frame: Bytes) -> Result<(worker_request::Body, Bytes), FrameError> {
    let request = WorkerRequest::decode(frame)?;
    Ok((request.body.ok_or(FrameError::NoBody)?, request.payload))
}

/// Decodes a frame the front read: the worker's reply body and payload.
pub fn decode_reply(frame: Bytes) -> Result<(worker_reply::Body, Bytes), FrameError> {
    let reply = WorkerReply::decode(frame)?;
    Ok((reply.body.ok_or(FrameError::NoBody)?, reply.payload))
}

/// The front's frame decoder for its async reads of a worker's socket: the
/// same framing as [`read_frame`], with the same growth (tokio-util's
/// `LengthDelimitedCodec` reserves a whole announced frame at once).
#[cfg(feature = "codec")]
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: usize,
}

#[cfg(feature = "codec")]
impl FrameCodec {
    /// A decoder refusing frames over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
    }
}

#[cfg(feature = "codec")]
impl tokio_util::codec::Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, std::io::Error> {
        use bytes::Buf as _;
        let Some(prefix) = src.get(..LENGTH_PREFIX) else { return Ok(None) };
        let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
        if len > self.max_frame {
            let err = FrameError::TooLong { len, max: self.max_frame };
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, err));
        }
        let whole = LENGTH_PREFIX + len;
        if src.len() < whole {
            // Room for as much again as has arrived, never past the frame.
            src.reserve((whole - src.len()).min(src.len().max(FIRST_ROOM)));
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX);
        Ok(Some(src.split_to(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::worker::v1::{RunTask, worker_request::Body};

    #[test]
    fn a_large_announced_frame_allocates_only_what_arrives() {
        let mut wire = (1u32 << 30).to_be_bytes().to_vec();
        wire.extend_from_slice(&[1, 2, 3]);
        let mut buf = BytesMut::new();
        let err = read_frame(&mut wire.as_slice(), &mut buf, 2 << 30).unwrap_err();
        assert!(matches!(err, FrameError::Io(_)), "{err}");
        assert!(buf.capacity() <= FIRST_ROOM, "reserved {} bytes for 3", buf.capacity());
        let err = read_frame(&mut wire.as_slice(), &mut buf, 1 << 20).unwrap_err();
        assert!(matches!(err, FrameError::TooLong { len: 1_073_741_824, max: 1_048_576 }), "{err}");
    }

    #[test]
    fn frames_of_every_size_read_back_whole() {
        let sizes = [0, 1, FIRST_ROOM - 1, FIRST_ROOM, FIRST_ROOM + 1, 5 * FIRST_ROOM + 17];
        let mut wire = Vec::new();
        for size in sizes {
            wire.extend_from_slice(&(size as u32).to_be_bytes());
            wire.extend((0..size).map(|i| i as u8));
        }
        let (mut reader, mut buf) = (wire.as_slice(), BytesMut::new());
        for size in sizes {
            let frame = read_frame(&mut reader, &mut buf, 1 << 20).unwrap().unwrap();
            assert_eq!(frame.len(), size);
            assert!(frame.iter().enumerate().all(|(i, b)| *b == i as u8));
        }
        assert!(read_frame(&mut reader, &mut buf, 1 << 20).unwrap().is_none());
    }

    #[cfg(feature = "codec")]
    #[test]
    fn the_codec_grows_with_the_data_and_splits_frames() {
        use tokio_util::codec::Decoder as _;
        let mut codec = FrameCodec::new(1 << 30);
        let mut src = BytesMut::from(&(1u32 << 30).to_be_bytes()[..]);
        assert!(codec.decode(&mut src).unwrap().is_none());
        assert!(src.capacity() <= 2 * FIRST_ROOM, "reserved {} bytes for 4", src.capacity());
        let mut src = BytesMut::new();
        for payload in [&b"abc"[..], b"", b"defg"] {
            src.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            src.extend_from_slice(payload);
        }
        let frames: Vec<BytesMut> = std::iter::from_fn(|| codec.decode(&mut src).unwrap()).collect();
        assert_eq!(frames, [&b"abc"[..], b"", b"defg"]);
        assert!(FrameCodec::new(2).decode(&mut BytesMut::from(&[0, 0, 0, 3][..])).is_err());
    }

    /// The annotated bytes of docs/worker-protocol.md, section 8.
    #[test]
    fn the_protocol_docs_byte_dumps_are_what_the_messages_encode_to() {
        use crate::offload::worker::v1::{Hello, Ping, Pong, TaskDecl, TaskDone, Welcome, worker_reply};
        let hex = |text: &str| text.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect::<Vec<u8>>();
        let framed = |head: Vec<u8>, payload: &[u8]| [head, payload.to_vec()].concat();
        let reply = |body, payload: &[u8]| {
            framed(frame_head(&WorkerReply { body: Some(body), payload: Bytes::new() }, payload.len()), payload)
        };
        let request = |body, payload: &[u8]| {
            framed(frame_head(&WorkerRequest { body: Some(body), payload: Bytes::new() }, payload.len()), payload)
        };
        let declared = vec![TaskDecl { name: "go.echo".into(), description: "echoes".into(), ..Default::default() }];
        let hello = Hello { protocol_version: 3, pid: 4242, declared, ..Default::default() };
        assert_eq!(
            reply(worker_reply::Body::Hello(hello), b""),
            hex("00 00 00 1a 0a 18 08 03 10 92 21 22 11 0a 07 67 6f 2e 65 63 68 6f 12 06 65 63 68 6f 65 73")
        );
        assert_eq!(request(Body::Welcome(Welcome { protocol_version: 3 }), b""), hex("00 00 00 04 0a 02 08 03"));
        let params = [("n".to_string(), "2".to_string())].into();
        let run = RunTask { id: 1, task: "go.echo".into(), params, ..Default::default() };
        assert_eq!(
            request(Body::Run(run), b"hi"),
            hex("00 00 00 19 12 13 08 01 12 07 67 6f 2e 65 63 68 6f 1a 06 0a 01 6e 12 01 32 7a 02 68 69")
        );
        let done = TaskDone { id: 1, run_us: 5, ..Default::default() };
        assert_eq!(reply(worker_reply::Body::Done(done), b"hi"), hex("00 00 00 0a 1a 04 08 01 20 05 7a 02 68 69"));
        assert_eq!(request(Body::Ping(Ping { seq: 0 }), b""), hex("00 00 00 02 22 00"));
        assert_eq!(reply(worker_reply::Body::Pong(Pong { seq: 0 }), b""), hex("00 00 00 02 22 00"));
        assert_eq!(request(Body::Ping(Ping { seq: 1 }), b""), hex("00 00 00 04 22 02 08 01"));
        assert_eq!(reply(worker_reply::Body::Pong(Pong { seq: 1 }), b""), hex("00 00 00 04 22 02 08 01"));
    }

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
