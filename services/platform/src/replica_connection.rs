//! One replica's HTTP/2 connection, which every call to that replica shares.
//!
//! A call goes from its own task straight to hyper's HTTP/2 sender, which hands it to the task that
//! drives the connection. tonic's `Channel` puts a worker task of its own in front of that (its
//! `tower::buffer`) and a stack of boxed services behind it: for the gateway's one call to the agent per
//! completion, that was one more queue, one more task to wake and several more allocations, on the path
//! every request takes. What the `Channel` did besides is done here: the connection opens on the first
//! call (services start in any order) and again on the first call after it closed, with a connect
//! timeout, TCP_NODELAY, HTTP/2 keep-alive pings, and a limit on how long a call waits for its response
//! to begin.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tonic::body::Body;

/// How long opening a connection may take before the call fails `unavailable`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call waits for its response to begin (a stream's messages may then take longer).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an HTTP/2 ping checks a connection, idle or not; one that goes unanswered closes it.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// The HTTP/2 connection to one replica, opened when a call first needs it.
pub struct ReplicaConnection {
    addr: SocketAddr,
    authority: Authority,
    /// The connection's sender while it is open; a clone sends on the same connection.
    sender: Mutex<Option<SendRequest<Body>>>,
    /// Held while a connection is being opened, so that calls arriving meanwhile wait for that one.
    opening: tokio::sync::Mutex<()>,
    /// The last attempt to open the connection that failed: when it gave up, and why.
    failed: Mutex<Option<(Instant, tonic::Code, String)>>,
}

impl ReplicaConnection {
    /// A connection to `addr`, not yet open.
    pub fn new(addr: SocketAddr) -> Result<Self, http::uri::InvalidUri> {
        let authority = Authority::try_from(addr.to_string())?;
        let (sender, opening, failed) = (Mutex::new(None), tokio::sync::Mutex::new(()), Mutex::new(None));
        Ok(Self { addr, authority, sender, opening, failed })
    }

