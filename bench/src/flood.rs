//! The flood: many concurrent large unary calls over several HTTP/2
//! connections, as an h2load run sends them. The request is encoded once and
//! every call sends the same bytes (no copy per call), so the generator
//! itself stays small however much the flood asks of the server. Counts
//! answers by grpc-status; the server's peak resident memory is its VmHWM.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::{BufMut as _, Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use offload_proto::offload::v1::ExecuteRequest;
use prost::Message as _;

/// The "code" of a call that got no gRPC status (its connection failed).
pub const NO_STATUS: u32 = u32::MAX;

/// What a flood got back.
#[derive(Debug, Default)]
pub struct FloodReport {
    /// Answers by gRPC status code (0 = OK, 8 = RESOURCE_EXHAUSTED, ...).
    pub codes: BTreeMap<u32, u64>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// The server's peak resident memory over its life (VmHWM), bytes.
    pub server_peak_rss: u64,
}

/// The flood's call: `hash.sha256` of `size` bytes.
pub fn request(size: usize) -> ExecuteRequest {
    ExecuteRequest { task: "hash.sha256".into(), input: vec![0x5a; size].into(), ..Default::default() }
}

impl FloodReport {
    /// One line: the answers by code, the time, the server's peak RSS.
    pub fn summary(&self) -> String {
        format!(
            "{} OK, {} RESOURCE_EXHAUSTED, answers by code {:?} (no status: {}), {:.1} s, server peak RSS {:.0} MiB",
            self.count(0),
            self.count(8),
            self.codes,
            self.count(NO_STATUS),
            self.seconds,
            self.server_peak_rss as f64 / f64::from(1 << 20)
        )
    }

    /// Answers with `code`.
    pub fn count(&self, code: u32) -> u64 {
        self.codes.get(&code).copied().unwrap_or(0)
    }
}

/// Sends `request` on `connections` connections with `streams` calls in
/// flight on each, for `duration`, to the server at `addr` (pid `pid`).
pub async fn run(
    addr: &str,
    pid: u32,
    request: &ExecuteRequest,
    connections: usize,
    streams: usize,
    duration: Duration,
) -> anyhow::Result<FloodReport> {
    // gRPC's message framing: not compressed, length, message.
    let mut message = BytesMut::with_capacity(5 + request.encoded_len());
    message.put_u8(0);
    message.put_u32(u32::try_from(request.encoded_len()).context("request over 4 GiB")?);
    request.encode(&mut message)?;
    let message = message.freeze();
    let codes = Arc::new(Mutex::new(BTreeMap::new()));
    let started = Instant::now();
    let end = started + duration;
    let mut callers = Vec::new();
    for _ in 0..connections {
        let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http2::Builder::new(TokioExecutor::new()).handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        for _ in 0..streams {
            let (mut sender, message, codes) = (sender.clone(), message.clone(), Arc::clone(&codes));
            callers.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let code = call(&mut sender, message.clone()).await;
                    *codes.lock().expect("unpoisoned").entry(code).or_insert(0) += 1;
                }
            }));
        }
    }
    for caller in callers {
        caller.await?;
    }
    let status = procfs::process::Process::new(i32::try_from(pid)?)?.status()?;
    let codes = std::mem::take(&mut *codes.lock().expect("unpoisoned"));
    Ok(FloodReport {
        codes,
        seconds: started.elapsed().as_secs_f64(),
        server_peak_rss: status.vmhwm.unwrap_or(0) * 1024,
    })
}

/// One Execute call; its gRPC status code ([`NO_STATUS`] when the
/// connection failed before any status).
async fn call(sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>, message: Bytes) -> u32 {
    if sender.ready().await.is_err() {
        return NO_STATUS;
    }
    let request = http::Request::post("http://offload/offload.v1.Compute/Execute")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(message))
        .expect("a valid request");
    let Ok(response) = sender.send_request(request).await else { return NO_STATUS };
    let code = |headers: &http::HeaderMap| headers.get("grpc-status")?.to_str().ok()?.parse::<u32>().ok();
    if let Some(code) = code(response.headers()) {
        return code;
    }
    match response.into_body().collect().await {
        Ok(body) => body.trailers().and_then(code).unwrap_or(NO_STATUS),
        Err(_) => NO_STATUS,
    }
}
