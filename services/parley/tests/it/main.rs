//! End-to-end tests: the services run in this process on ephemeral ports, against the real PostgreSQL,
//! Redis and NATS of this machine, with the fake LLM as the only stand-in. Each test gets its own
//! database, NATS prefix and Redis prefix, so tests run in parallel without seeing each other.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod anthropic;
mod api_keys;
mod archive;
mod branches;
mod cache;
mod context;
mod contract;
mod degraded;
mod deletion;
mod embeddings;
mod extremes;
mod feedback;
mod harness;
mod identity;
mod isolation;
mod journey;
mod openai;
mod operator;
mod pagination;
mod parameters;
mod quota;
mod rate_limits;
mod reconciliation;
mod redelivery;
mod replicas;
mod resilience;
mod search;
mod signing;
mod stop;
mod stored_completions;
mod streaming;
mod titles;
mod tools;
mod traces;
mod usage;
mod web;
