//! gRPC calls spread over every replica of a service, following replicas as they come and go.
//!
//! One HTTP/2 connection to a Kubernetes Service's virtual IP pins every call of a client to the one
//! replica that connection landed on: replicas the autoscaler adds get none of the calls of the clients
//! already running. So a Parley client resolves the service's name itself (a headless Service answers
//! with one address per ready pod), keeps one lazily opened connection per address, hands calls to them
//! in turn, and resolves the name again every few seconds: a new address is used from the next call, a
//! vanished one is dropped (its calls in flight finish). An address whose connection just failed is
//! passed over for a few seconds while another answers. A target given as an IP address is one replica
//! and is never resolved; a comma-separated list of targets (`http://10.0.0.5:50051,http://10.0.0.6:50051`,
//! for hosts without cluster DNS) is every replica they name together. Each replica's calls share one
//! HTTP/2 connection ([`crate::replica_connection`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use crate::replica_connection::ReplicaConnection;

/// How often a name is resolved again.
const REFRESH: Duration = Duration::from_secs(5);
/// How long a call waits for a name's first addresses before it fails `unavailable`.
const FIRST_ADDRESSES_WAIT: Duration = Duration::from_secs(2);
/// How long an address whose connection failed is passed over.
const PASS_OVER: Duration = Duration::from_secs(3);

/// A gRPC target that cannot be called.
#[derive(Debug, thiserror::Error)]
#[error("invalid gRPC target {target}: {reason}")]
pub struct InvalidTarget {
    target: String,
    reason: String,
}

/// A client channel over every address of one gRPC target (`http://name:port`). Cheap to clone; the
/// clones share the replicas.
#[derive(Clone)]
pub struct Balanced {
    shared: Arc<Shared>,
}

struct Shared {
    /// The target as configured, for messages.
    target: String,
    /// Each target's host (a name or an IP address) and port.
    hosts: Vec<(String, u16)>,
    replicas: tokio::sync::watch::Sender<Arc<[Arc<Replica>]>>,
    next: AtomicUsize,
    /// Whether the name is being resolved (started by the first call, which runs inside the runtime).
    resolving: AtomicBool,
    epoch: Instant,
}

struct Replica {
    addr: SocketAddr,
    connection: ReplicaConnection,
    /// Milliseconds after the epoch until which this replica is passed over; 0 when it is not.
    passed_over_until: AtomicU64,
}

