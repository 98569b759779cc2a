//! The tower layer that meters every call against the [`Budget`](super::Budget):
//!
//! - The request body is read through [`RequestBody`], which sees each gRPC
//!   message's 5-byte prefix (its length) before the message's bytes are
//!   passed on, and reserves that many bytes first. The first message is
//!   awaited before the call reaches tonic: if it does not fit, the call is
//!   answered RESOURCE_EXHAUSTED at once, and its body is never buffered.
//!   A later message of a streaming call waits a bounded time for room
//!   (backpressure), then fails the call.
//! - A message still arriving is bounded in time too: the call's deadline
//!   (grpc-timeout) and an idle timeout between its frames, so a client that
//!   stops sending mid-message (or never sends its first message) cannot
//!   hold its reservation or its stream for ever.
//! - The response body is read through [`ResponseBody`], which passes large
//!   data frames on in slices and gives a frame's charged output back once
//!   hyper has taken its last slice: hyper takes a slice only when the
//!   stream has send capacity, so what is given back has gone to the
//!   connection and a stalled reader holds its bytes, and no more.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::{Code, Status};
use tower::{Layer, Service};

use super::{Refusal, Usage};
use crate::{deadline, dispatch::Dispatcher};

/// How long a request message may go without a frame while part of it has
/// arrived (or before the first message); then the call fails
/// DEADLINE_EXCEEDED and its reservation is given back.
pub const MESSAGE_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a later message of a streaming call waits for room in the
/// budget before the call fails RESOURCE_EXHAUSTED.
pub const STREAM_RESERVE_PATIENCE: Duration = Duration::from_secs(10);

/// Largest slice of a response frame passed to hyper at once.
const RESPONSE_SLICE: usize = 64 << 10;

/// gRPC's length prefix: a compression flag and a big-endian u32.
const PREFIX: usize = 5;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Meters every call of the wrapped service against the dispatcher's budget.
#[derive(Debug, Clone)]
pub struct InflightLayer {
    dispatcher: Arc<Dispatcher>,
    max_message_bytes: usize,
}

impl InflightLayer {
    /// A layer charging `dispatcher`'s budget. Messages over
    /// `max_message_bytes` are left to tonic to refuse (it does so from the
    /// prefix, without buffering them).
    pub fn new(dispatcher: Arc<Dispatcher>, max_message_bytes: usize) -> Self {
        Self { dispatcher, max_message_bytes }
    }
}

impl<S> Layer<S> for InflightLayer {
    type Service = InflightService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InflightService { inner, layer: self.clone() }
    }
}

/// The service of [`InflightLayer`].
#[derive(Debug, Clone)]
pub struct InflightService<S> {
    inner: S,
    layer: InflightLayer,
}

impl<S, B> Service<Request<B>> for InflightService<S>
where
    S: Service<Request<RequestBody<B>>, Response = Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<tonic::body::Body>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The clone is not ready; the one that was polled serves this call.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let dispatcher = Arc::clone(&self.layer.dispatcher);
        let usage = Usage::new(Arc::clone(dispatcher.budget()));
        let (mut parts, body) = request.into_parts();
        let deadline = deadline::from_headers(&parts.headers, Instant::now());
        let mut body = RequestBody::new(body, usage.clone(), self.layer.max_message_bytes, deadline);
        Box::pin(async move {
            // Wait for the first message's prefix and reserve it before tonic
            // starts buffering the message.
            if let Err(status) = std::future::poll_fn(|cx| body.poll_first_message(cx)).await {
                // Counted like the dispatcher's refusals (a reset stream is
                // no call).
                match status.code() {
                    Code::ResourceExhausted => {
                        dispatcher.metrics().refused("unknown", "unknown", Code::ResourceExhausted, Some("memory"));
                    }
                    Code::DeadlineExceeded => {
                        dispatcher.metrics().refused("unknown", "unknown", Code::DeadlineExceeded, None);
                    }
                    _ => {}
                }
                let response: Response<tonic::body::Body> = status.into_http();
                return Ok(response.map(|b| ResponseBody::new(b, usage)));
            }
            parts.extensions.insert(usage.clone());
            let response = inner.call(Request::from_parts(parts, body)).await?;
            Ok(response.map(|b| ResponseBody::new(b, usage)))
        })
    }
}

