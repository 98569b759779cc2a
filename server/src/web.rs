//! gRPC-Web for browsers: requests whose content type is
//! `application/grpc-web[-text][+proto]` go through tonic-web's
//! translation; plain gRPC goes straight to the services, so the common
//! path pays nothing for it (tonic-web alone boxes every request body).

use std::task::{Context, Poll};

use futures::future::Either;
use http::{Request, Response, header::CONTENT_TYPE};
use tonic::body::Body;
use tower::{Layer, Service};

/// Routes gRPC-Web requests through tonic-web's translation.
#[derive(Debug, Clone, Copy)]
pub struct GrpcWebLayer;

impl<S: Clone> Layer<S> for GrpcWebLayer {
    type Service = GrpcWeb<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcWeb { web: tonic_web::GrpcWebLayer::new().layer(inner.clone()), inner }
    }
}

/// The service [`GrpcWebLayer`] makes.
#[derive(Debug, Clone)]
pub struct GrpcWeb<S> {
    inner: S,
    web: tonic_web::GrpcWebService<S>,
}

/// Whether `request` is gRPC-Web (by its content type).
fn is_grpc_web<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc-web"))
}

impl<S, B> Service<Request<B>> for GrpcWeb<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Service<Request<Body>, Response = Response<Body>> + Clone,
    <S as Service<Request<B>>>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    <S as Service<Request<Body>>>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + std::fmt::Display,
    tonic_web::GrpcWebService<S>:
        Service<Request<B>, Response = Response<Body>, Error = <S as Service<Request<B>>>::Error>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
{
    type Response = Response<Body>;
    type Error = <S as Service<Request<B>>>::Error;
    type Future =
        Either<<S as Service<Request<B>>>::Future, <tonic_web::GrpcWebService<S> as Service<Request<B>>>::Future>;

    // The routes are always ready, the clone inside `web` as much as
    // `inner`: readiness is asked of `inner` for both.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request<B>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if is_grpc_web(&request) {
            Either::Right(self.web.call(request))
        } else {
            Either::Left(Service::<Request<B>>::call(&mut self.inner, request))
        }
    }
}
