//! Writes the seed corpus the fuzz targets start from (committed under
//! `fuzz/corpus/`): a few valid inputs of each kind, so that libFuzzer
//! starts from the formats' real structure. `cargo run --bin make-seeds`
//! from `fuzz/` writes them again.

use std::{fs, io::Cursor, path::Path};

use bytes::Bytes;
use image::{DynamicImage, ImageFormat, RgbaImage};
use offload_proto::{
    framing,
    offload::worker::v1::{
        Cancel, FailureKind, Hello, Ping, Pong, RunTask, SpanAttribute, TaskDone, TaskProgress, Welcome, WorkerReply,
        WorkerRequest, WorkerSpan, span_attribute, worker_reply, worker_request,
    },
};

fn frame<M: prost::Message>(message: &M, payload: &[u8]) -> Vec<u8> {
    let mut out = framing::frame_head(message, payload.len());
    out.extend_from_slice(payload);
    out
}

fn request(body: worker_request::Body) -> WorkerRequest {
    WorkerRequest { body: Some(body), payload: Bytes::new() }
}

fn reply(body: worker_reply::Body) -> WorkerReply {
    WorkerReply { body: Some(body), payload: Bytes::new() }
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus folder");
    fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
}

fn main() {
    let run = RunTask {
        id: 1,
        task: "hash.sha256".into(),
        params: [("level".to_string(), "3".to_string())].into(),
        deadline_unix_nanos: 1,
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        inline: true,
    };
    let mut stream = frame(&request(worker_request::Body::Welcome(Welcome { protocol_version: 3 })), &[]);
    stream.extend(frame(&request(worker_request::Body::Run(run)), b"abc"));
    stream.extend(frame(&request(worker_request::Body::Cancel(Cancel { id: 1 })), &[]));
    stream.extend(frame(&request(worker_request::Body::Ping(Ping { seq: 9 })), &[]));
    write("worker_frames", "session", &stream);

    let span = WorkerSpan {
        name: "worker hash.sha256".into(),
        start_unix_nanos: 1,
        end_unix_nanos: 2,
        attributes: vec![SpanAttribute { key: "worker.pid".into(), value: Some(span_attribute::Value::Integer(7)) }],
        error: String::new(),
        children: vec![WorkerSpan { name: "step".into(), ..Default::default() }],
    };
    let hello = Hello { protocol_version: 3, pid: 7, tasks: vec!["hash.sha256".into()], ..Default::default() };
    let progress = TaskProgress { id: 1, fraction: 0.5, message: "half".into() };
    let done = TaskDone { id: 1, failure: 0, message: String::new(), run_us: 5, span: Some(span) };
    let failed =
        TaskDone { id: 2, failure: FailureKind::InvalidInput as i32, message: "bad".into(), ..Default::default() };
    let mut stream = vec![7u8];
    stream.extend(frame(&reply(worker_reply::Body::Hello(hello)), &[]));
    stream.extend(frame(&reply(worker_reply::Body::Progress(progress)), &[]));
    stream.extend(frame(&reply(worker_reply::Body::Done(done)), b"output"));
    stream.extend(frame(&reply(worker_reply::Body::Done(failed)), &[]));
    stream.extend(frame(&reply(worker_reply::Body::Pong(Pong { seq: 9 })), &[]));
    write("front_frames", "session", &stream);

    // `arbitrary` reads any bytes; these carry the parameter names and values
    // the tasks know, for the fuzzer to splice.
    write("params", "names", b"\x03width\x0064\x00height\x0032\x00format\x00webp\x00level\x0019\x00limit\x001000");
    write("params", "values", b"\x07ms\x00-1\x00bytes\x0018446744073709551616\x00kind\x00segv\x00level\x00 3");

    for (name, level) in [("small", 1), ("repeated", 19)] {
        let text = b"offload offload offload 0123456789".repeat(if level == 1 { 1 } else { 300 });
        write("zstd", name, &zstd::encode_all(&text[..], level).expect("zstd"));
    }
    // What fuzzing found before, kept as regressions: a frame asking for a
    // 64 MiB window, and a legacy (v0.6) frame whose decoder ignored the limit.
    write("zstd", "huge-window", b"\x28\xb5\x2f\xfd\x00\x80\x48\xc5\x00\x00\x90offloa");
    write("zstd", "legacy-v06", b"\x26\xb5\x2f\xfd\x0f\x00");

    let mut picture = RgbaImage::new(9, 7);
    for (x, y, pixel) in picture.enumerate_pixels_mut() {
        *pixel = image::Rgba([(x * 28) as u8, (y * 36) as u8, 128, 200]);
    }
    let picture = DynamicImage::ImageRgba8(picture);
    for (name, format) in
        [("png", ImageFormat::Png), ("jpeg", ImageFormat::Jpeg), ("webp", ImageFormat::WebP), ("gif", ImageFormat::Gif)]
    {
        let image =
            if format == ImageFormat::Jpeg { DynamicImage::ImageRgb8(picture.to_rgb8()) } else { picture.clone() };
        // Two bytes pick the box and output format; the image follows.
        let mut seed = vec![3u8, 0];
        let mut encoded = Vec::new();
        image.write_to(&mut Cursor::new(&mut encoded), format).expect("encode");
        seed.extend_from_slice(&encoded);
        write("image", name, &seed);
    }
}
