//! Authentication of calls when the config declares clients with
//! credentials (see [`crate::clients`]): a bearer token in the
//! `authorization` metadata, or the names of a verified client certificate
//! (mutual TLS). A tower layer in front of the gRPC services refuses calls
//! without a valid credential (UNAUTHENTICATED) and hands the client to the
//! handlers; health checks stay open for probes.
//!
//! Tokens are hashed (SHA-256) and compared in constant time with the
//! declared hashes; neither a token nor its hash is ever logged.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};

use http::{Request, Response};
use rustls_pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::{clients::Client, dispatch::Dispatcher, error::CallError};

/// The gRPC path prefix left open to everyone (load balancers' and
/// orchestrators' probes carry no credentials).
const OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

/// The DNS and URI names of a connection's verified client certificate,
/// carried by each of its requests.
#[derive(Debug, Clone)]
pub struct PeerNames(pub Arc<[String]>);

impl PeerNames {
    /// The names of `cert` (already verified by the TLS handshake).
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        let names = match webpki::EndEntityCert::try_from(cert) {
            Ok(parsed) => parsed.valid_dns_names().chain(parsed.valid_uri_names()).map(str::to_string).collect(),
            Err(_) => Vec::new(),
        };
        Self(names.into())
    }
}

/// The client a call authenticated as, set by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Authenticated(pub Arc<Client>);

/// The client `request` authenticates as with the declared `clients`.
fn authenticate<B>(dispatcher: &Dispatcher, request: &Request<B>) -> Result<Arc<Client>, CallError> {
    let clients = dispatcher.clients();
    if let Some(value) = request.headers().get(http::header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or_else(|| CallError::Unauthenticated("the authorization metadata is not `Bearer <token>`".into()))?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        return clients
            .by_token_hash(&hash)
            .cloned()
            .ok_or_else(|| CallError::Unauthenticated("the bearer token is not one of a declared client".into()));
    }
    match request.extensions().get::<PeerNames>() {
        Some(PeerNames(names)) if clients.by_certificate() => {
            clients.by_certificate_name(names).cloned().ok_or_else(|| {
                CallError::Unauthenticated(format!(
                    "the client certificate's names ({}) match no declared client's cert_san",
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                ))
            })
        }
        _ => Err(CallError::Unauthenticated(if clients.by_certificate() {
            "this server requires credentials: `authorization: Bearer <token>` metadata or a client certificate".into()
        } else {
            "this server requires credentials: `authorization: Bearer <token>` metadata".into()
        })),
    }
}

/// Authenticates every call but health checks, when clients are declared
/// with credentials.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    dispatcher: Arc<Dispatcher>,
}

impl AuthLayer {
    /// Authenticates against `dispatcher`'s clients.
    pub fn new(dispatcher: Arc<Dispatcher>) -> Self {
        Self { dispatcher }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, dispatcher: Arc::clone(&self.dispatcher) }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    dispatcher: Arc<Dispatcher>,
}

impl<S, B> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    // No allocation on the way through (the common case).
    type Future = Either<S::Future, Ready<Result<Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if self.dispatcher.clients().authenticating() && !request.uri().path().starts_with(OPEN_PREFIX) {
            match authenticate(&self.dispatcher, &request) {
                Ok(client) => {
                    request.extensions_mut().insert(Authenticated(client));
                }
                Err(err) => {
                    tracing::info!(path = request.uri().path(), error = %err, "call refused: not authenticated");
                    self.dispatcher.metrics().refused("unknown", "unknown", err.code(), err.rejection());
                    return Either::Right(ready(Ok(tonic::Status::from(err).into_http())));
                }
            }
        }
        Either::Left(self.inner.call(request))
    }
}
