//! One client connection's life: what bounds a connection that does
//! nothing, and its part in the drain.
//!
//! - A connection that sends no byte within [`FIRST_BYTE_TIMEOUT`] (or the
//!   idle timeout, if shorter) is closed before HTTP/2 is even set up, so
//!   silent sockets cost a file descriptor for seconds, not for ever.
//! - A connection with no call in flight for `--connection-idle-timeout-secs`
//!   is closed gracefully (GOAWAY; gRPC clients reconnect on their next call).
//! - Dead peers are found by HTTP/2 keepalive pings (set in `server`).
//! - Over TLS, the handshake must end within [`HANDSHAKE_TIMEOUT`]; a
//!   failed one closes the connection (the client gets the TLS alert).
//! - On shutdown every connection is told to finish (GOAWAY) and given a
//!   moment to flush its last responses.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Notify,
};
use tokio_rustls::TlsAcceptor;

use crate::auth::PeerNames;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpConnectInfo;
use tower::Service;

/// How long a new connection may stay silent before it is closed.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection being closed gracefully may take to finish.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection ended with an error (HTTP/1.1 or HTTP/2), for the log.
pub type ConnectionError = Box<dyn std::error::Error + Send + Sync>;

/// How long a TLS handshake may take once the client's first byte came.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one accepted connection with `service` (over TLS when `tls` is
/// given) until the peer closes it, it has been idle for `idle_timeout`
/// (None: never), or `stop` fires.
pub async fn serve<S, B>(
    http: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    service: S,
    idle_timeout: Option<Duration>,
    stop: CancellationToken,
) -> Result<(), ConnectionError>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let first_byte = idle_timeout.map_or(FIRST_BYTE_TIMEOUT, |idle| idle.min(FIRST_BYTE_TIMEOUT));
    tokio::select! {
        readable = tokio::time::timeout(first_byte, stream.readable()) => match readable {
            Ok(Ok(())) => {}
            // Silent, or already broken: nothing was asked, nothing to answer.
            Ok(Err(_)) | Err(_) => return Ok(()),
        },
        () = stop.cancelled() => return Ok(()),
    }
    // Each request carries its connection's addresses (tonic's
    // `Request::remote_addr` reads them): the peer is a client's identity
    // when it names none.
    let addresses = TcpConnectInfo { local_addr: stream.local_addr().ok(), remote_addr: stream.peer_addr().ok() };
    let Some(tls) = tls else {
        return serve_io(http, stream, Peer { addresses, names: None }, service, idle_timeout, stop).await;
    };
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)) => handshake,
        () = stop.cancelled() => return Ok(()),
    };
    match handshake {
        Ok(Ok(stream)) => {
            // A client certificate, verified by the handshake, names the
            // client to the authentication layer.
            let names = stream.get_ref().1.peer_certificates().and_then(<[_]>::first).map(PeerNames::of);
            serve_io(http, stream, Peer { addresses, names }, service, idle_timeout, stop).await
        }
        // A client that does not speak TLS, distrusts our certificate, or
        // has no acceptable certificate of its own: rustls has already
        // told it with an alert; the log says who.
        Ok(Err(err)) => {
            tracing::info!(peer = ?addresses.remote_addr, error = %err, "TLS handshake failed");
            Ok(())
        }
        Err(_) => {
            tracing::info!(peer = ?addresses.remote_addr, "TLS handshake timed out");
            Ok(())
        }
    }
}

/// Serves HTTP/2 on an established (plain or TLS) connection.
async fn serve_io<I, S, B>(
    http: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    io: I,
    peer: Peer,
    service: S,
    idle_timeout: Option<Duration>,
    stop: CancellationToken,
) -> Result<(), ConnectionError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::default());
    let tracked = Tracked { inner: service, activity: Arc::clone(&activity), peer };
    let connection = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(tracked));
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => return served,
        () = activity.idle_for(idle_timeout) => tracing::debug!("closing an idle connection"),
        () = stop.cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    // A graceful close waits for the peer to acknowledge a PING; a peer that
    // never answers is dropped.
    tokio::time::timeout(CLOSE_TIMEOUT, connection).await.unwrap_or(Ok(()))
}

/// Calls in flight on one connection.
#[derive(Debug, Default)]
struct Activity {
    calls: AtomicUsize,
    changed: Notify,
}

impl Activity {
    /// Resolves once no call has been in flight for `timeout`; never when
    /// `timeout` is None.
    async fn idle_for(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else { return std::future::pending().await };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before reading the count, so no change is missed.
            changed.as_mut().enable();
            if self.calls.load(Ordering::Acquire) == 0 {
                if tokio::time::timeout(timeout, changed).await.is_err() {
                    return;
                }
            } else {
                changed.await;
            }
        }
    }

    fn started(&self) {
        self.calls.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    fn ended(&self) {
        self.calls.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }
}

/// What a connection's requests carry of their peer.
#[derive(Debug, Clone)]
struct Peer {
    addresses: TcpConnectInfo,
    /// The names of its client certificate, over mutual TLS.
    names: Option<PeerNames>,
}

/// The connection's service: counts each call from its start until its
/// response body is done with.
#[derive(Debug, Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    peer: Peer,
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: 'static,
{
    type Response = Response<Counted<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.peer.addresses.clone());
        if let Some(names) = &self.peer.names {
            request.extensions_mut().insert(names.clone());
        }
        let guard = CallGuard::new(Arc::clone(&self.activity));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Counted { inner: body, _guard: guard }))
        })
    }
}

/// Counts one call on its connection while it lives.
#[derive(Debug)]
struct CallGuard(Arc<Activity>);

impl CallGuard {
    fn new(activity: Arc<Activity>) -> Self {
        activity.started();
        Self(activity)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.ended();
    }
}

/// A response body that keeps its call counted until it is dropped.
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    _guard: CallGuard,
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
