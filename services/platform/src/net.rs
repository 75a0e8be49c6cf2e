//! Listening sockets. Every server Parley runs answers in several writes (HTTP headers then body, gRPC
//! headers, data and trailers); with Nagle's algorithm on, a small last write waits for the peer's
//! delayed ACK, about 40 ms on Linux. Every accepted connection therefore has `TCP_NODELAY` set.

use axum::serve::{ListenerExt, TapIo};
use tokio::net::{TcpListener, TcpStream};

/// `listener` for `axum::serve`, with `TCP_NODELAY` on every accepted connection. (A named type rather
/// than `impl Listener`, so `ConnectInfo<SocketAddr>` still works on it.)
pub fn without_nagle(listener: TcpListener) -> TapIo<TcpListener, fn(&mut TcpStream)> {
    listener.tap_io(set_nodelay as fn(&mut TcpStream))
}

fn set_nodelay(stream: &mut TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY on an accepted connection");
    }
}

/// `listener` for tonic, with `TCP_NODELAY` on every accepted connection.
pub fn grpc_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