impl Balanced {
    /// A channel to every replica behind `url` (one target, or several separated by commas), each an
    /// `http://host:port` URL: Parley's services speak gRPC over plain HTTP/2 to one another. Nothing
    /// connects or resolves until the first call.
    pub fn new(url: &str) -> Result<Self, InvalidTarget> {
        let mut hosts = Vec::new();
        for target in url.split(',').map(str::trim) {
            let invalid = |reason: &str| InvalidTarget { target: target.to_owned(), reason: reason.to_owned() };
            let uri: http::Uri = target.parse().map_err(|error: http::uri::InvalidUri| invalid(&error.to_string()))?;
            if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
                return Err(invalid("the URL must start with http:// (gRPC between services is plain HTTP/2)"));
            }
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
            if host.is_empty() {
                return Err(invalid("the URL names no host"));
            }
            hosts.push((host, uri.port_u16().unwrap_or(80)));
        }
        let (replicas, _) = tokio::sync::watch::channel::<Arc<[Arc<Replica>]>>(Arc::from(Vec::new()));
        let shared = Arc::new(Shared {
            target: url.to_owned(),
            hosts,
            replicas,
            next: AtomicUsize::new(0),
            resolving: AtomicBool::new(false),
            epoch: Instant::now(),
        });
        let addresses: Option<Vec<SocketAddr>> = shared
            .hosts
            .iter()
            .map(|(host, port)| host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, *port)))
            .collect();
        if let Some(addresses) = addresses {
            // Addresses only: nothing to resolve, ever.
            shared.resolving.store(true, Ordering::Relaxed);
            shared.update(addresses);
        }
        Ok(Self { shared })
    }

    /// The addresses calls currently go to.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.shared.replicas.borrow().iter().map(|replica| replica.addr).collect()
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// Takes a resolution's addresses: keeps the connections of the addresses still there, adds the new.
    fn update(&self, mut addresses: Vec<SocketAddr>) {
        addresses.sort();
        addresses.dedup();
        let current = self.replicas.borrow().clone();
        if current.iter().map(|replica| replica.addr).eq(addresses.iter().copied()) {
            return;
        }
        let mut replicas = Vec::with_capacity(addresses.len());
        for addr in addresses {
            match current.iter().find(|replica| replica.addr == addr) {
                Some(kept) => replicas.push(kept.clone()),
                None => match ReplicaConnection::new(addr) {
                    Ok(connection) => {
                        replicas.push(Arc::new(Replica { addr, connection, passed_over_until: AtomicU64::new(0) }));
                    }
                    Err(error) => tracing::warn!(target = %self.target, %addr, %error, "cannot address a replica"),
                },
            }
        }
        let addresses: Vec<String> = replicas.iter().map(|replica| replica.addr.to_string()).collect();
        tracing::info!(target = %self.target, ?addresses, "gRPC replicas changed");
        self.replicas.send_replace(replicas.into());
    }

    /// The next replica in turn, passing over those whose connection just failed unless all did.
    fn pick(&self) -> Option<Arc<Replica>> {
        let replicas = self.replicas.borrow().clone();
        if replicas.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let count = replicas.len();
        (0..count)
            .map(|offset| &replicas[(start + offset) % count])
            .find(|replica| replica.passed_over_until.load(Ordering::Relaxed) <= now)
            .or_else(|| replicas.get(start % count))
            .cloned()
    }

    /// Resolves the name now and then every [`REFRESH`] until the last clone is dropped.
    fn start_resolving(self: &Arc<Self>) {
        // A plain load first: every call passes here, and only the first needs the read-modify-write.
        if self.resolving.load(Ordering::Relaxed) || self.resolving.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(resolve(weak));
    }
}

/// Every address the targets name: IP addresses as they are, names resolved.
async fn lookup(hosts: &[(String, u16)]) -> std::io::Result<Vec<SocketAddr>> {
    let mut addresses = Vec::new();
    for (host, port) in hosts {
        match host.parse::<IpAddr>() {
            Ok(ip) => addresses.push(SocketAddr::new(ip, *port)),
            Err(_) => addresses.extend(tokio::net::lookup_host((host.as_str(), *port)).await?),
        }
    }
    Ok(addresses)
}

