//! The small HTTP/1.1 endpoints beside the gRPC port (the metrics, the
//! console): one accept loop for both, until their stop token fires.

use std::{convert::Infallible, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A response of these endpoints.
pub type Answer = Response<Full<bytes::Bytes>>;

/// Serves `respond`'s answers on `listener` (named `what` in the log)
/// until `stop` fires.
pub async fn serve<F, Fut>(listener: TcpListener, what: &'static str, stop: CancellationToken, respond: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send + 'static,
{
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let respond = respond.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let answer = respond(request);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            if let Err(err) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                tracing::debug!(error = %err, "{what} connection ended with an error");
            }
        });
    }
}
