//! What every Parley service shares: configuration, the error-code type, telemetry, database, Redis
//! and NATS connections, gRPC plumbing, health checks and shutdown.
//!
//! This crate holds no business logic and owns no schema: it must never read or write a service's
//! tables, and no service-specific type belongs here except the wire events that several services
//! exchange over NATS ([`events`]).

pub mod access_token;
pub mod backoff;
pub mod balance;
pub mod config;
pub mod cursor;
pub mod db;
pub mod envelope;
pub mod error;
pub mod events;
pub mod finish;
pub mod grpc;
pub mod health;
pub mod json_int;
pub mod json_log;
pub mod limits;
pub mod message_status;
pub mod metrics;
pub mod nats;
pub mod net;
pub mod prompt;
pub mod redis_pool;
pub mod replica_connection;
pub mod replicas;
pub mod sampling;
pub mod shutdown;
pub mod sse;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod test_database;
pub mod timestamps;
pub mod tokens;

pub use config::Config;
pub use error::{ErrorCode, ServiceError};

/// Declares a crate's metrics in its `metrics.rs`: a constant per metric, named and documented by its
/// description, and a `describe()` that gives the recorder each description and unit (call it once the
/// recorder is installed; calling it again is harmless).
///
/// ```ignore
/// parley_platform::declare_metrics! {
///     counter JOBS = "parley_agent_jobs_total" in Count: "Jobs finished by an agent, by outcome.";
///     gauge BREAKER_STATE = "parley_llm_breaker_state": "0 closed, 1 half-open, 2 open.";
/// }
/// ```
#[macro_export]
macro_rules! declare_metrics {
    ($($kind:ident $name:ident = $metric:literal $(in $unit:ident)?: $description:literal;)*) => {
        $(
            #[doc = $description]
            pub const $name: &str = $metric;
        )*

        /// Registers every metric of this crate with its description and unit.
        pub fn describe() {
            $($crate::declare_metrics!(@describe $kind $name $description $($unit)?);)*
        }
    };
    (@describe counter $name:ident $description:literal $($unit:ident)?) => {
        ::metrics::describe_counter!($name, $(::metrics::Unit::$unit,)? $description)
    };
    (@describe gauge $name:ident $description:literal $($unit:ident)?) => {
        ::metrics::describe_gauge!($name, $(::metrics::Unit::$unit,)? $description)
    };
    (@describe histogram $name:ident $description:literal $($unit:ident)?) => {
        ::metrics::describe_histogram!($name, $(::metrics::Unit::$unit,)? $description)
    };
}
