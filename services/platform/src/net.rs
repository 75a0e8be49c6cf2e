//! Listening sockets and the HTTP server. Every server Parley runs answers in several writes (HTTP
//! headers then body, gRPC headers, data and trailers); with Nagle's algorithm on, a small last write
//! waits for the peer's delayed ACK, about 40 ms on Linux. Every accepted connection therefore has
//! `TCP_NODELAY` set.
//!
//! Parley's HTTP servers speak HTTP/1.1 only, through hyper's HTTP/1 connection directly rather than
//! `axum::serve`: that one first reads the 24 bytes of an HTTP/2 preface to choose a protocol and hands
//! them back to the HTTP/1 parser as a read of their own, so every request head arrived in two reads
//! and grew hyper's read buffer from 8 to 16 KB, kept for the connection's life. At 10,000 open event
//! streams that was 80 MB of a gateway's memory. HTTP/2 to the gateway ends at the ingress or load
//! balancer, which speaks HTTP/1.1 to it (`docs/architecture.md`, "HTTP server").

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How long a client may take to send a request head before its connection is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait before accepting again after an error that is not about one connection (out of
/// file descriptors, say): retrying at once would spin.
const ACCEPT_RETRY: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `shutdown` completes, then lets every open connection finish
/// its requests (graceful shutdown) and returns once they have. Each request carries
/// `ConnectInfo<SocketAddr>` with the client's address; WebSocket upgrades work.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, address) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    tracing::error!(%error, "accepting a connection failed; retrying in a second");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on an accepted connection");
        }
        let service = router.clone().map_request(move |mut request: axum::http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(address));
            request.map(axum::body::Body::new)
        });
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            let mut closing = false;
            loop {
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(error) = served {
                            tracing::trace!(%error, "a connection ended with an error");
                        }
                        break;
                    }
                    // Finish the request in flight and take no other (a sender gone means the same).
                    _ = stopped.changed(), if !closing => {
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors that concern the one connection being accepted, not the listener.
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// `listener` for tonic, with `TCP_NODELAY` on every accepted connection.
pub fn grpc_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn request(address: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn requests_know_their_client_and_shutdown_lets_them_finish() {
        let (started, release) =
            (std::sync::Arc::new(tokio::sync::Notify::new()), std::sync::Arc::new(tokio::sync::Notify::new()));
        let (on_start, on_release) = (started.clone(), release.clone());
        let router = Router::new()
            .route("/peer", get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }))
            .route(
                "/slow",
                get(move || async move {
                    on_start.notify_one();
                    on_release.notified().await;
                    "finished"
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(serve_http(listener, router, stop.clone().cancelled_owned()));

        assert!(request(address, "/peer").await.ends_with("127.0.0.1"));
        let slow = tokio::spawn(request(address, "/slow"));
        started.notified().await;
        stop.cancel();
        release.notify_one();
        assert!(slow.await.unwrap().ends_with("finished"), "the request in flight finishes");
        server.await.unwrap().unwrap();
        assert!(tokio::net::TcpStream::connect(address).await.is_err(), "nothing listens any more");
    }
}