/// Where the request body is in gRPC's framing.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// Reading a prefix; this many of its bytes are in `prefix`.
    Prefix(usize),
    /// Inside a message; this many of its bytes are still to come.
    Message(usize),
}

type Reserving = Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send>>;

/// A request body metered against the budget (see the module docs).
pub struct RequestBody<B> {
    inner: B,
    usage: Usage,
    max_message_bytes: usize,
    framing: Framing,
    prefix: [u8; PREFIX],
    /// Messages whose reservation has been made.
    messages: usize,
    /// A frame taken from `inner` being scanned for prefixes, and how far.
    scanning: Option<(Bytes, usize)>,
    /// Frames scanned (their messages reserved), to be passed on.
    scanned: VecDeque<Bytes>,
    /// A reservation being waited for (later messages only), and its size.
    reserving: Option<(Reserving, usize)>,
    trailers: Option<http::HeaderMap>,
    deadline: Option<Pin<Box<Sleep>>>,
    /// When the last data frame came. The idle timer below is made only
    /// when the body is found waiting, so calls whose frames arrive promptly
    /// never allocate or arm one.
    last_data: Instant,
    idle: Option<Pin<Box<Sleep>>>,
    /// No more frames will come from `inner`.
    ended: bool,
}

impl<B> RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn new(inner: B, usage: Usage, max_message_bytes: usize, deadline: Option<Instant>) -> Self {
        Self {
            inner,
            usage,
            max_message_bytes,
            framing: Framing::Prefix(0),
            prefix: [0; PREFIX],
            messages: 0,
            scanning: None,
            scanned: VecDeque::new(),
            reserving: None,
            trailers: None,
            deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at.into()))),
            last_data: Instant::now(),
            idle: None,
            ended: false,
        }
    }

    /// Ready once the first message is reserved (or the body has none).
    fn poll_first_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        loop {
            if self.messages > 0 || self.ended {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_progress(cx))?;
        }
    }

    /// One step: scans the frame in hand, or takes the next one.
    fn poll_progress(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        let step = if self.scanning.is_some() { self.poll_scan(cx) } else { self.poll_next_frame(cx) };
        if let Poll::Ready(Err(_)) = &step {
            // A failed body yields nothing more.
            self.ended = true;
            self.scanning = None;
            self.scanned.clear();
        }
        step
    }

    /// Takes the next frame of `inner` to scan, or notes the end.
    fn poll_next_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Silence is bounded while part of a message has arrived, or before
        // the first one (a stream that never starts); a streaming call may
        // rest between messages.
        let waiting = !matches!(self.framing, Framing::Prefix(0)) || self.messages == 0;
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                match frame.into_data() {
                    Ok(data) => {
                        self.last_data = Instant::now();
                        self.scanning = Some((data, 0));
                    }
                    Err(frame) => {
                        self.trailers = frame.into_trailers().ok();
                        self.ended = true;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Err(Status::from_error(err.into()))),
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if let Some(deadline) = &mut self.deadline
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(Status::deadline_exceeded(
                        "the deadline passed before the request was received",
                    )));
                }
                if !waiting {
                    return Poll::Pending;
                }
                // Data may have come since the timer was set: move it on.
                let due = self.last_data + MESSAGE_IDLE_TIMEOUT;
                let idle = self.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due.into())));
                if idle.deadline().into_std() != due {
                    idle.as_mut().reset(due.into());
                }
                if idle.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(Status::deadline_exceeded(format!(
                        "the request stalled: no data for {} s while a message was due",
                        MESSAGE_IDLE_TIMEOUT.as_secs()
                    ))));
                }
                Poll::Pending
            }
        }
    }

    /// Scans the frame in hand for message prefixes, reserving each
    /// message; when the whole frame is scanned it is queued to pass on.
    fn poll_scan(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        if let Some((reserving, wanted)) = &mut self.reserving {
            let reserved = ready!(reserving.as_mut().poll(cx));
            let wanted = *wanted;
            self.reserving = None;
            reserved.map_err(|refusal| Status::resource_exhausted(refusal.to_string()))?;
            self.reserved(wanted);
        }
        let Some((data, mut at)) = self.scanning.take() else { return Poll::Ready(Ok(())) };
        while at < data.len() {
            match self.framing {
                Framing::Message(left) => {
                    let step = left.min(data.len() - at);
                    at += step;
                    self.framing = if step == left { Framing::Prefix(0) } else { Framing::Message(left - step) };
                }
                Framing::Prefix(have) => {
                    let step = (PREFIX - have).min(data.len() - at);
                    self.prefix[have..have + step].copy_from_slice(&data[at..at + step]);
                    at += step;
                    if have + step < PREFIX {
                        self.framing = Framing::Prefix(have + step);
                        continue;
                    }
                    let len = u32::from_be_bytes(self.prefix[1..].try_into().expect("4 bytes")) as usize;
                    self.framing = if len == 0 { Framing::Prefix(0) } else { Framing::Message(len) };
                    // Oversized messages are tonic's to refuse (from the
                    // prefix, with the API's status): nothing to reserve.
                    let wanted = if len > self.max_message_bytes { 0 } else { len };
                    let budget = Arc::clone(self.usage.budget().expect("a metered call has a budget"));
                    match budget.try_take(wanted) {
                        Ok(()) => self.reserved(wanted),
                        // The call has not started: refuse it.
                        Err(refusal) if self.messages == 0 => {
                            return Poll::Ready(Err(Status::resource_exhausted(refusal.to_string())));
                        }
                        // A streaming call under way: wait for room a while.
                        Err(_) => {
                            let left = self
                                .deadline
                                .as_ref()
                                .map(|d| d.deadline().into_std().saturating_duration_since(Instant::now()));
                            let patience = left.map_or(STREAM_RESERVE_PATIENCE, |l| l.min(STREAM_RESERVE_PATIENCE));
                            let reserving = Box::pin(async move { budget.take_within(wanted, patience).await });
                            self.reserving = Some((reserving, wanted));
                            self.scanning = Some((data, at));
                            return self.poll_scan(cx);
                        }
                    }
                }
            }
        }
        self.scanned.push_back(data);
        Poll::Ready(Ok(()))
    }

    fn reserved(&mut self, bytes: usize) {
        self.usage.add_input(bytes);
        self.messages += 1;
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(data) = this.scanned.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if this.ended && this.scanning.is_none() {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if let Err(status) = ready!(this.poll_progress(cx)) {
                return Poll::Ready(Some(Err(status)));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.scanning.is_none() && self.scanned.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A response body that gives charged output back once it has been handed
/// to the connection (see the module docs).
pub struct ResponseBody<B> {
    inner: B,
    usage: Usage,
    /// The rest of a data frame being passed on in slices, and its length.
    slicing: Option<(Bytes, usize)>,
}

impl<B> ResponseBody<B> {
    fn new(inner: B, usage: Usage) -> Self {
        Self { inner, usage, slicing: None }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some((rest, len)) = &mut this.slicing {
            if !rest.is_empty() {
                let slice = rest.split_to(rest.len().min(RESPONSE_SLICE));
                return Poll::Ready(Some(Ok(Frame::data(slice))));
            }
            // Polled again: hyper has taken the frame's last slice.
            let len = *len;
            this.slicing = None;
            this.usage.discharge_output(len);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    let len = data.remaining();
                    let slice = data.split_to(len.min(RESPONSE_SLICE));
                    this.slicing = Some((data, len));
                    Poll::Ready(Some(Ok(Frame::data(slice))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.slicing.as_ref().is_none_or(|(rest, _)| rest.is_empty()) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