async fn resolve(weak: Weak<Shared>) {
    let mut warned = false;
    loop {
        let Some(shared) = weak.upgrade() else { return };
        match lookup(&shared.hosts).await {
            Ok(addresses) => {
                if addresses.is_empty() {
                    tracing::warn!(target = %shared.target, "the name resolved to no address; keeping the last");
                } else {
                    shared.update(addresses);
                }
                warned = false;
            }
            // Keep calling the addresses already known: a DNS blip must not empty the set.
            Err(error) if !warned => {
                tracing::warn!(target = %shared.target, %error, "cannot resolve the name; keeping the last addresses");
                warned = true;
            }
            Err(_) => {}
        }
        drop(shared);
        tokio::time::sleep(REFRESH).await;
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Balanced {
    type Response = http::Response<tonic::body::Body>;
    type Error = tower::BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let shared = self.shared.clone();
        shared.start_resolving();
        Box::pin(async move {
            let replica = match shared.pick() {
                Some(replica) => replica,
                None => {
                    let mut replicas = shared.replicas.subscribe();
                    let found = tokio::time::timeout(FIRST_ADDRESSES_WAIT, replicas.wait_for(|set| !set.is_empty()));
                    if !matches!(found.await, Ok(Ok(_))) {
                        let message = format!("no address for {} yet", shared.target);
                        return Err(tonic::Status::unavailable(message).into());
                    }
                    shared.pick().ok_or_else(|| tonic::Status::unavailable("no replica"))?
                }
            };
            let response = replica.connection.call(request).await;
            if response.is_err() {
                let until = shared.now_ms() + u64::try_from(PASS_OVER.as_millis()).unwrap_or(u64::MAX);
                replica.passed_over_until.store(until, Ordering::Relaxed);
            }
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ip_target_is_one_replica_without_resolving() {
        let balanced = Balanced::new("http://127.0.0.1:50051").unwrap();
        assert_eq!(balanced.addresses(), ["127.0.0.1:50051".parse::<SocketAddr>().unwrap()]);
        let v6 = Balanced::new("http://[::1]:7000").unwrap();
        assert_eq!(v6.addresses(), ["[::1]:7000".parse::<SocketAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn replicas_are_taken_in_turn_and_one_that_failed_is_passed_over() {
        let balanced = Balanced::new("http://parley-chat:50051").unwrap();
        let shared = &balanced.shared;
        let a: SocketAddr = "10.0.0.1:50051".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:50051".parse().unwrap();
        shared.update(vec![b, a]);
        let picks: Vec<SocketAddr> = (0..4).map(|_| shared.pick().unwrap().addr).collect();
        assert_eq!(picks, [a, b, a, b]);
        // A resolution that keeps `a` keeps its connection; `b` goes, `c` comes.
        let kept = shared.pick().unwrap();
        let c: SocketAddr = "10.0.0.3:50051".parse().unwrap();
        shared.update(vec![a, c]);
        let now = shared.replicas.borrow().clone();
        assert!(Arc::ptr_eq(&now[0], &kept) || Arc::ptr_eq(&now[1], &kept));
        assert_eq!(balanced.addresses(), [a, c]);
        // `a` failed a moment ago: every call goes to `c` until `a`'s pass is over.
        now[0].passed_over_until.store(shared.now_ms() + 60_000, Ordering::Relaxed);
        assert!((0..4).all(|_| shared.pick().unwrap().addr == c));
        // With every replica passed over, calls still go somewhere.
        now[1].passed_over_until.store(shared.now_ms() + 60_000, Ordering::Relaxed);
        assert!(shared.pick().is_some());
    }

    #[tokio::test]
    async fn a_list_of_addresses_is_every_replica_it_names() {
        let balanced = Balanced::new("http://127.0.0.2:7000, http://127.0.0.1:7000").unwrap();
        let expected: Vec<SocketAddr> = vec!["127.0.0.1:7000".parse().unwrap(), "127.0.0.2:7000".parse().unwrap()];
        assert_eq!(balanced.addresses(), expected);
        assert!(Balanced::new("http://127.0.0.1:7000,not a url").is_err());
        assert!(Balanced::new("https://127.0.0.1:7000").is_err(), "no TLS between services");
        assert!(Balanced::new("127.0.0.1:7000").is_err(), "a scheme is required");
    }

    #[tokio::test]
    async fn a_name_is_resolved_on_first_use() {
        let balanced = Balanced::new("http://localhost:50051").unwrap();
        assert!(balanced.addresses().is_empty(), "nothing resolves before the first call");
        balanced.shared.start_resolving();
        let mut replicas = balanced.shared.replicas.subscribe();
        tokio::time::timeout(Duration::from_secs(5), replicas.wait_for(|set| !set.is_empty())).await.unwrap().unwrap();
        assert!(balanced.addresses().iter().all(|addr| addr.ip().is_loopback() && addr.port() == 50051));
    }

    #[tokio::test]
    async fn a_call_to_a_name_with_no_address_fails_unavailable() {
        let mut balanced = Balanced::new("http://parley-nowhere.invalid:50051").unwrap();
        let request = http::Request::new(tonic::body::Body::empty());
        let error = tower::Service::call(&mut balanced, request).await.unwrap_err();
        let status = error.downcast::<tonic::Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
}
