//! What every Parley service shares: configuration, the error-code type, telemetry, database, Redis
//! and NATS connections, gRPC plumbing, health checks and shutdown.
//!
//! This crate holds no business logic and owns no schema: it must never read or write a service's
//! tables, and no service-specific type belongs here except the wire events that several services
//! exchange over NATS ([`events`]).

pub mod access_token;
pub mod config;
pub mod db;
pub mod error;
pub mod events;
pub mod grpc;
pub mod health;
pub mod json_log;
pub mod nats;
pub mod net;
pub mod prompt;
pub mod redis_pool;
pub mod replicas;
pub mod shutdown;
pub mod telemetry;
pub mod timestamps;
pub mod tokens;

pub use config::Config;
pub use error::{ErrorCode, ServiceError};
