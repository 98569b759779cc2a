//! The web console (`--console-listen`): the page and its script, embedded
//! in the binary (built from `console/` by its bundler, the built files
//! committed, so a fresh clone serves it without npm), plus what the page
//! needs to call the gRPC port through gRPC-Web: where it is, and the
//! descriptors of its messages. The page's calls go to the gRPC port like
//! any client's, through its CORS, authentication and checks.

use std::{net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The built files, by path.
const FILES: &[(&str, &str, &[u8])] = &[
    ("/index.html", "text/html; charset=utf-8", include_bytes!("../../console/dist/index.html")),
    ("/app.js", "text/javascript; charset=utf-8", include_bytes!("../../console/dist/app.js")),
    ("/app.css", "text/css; charset=utf-8", include_bytes!("../../console/dist/app.css")),
];

/// What the page is told of the gRPC port.
#[derive(Debug, Clone)]
pub struct Console {
    /// The gRPC port's number.
    pub grpc_port: u16,
    /// `https` when the gRPC port speaks TLS, else `http`.
    pub grpc_scheme: &'static str,
}

impl Console {
    /// The origins the page is served from (for the gRPC port's CORS):
    /// `addr` itself, and localhost's names when it is loopback or any
    /// address.
    pub fn origins(addr: SocketAddr) -> Vec<String> {
        let port = addr.port();
        let mut hosts = vec![match addr {
            SocketAddr::V4(v4) => v4.ip().to_string(),
            SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
        }];
        if addr.ip().is_loopback() || addr.ip().is_unspecified() {
            hosts.extend(["127.0.0.1".into(), "localhost".into(), "[::1]".into()]);
        }
        hosts.sort();
        hosts.dedup();
        hosts.iter().flat_map(|host| ["http", "https"].map(|scheme| format!("{scheme}://{host}:{port}"))).collect()
    }

    /// The answer to a GET of `path`, if it is one of the console's.
    pub fn respond(&self, path: &str) -> Option<Response<Full<bytes::Bytes>>> {
        let (kind, body) = match path {
            "/config.json" => (
                "application/json",
                bytes::Bytes::from(format!(r#"{{"grpcPort":{},"grpcScheme":"{}"}}"#, self.grpc_port, self.grpc_scheme)),
            ),
            "/descriptors.bin" => {
                ("application/octet-stream", bytes::Bytes::from_static(offload_proto::FILE_DESCRIPTOR_SET))
            }
            // The page is at / as well as under its name.
            _ => FILES
                .iter()
                .find(|(file, ..)| *file == if path == "/" { "/index.html" } else { path })
                .map(|(_, kind, body)| (*kind, bytes::Bytes::from_static(body)))?,
        };
        let response = Response::builder()
            .header("content-type", kind)
            .header("cache-control", "no-cache")
            .header("x-content-type-options", "nosniff")
            .header("referrer-policy", "no-referrer")
            // Its own files only; calls may go to the gRPC port (another
            // origin) and images of outputs come from blob: URLs.
            .header(
                "content-security-policy",
                "default-src 'self'; img-src 'self' blob: data:; connect-src 'self' http: https:; \
                 frame-ancestors 'none'",
            )
            .body(Full::new(body))
            .expect("valid response");
        Some(response)
    }
}

/// Serves the console on `listener` until `stop`.
pub async fn serve(listener: TcpListener, console: Arc<Console>, stop: CancellationToken) {
    let respond = move |request: Request<Incoming>| {
        let answer = console.respond(request.uri().path()).unwrap_or_else(not_found);
        async move { answer }
    };
    crate::plain_http::serve(listener, "console", stop, respond).await;
}

/// The answer to any other path.
pub fn not_found() -> Response<Full<bytes::Bytes>> {
    Response::builder()
        .status(404)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(bytes::Bytes::from_static(b"not found: the console is at /\n")))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_its_script_and_the_grpc_port_are_served_and_nothing_else() {
        let console = Console { grpc_port: 50051, grpc_scheme: "http" };
        let page = console.respond("/").expect("the page");
        assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
        assert!(console.respond("/app.js").is_some() && console.respond("/app.css").is_some());
        assert!(console.respond("/descriptors.bin").is_some());
        assert!(console.respond("/../Cargo.toml").is_none() && console.respond("/metrics").is_none());
        let origins = Console::origins("127.0.0.1:8080".parse().unwrap());
        assert!(origins.contains(&"http://localhost:8080".to_string()), "{origins:?}");
        assert!(origins.contains(&"http://127.0.0.1:8080".to_string()), "{origins:?}");
        let origins = Console::origins("10.0.0.5:80".parse().unwrap());
        assert_eq!(origins, ["http://10.0.0.5:80", "https://10.0.0.5:80"]);
    }
}