    /// Sends `request` (a path-only URI, as tonic's generated clients make) and returns its response
    /// once it begins.
    pub async fn call(&self, request: http::Request<Body>) -> Result<http::Response<Body>, tower::BoxError> {
        let mut sender = self.sender().await?;
        let request = self.addressed(request)?;
        let response = tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(request)).await.map_err(|_| {
            tonic::Status::cancelled(format!("{} did not answer within {RESPONSE_TIMEOUT:?}", self.addr))
        })??;
        Ok(response.map(Body::new))
    }

    /// The open connection's sender, opening the connection first if there is none. Calls that arrive
    /// while an attempt is under way wait for it and share its outcome: when it fails, they fail with it
    /// rather than each trying again in turn (which, with a replica that does not answer, would make the
    /// last of them wait a connect timeout for every call before it).
    async fn sender(&self) -> Result<SendRequest<Body>, tonic::Status> {
        if let Some(sender) = self.open_sender() {
            return Ok(sender);
        }
        let asked = Instant::now();
        let _opening = self.opening.lock().await;
        // Another call may have opened it while this one waited, or failed to.
        if let Some(sender) = self.open_sender() {
            return Ok(sender);
        }
        // An attempt failed while this call waited for it: its answer is this call's too.
        if let Some((_, code, message)) = lock(&self.failed).as_ref().filter(|(gave_up, ..)| *gave_up >= asked) {
            return Err(tonic::Status::new(*code, message.clone()));
        }
        match self.open().await {
            Ok(sender) => {
                *lock(&self.sender) = Some(sender.clone());
                Ok(sender)
            }
            Err(status) => {
                *lock(&self.failed) = Some((Instant::now(), status.code(), status.message().to_owned()));
                Err(status)
            }
        }
    }

    fn open_sender(&self) -> Option<SendRequest<Body>> {
        lock(&self.sender).as_ref().filter(|sender| !sender.is_closed()).cloned()
    }

    async fn open(&self) -> Result<SendRequest<Body>, tonic::Status> {
        let unavailable = |error: &dyn std::fmt::Display| tonic::Status::unavailable(format!("{}: {error}", self.addr));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(self.addr))
            .await
            .map_err(|_| unavailable(&format_args!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(|error| unavailable(&error))?;
        stream.set_nodelay(true).map_err(|error| unavailable(&error))?;
        let (sender, connection) = Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| unavailable(&error))?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%addr, %error, "gRPC connection closed");
            }
        });
        Ok(sender)
    }

    /// `request` with this replica's scheme and authority in its URI, as HTTP/2 needs them.
    fn addressed(&self, request: http::Request<Body>) -> Result<http::Request<Body>, tonic::Status> {
        let (mut head, body) = request.into_parts();
        let mut uri = head.uri.into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        head.uri = http::Uri::from_parts(uri).map_err(|error| tonic::Status::internal(error.to_string()))?;
        Ok(http::Request::from_parts(head, body))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use futures::StreamExt;
    use tokio_util::sync::CancellationToken;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    use super::CONNECT_TIMEOUT;
    use crate::balance::Balanced;

    /// A real gRPC server (health only) on `addr`, counting the connections it accepts.
    async fn health_server(addr: SocketAddr, stop: CancellationToken) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let incoming = crate::net::grpc_incoming(listener).inspect(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
                .unwrap();
        });
        (addr, accepted)
    }

    async fn check(client: &mut HealthClient<Balanced>) -> Result<(), tonic::Status> {
        client.check(HealthCheckRequest { service: String::new() }).await.map(drop)
    }

    #[tokio::test]
    async fn calls_share_one_connection_and_the_next_call_after_it_closed_opens_another() {
        let stop = CancellationToken::new();
        let (addr, accepted) = health_server("127.0.0.1:0".parse().unwrap(), stop.clone()).await;
        let mut client = HealthClient::new(Balanced::new(&format!("http://{addr}")).unwrap());
        let concurrent: Vec<_> = (0..8)
            .map(|_| {
                let mut client = client.clone();
                async move { check(&mut client).await }
            })
            .collect();
        for outcome in futures::future::join_all(concurrent).await {
            outcome.unwrap();
        }
        check(&mut client).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "every call, concurrent or not, on one connection");

        // The replica goes away: once its connection is seen closed, a call fails `unavailable`.
        stop.cancel();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
        loop {
            tick.tick().await;
            match check(&mut client).await {
                Err(status) if status.code() == tonic::Code::Unavailable => break,
                outcome => assert!(tokio::time::Instant::now() < deadline, "still {outcome:?}"),
            }
        }

        // It comes back on the same address: the next call opens a new connection and succeeds.
        let (again, accepted) = health_server(addr, CancellationToken::new()).await;
        assert_eq!(again, addr);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Err(status) = check(&mut client).await {
            assert!(tokio::time::Instant::now() < deadline, "{status:?}");
            tick.tick().await;
        }
        check(&mut client).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// Calls that queue behind an attempt to reach a replica that does not answer fail with that
    /// attempt, within one connect timeout, instead of each trying in turn.
    #[tokio::test]
    async fn calls_waiting_on_a_replica_that_does_not_answer_fail_together() {
        // A listener that never accepts, its queue full: a new connection's SYN goes unanswered.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await
            {
                queued.push(stream);
            }
        }
        let client = HealthClient::new(Balanced::new(&format!("http://{addr}")).unwrap());
        let started = tokio::time::Instant::now();
        let calls = (0..4).map(|_| {
            let mut client = client.clone();
            async move { check(&mut client).await }
        });
        for outcome in futures::future::join_all(calls).await {
            assert_eq!(outcome.unwrap_err().code(), tonic::Code::Unavailable);
        }
        // One connect timeout for all of them (trying in turn: four).
        assert!(started.elapsed() < 2 * CONNECT_TIMEOUT, "{:?}", started.elapsed());
        drop(queued);
    }

    #[tokio::test]
    async fn a_call_to_an_address_nobody_listens_on_fails_unavailable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let mut client = HealthClient::new(Balanced::new(&format!("http://{addr}")).unwrap());
        let status = check(&mut client).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains(&addr.to_string()), "{status:?}");
    }
}
