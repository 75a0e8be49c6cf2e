//! Redis connections with bounded waits: a command against an unreachable or stalled Redis fails
//! within a fraction of a second, so every degraded mode (in-memory limits, ledger budgets, the local
//! cache) takes over promptly instead of requests hanging.

use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);

/// A connection manager that reconnects by itself, with short connection and response timeouts.
pub async fn connect(url: &str) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(1);
    client.get_connection_manager_with_config(config).await
}
