//! Configuration: built-in defaults, then the TOML file named by `PARLEY_CONFIG`, then environment
//! variables: any setting by its path (`PARLEY__HTTP__BODY_LIMIT_BYTES` is `http.body_limit_bytes`,
//! [`Config::apply_env_paths`]), then the named variables of [`ENVIRONMENT`]. Unknown keys are errors,
//! and [`Config::validate`] names the field that is wrong.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One environment variable Parley reads: its name, what it sets (the README's table is checked against
/// these), and how. The table is the mapping itself: [`Config::apply_env`] walks it, so a variable
/// cannot be documented without being read, or read without being documented.
pub struct EnvVar {
    pub name: &'static str,
    pub doc: &'static str,
    /// `None` for the two read elsewhere: `PARLEY_CONFIG` (by [`Config::load`]) and provider keys (by
    /// `Config::read_provider_keys`, for whatever variables the providers name).
    set: Option<Setter>,
}

/// What a variable's value does to the configuration.
type Setter = fn(&mut Config, String) -> Result<(), ConfigError>;

const fn var(name: &'static str, doc: &'static str, set: Setter) -> EnvVar {
    EnvVar { name, doc, set: Some(set) }
}

const fn documented(name: &'static str, doc: &'static str) -> EnvVar {
    EnvVar { name, doc, set: None }
}

/// A whole number from variable `name`, or an error saying it must be a whole number of `what`.
fn whole<T: std::str::FromStr>(name: &str, value: &str, what: &str) -> Result<T, ConfigError> {
    value.trim().parse().map_err(|_| invalid(name, format!("must be a whole number of {what}")))
}

/// Every environment variable Parley reads, in the order they are applied.
pub const ENVIRONMENT: &[EnvVar] = &[
    documented("PARLEY_CONFIG", "path to the TOML file with structured settings (providers, models, tiers)"),
    var("DATABASE_URL", "PostgreSQL primary, e.g. postgres://parley@127.0.0.1:5432/parley", |c, v| {
        c.database.url = v;
        Ok(())
    }),
    var("DATABASE_REPLICA_URLS", "comma-separated PostgreSQL read replicas", |c, v| {
        c.database.replica_urls = split_list(&v);
        Ok(())
    }),
    var("REDIS_URL", "Redis, e.g. redis://127.0.0.1:6379", |c, v| {
        c.redis.url = v;
        Ok(())
    }),
    var("NATS_URL", "NATS with JetStream, e.g. nats://127.0.0.1:4222", |c, v| {
        c.nats.url = v;
        Ok(())
    }),
    var("PARLEY_HTTP_ADDR", "address the gateway's REST API listens on (default 127.0.0.1:8080)", |c, v| {
        c.http.addr = v;
        Ok(())
    }),
    var("PARLEY_GRPC_ADDR", "address a service's gRPC server listens on under `parley serve`", |c, v| {
        c.grpc.addr = v;
        Ok(())
    }),
    var("PARLEY_ADMIN_ADDR", "address of /healthz, /readyz and /metrics under `parley serve`", |c, v| {
        c.http.admin_addr = v;
        Ok(())
    }),
    var("PARLEY_USER_URL", "gRPC address of the user service", |c, v| {
        c.grpc.user_url = v;
        Ok(())
    }),
    var("PARLEY_CHAT_URL", "gRPC address of the chat service", |c, v| {
        c.grpc.chat_url = v;
        Ok(())
    }),
    var("PARLEY_QUOTA_URL", "gRPC address of the quota service", |c, v| {
        c.grpc.quota_url = v;
        Ok(())
    }),
    var("PARLEY_ANALYTICS_URL", "gRPC address of the analytics service", |c, v| {
        c.grpc.analytics_url = v;
        Ok(())
    }),
    var("PARLEY_AGENT_URL", "gRPC address of the agents (stateless completions)", |c, v| {
        c.grpc.agent_url = v;
        Ok(())
    }),
    var("PARLEY_ADMIN_EMAILS", "comma-separated emails whose accounts have role admin", |c, v| {
        c.auth.admin_emails = split_list(&v);
        Ok(())
    }),
    var("PARLEY_SECRETS_KEY", "32 bytes, base64: encrypts stored secrets such as API keys' signing secrets", |c, v| {
        c.auth.secrets_key = v;
        Ok(())
    }),
    var("PARLEY_CORS_ALLOWED_ORIGINS", "comma-separated origins browsers may call the API from", |c, v| {
        c.http.cors_allowed_origins = split_list(&v);
        Ok(())
    }),
    var("PARLEY_CURSOR_SECRET", "key that makes pagination cursors tamper-evident (same on every replica)", |c, v| {
        c.chat.cursor_secret = v;
        Ok(())
    }),
    var(
        "PARLEY_CONTENT_KEYS",
        "key-encryption keys of message content and titles, `id:base64-32-bytes`, comma-separated, the current first",
        |c, v| {
            c.chat.content_keys = v;
            Ok(())
        },
    ),
    var("PARLEY_NATS_PREFIX", "prefix of every JetStream stream and subject (default parley)", |c, v| {
        c.nats.prefix = v;
        Ok(())
    }),
    var("PARLEY_REDIS_PREFIX", "prefix of every Redis key (default parley)", |c, v| {
        c.redis.key_prefix = v;
        Ok(())
    }),
    var("PARLEY_DEFAULT_MODEL", "model used when a request names none", |c, v| {
        c.default_model = v;
        Ok(())
    }),
    var(
        "PARLEY_FAKE_LLM_URL",
        "base URL (up to /v1) of a fake LLM served on its own, e.g. the chart's fake-llm Deployment: `fake` providers without a base URL use it",
        |c, v| {
            c.point_fake_providers_at(v.trim());
            Ok(())
        },
    ),
    var(
        "PARLEY_EXPECTED_GATEWAY_REPLICAS",
        "gateway replicas sharing a rate limit while Redis is unreachable",
        |c, v| {
            c.http.expected_gateway_replicas = whole("PARLEY_EXPECTED_GATEWAY_REPLICAS", &v, "replicas")?;
            Ok(())
        },
    ),
    var(
        "PARLEY_TRUSTED_PROXY_HOPS",
        "proxies in front of the gateway whose X-Forwarded-For entries are trusted (default 0)",
        |c, v| {
            c.http.trusted_proxy_hops = whole("PARLEY_TRUSTED_PROXY_HOPS", &v, "proxies")?;
            Ok(())
        },
    ),
    var("PARLEY_WEB_DIR", "directory of the built web client served at / and /status (default web/dist)", |c, v| {
        c.http.web_dir = v;
        Ok(())
    }),
    var(
        "PARLEY_AGENT_DRAIN_SECS",
        "on shutdown, seconds an agent lets its jobs in flight finish before handing them back (default 25)",
        |c, v| {
            c.agent.drain_secs = whole("PARLEY_AGENT_DRAIN_SECS", &v, "seconds")?;
            Ok(())
        },
    ),
    var(
        "PARLEY_AGENT_TITLES",
        "true (default) or false: title a conversation created without one after its first exchange",
        |c, v| {
            c.agent.titles = match v.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(invalid("PARLEY_AGENT_TITLES", "must be true or false")),
            };
            Ok(())
        },
    ),
    var("PARLEY_LOG", "log filter, e.g. info or parley_chat=debug (default info)", |c, v| {
        c.telemetry.log_filter = v;
        Ok(())
    }),
    var("PARLEY_LOG_FORMAT", "json (default) or pretty", |c, v| {
        c.telemetry.log_format = match v.as_str() {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            other => return Err(invalid("PARLEY_LOG_FORMAT", format!("expected json or pretty, got {other:?}"))),
        };
        Ok(())
    }),
    var("OTEL_EXPORTER_OTLP_ENDPOINT", "OTLP gRPC endpoint for traces; unset means no export", |c, v| {
        c.telemetry.otlp_endpoint = Some(v);
        Ok(())
    }),
    var("OTEL_SERVICE_NAME", "service name on exported spans (default parley-<service>)", |c, v| {
        c.telemetry.service_name = Some(v);
        Ok(())
    }),
    documented("OPENAI_API_KEY", "API key for providers configured with api_key_env = \"OPENAI_API_KEY\""),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub nats: NatsConfig,
    pub http: HttpConfig,
    pub grpc: GrpcConfig,
    pub auth: AuthConfig,
    pub chat: ChatConfig,
    pub quota: QuotaConfig,
    pub analytics: AnalyticsConfig,
    pub agent: AgentConfig,
    pub telemetry: TelemetryConfig,
    pub fake_llm: FakeLlmConfig,
    /// The model used when a conversation or request names none.
    pub default_model: String,
    pub models: BTreeMap<String, ModelConfig>,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub tiers: BTreeMap<String, TierConfig>,
    /// The providers' API keys by variable name, read from the environment by [`Config::load`] (never
    /// from a file): the agent takes its keys from here, not from the process environment.
    #[serde(skip)]
    pub provider_keys: ProviderKeys,
}

impl Default for Config {
    fn default() -> Self {
        let providers = BTreeMap::from([(
            "fake".to_owned(),
            ProviderConfig {
                kind: ProviderKind::Fake,
                base_url: String::new(),
                api_key_env: None,
                api_key_envs: Vec::new(),
            },
        )]);
        let models = BTreeMap::from([
            (
                FAKE_MODEL.to_owned(),
                ModelConfig {
                    chain: vec![ModelTarget::new("fake", "fake-echo")],
                    context_window: 8192,
                    input_price_per_mtok: 0.5,
                    output_price_per_mtok: 1.5,
                    router: None,
                    // The fake counts the images it is shown.
                    vision: true,
                    kind: ModelKind::Chat,
                },
            ),
            (
                FAKE_EMBEDDINGS_MODEL.to_owned(),
                ModelConfig {
                    chain: vec![ModelTarget::new("fake", "fake-embed")],
                    context_window: 8192,
                    input_price_per_mtok: 0.02,
                    output_price_per_mtok: 0.0,
                    router: None,
                    vision: false,
                    kind: ModelKind::Embeddings,
                },
            ),
        ]);
        let tiers = BTreeMap::from([
            (
                "free".to_owned(),
                TierConfig { requests_per_minute: 20, tokens_per_day: 50_000, tokens_per_month: Some(1_000_000) },
            ),
            (
                "pro".to_owned(),
                TierConfig { requests_per_minute: 120, tokens_per_day: 1_000_000, tokens_per_month: Some(20_000_000) },
            ),
            (
                "enterprise".to_owned(),
                TierConfig {
                    requests_per_minute: 600,
                    tokens_per_day: 20_000_000,
                    tokens_per_month: Some(400_000_000),
                },
            ),
        ]);
        Self {
            database: DatabaseConfig::default(),
            redis: RedisConfig::default(),
            nats: NatsConfig::default(),
            http: HttpConfig::default(),
            grpc: GrpcConfig::default(),
            auth: AuthConfig::default(),
            chat: ChatConfig::default(),
            quota: QuotaConfig::default(),
            analytics: AnalyticsConfig::default(),
            agent: AgentConfig::default(),
            telemetry: TelemetryConfig::default(),
            fake_llm: FakeLlmConfig::default(),
            default_model: FAKE_MODEL.to_owned(),
            models,
            providers,
            tiers,
            provider_keys: ProviderKeys::default(),
        }
    }
}

/// API keys by the name of the variable that holds them. Its `Debug` shows the names only.
#[derive(Clone, Default)]
pub struct ProviderKeys(BTreeMap<String, String>);

impl ProviderKeys {
    pub fn insert(&mut self, variable: impl Into<String>, key: impl Into<String>) {
        self.0.insert(variable.into(), key.into());
    }

    pub fn get(&self, variable: &str) -> Option<&str> {
        self.0.get(variable).map(String::as_str)
    }
}

impl std::fmt::Debug for ProviderKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    pub replica_urls: Vec<String>,
    /// Connections to the primary per process.
    pub max_connections: u32,
    /// Longest a query waits for a free primary connection before it fails (503).
    pub acquire_timeout_ms: u64,
    /// Connections to each replica per process.
    pub replica_max_connections: u32,
    /// Longest a read waits for a replica connection before it goes to the primary instead.
    pub replica_acquire_timeout_ms: u64,
    /// A replica further behind the primary than this is taken out of rotation until it catches up.
    pub replica_max_lag_ms: u64,
    /// How often each replica's position is measured against the primary's.
    pub replica_check_interval_ms: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/parley".to_owned(),
            replica_urls: Vec::new(),
            max_connections: 10,
            acquire_timeout_ms: 3_000,
            replica_max_connections: 10,
            replica_acquire_timeout_ms: 500,
            replica_max_lag_ms: 5_000,
            replica_check_interval_ms: 1_000,
        }
    }
}

impl DatabaseConfig {
    /// What can be checked of this section alone (the field named by its path).
    fn validate(&self) -> Result<(), ConfigError> {
        check_url("database.url", &self.url, &["postgres", "postgresql"])?;
        for (index, url) in self.replica_urls.iter().enumerate() {
            check_url(&format!("database.replica_urls[{index}]"), url, &["postgres", "postgresql"])?;
        }
        Ok(())
    }

    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("database.max_connections", 1.0, 1_000.0),
        range("database.acquire_timeout_ms", 100.0, 10.0 * MINUTE_SECS * 1e3),
        range("database.replica_max_connections", 1.0, 1_000.0),
        range("database.replica_acquire_timeout_ms", 1.0, 10.0 * MINUTE_SECS * 1e3),
        range("database.replica_max_lag_ms", 0.0, DAY_SECS * 1e3),
        range("database.replica_check_interval_ms", 10.0, HOUR_SECS * 1e3),
    ];
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
    /// Every key starts with `<prefix>:`, so several deployments (or tests) can share one Redis.
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { url: "redis://127.0.0.1:6379".to_owned(), key_prefix: "parley".to_owned() }
    }
}

impl RedisConfig {
    /// What can be checked of this section alone (the field named by its path).
    fn validate(&self) -> Result<(), ConfigError> {
        check_url("redis.url", &self.url, &["redis", "rediss"])?;
        check_name("redis.key_prefix", &self.key_prefix)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub url: String,
    /// Streams are named `<PREFIX>_JOBS`, subjects `<prefix>.jobs.*`, and so on.
    pub prefix: String,
    /// How long an agent may hold a job without acknowledging it before JetStream redelivers it.
    pub job_ack_wait_secs: u64,
    /// Deliveries of one job before it is given up and its message marked failed.
    pub job_max_deliver: i64,
    /// Size cap of the stream that records replies' events for replay.
    pub events_max_bytes: i64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            prefix: "parley".to_owned(),
            job_ack_wait_secs: 30,
            job_max_deliver: 5,
            events_max_bytes: 1024 * 1024 * 1024,
        }
    }
}

impl NatsConfig {
    /// What can be checked of this section alone (the field named by its path).
    fn validate(&self) -> Result<(), ConfigError> {
        check_url("nats.url", &self.url, &["nats", "tls"])?;
        check_name("nats.prefix", &self.prefix)
    }

    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("nats.job_ack_wait_secs", 1.0, DAY_SECS),
        range("nats.job_max_deliver", 1.0, 1_000.0),
        range("nats.events_max_bytes", 1_048_576.0, 16.0 * GIB),
    ];
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub addr: String,
    pub body_limit_bytes: usize,
    /// How long a non-streaming send waits for the reply before answering 202.
    pub message_wait_secs: u64,
    /// Address of /healthz, /readyz and /metrics for services without a public HTTP port.
    pub admin_addr: String,
    /// Seconds between heartbeats on an idle event stream (SSE comment, WebSocket ping).
    pub stream_heartbeat_secs: u64,
    /// Requests a minute per client IP on the unauthenticated routes (register, login, refresh).
    pub ip_requests_per_minute: u32,
    /// Gateway replicas expected to run: while Redis is unreachable each replica enforces its share
    /// (the limit divided by this), so the total stays near the configured limit.
    pub expected_gateway_replicas: u32,
    /// Longest a request may take before the gateway gives up on it (must exceed message_wait_secs).
    pub request_timeout_secs: u64,
    /// Origins browsers may call the API from (CORS); empty allows none.
    pub cors_allowed_origins: Vec<String>,
    /// Send Strict-Transport-Security (when the gateway is served behind TLS).
    pub hsts: bool,
    /// Proxies in front of the gateway that append to X-Forwarded-For (an ingress: 1). The client
    /// address is the entry this many places from the right; 0 uses the TCP peer.
    pub trusted_proxy_hops: usize,
    /// The built web client (`web/dist`: `index.html`, `status.html`, `assets/`), served at `/` and
    /// `/status`; when it is missing those pages answer 404 and the API is unaffected.
    pub web_dir: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".to_owned(),
            body_limit_bytes: 1024 * 1024,
            message_wait_secs: 60,
            admin_addr: "0.0.0.0:9090".to_owned(),
            stream_heartbeat_secs: 15,
            ip_requests_per_minute: 30,
            expected_gateway_replicas: 1,
            request_timeout_secs: 75,
            cors_allowed_origins: Vec::new(),
            hsts: false,
            trusted_proxy_hops: 0,
            web_dir: "web/dist".to_owned(),
        }
    }
}

impl HttpConfig {
    /// What can be checked of this section alone (the field named by its path).
    fn validate(&self) -> Result<(), ConfigError> {
        check_socket_addr("http.addr", &self.addr)?;
        check_socket_addr("http.admin_addr", &self.admin_addr)?;
        if self.request_timeout_secs <= self.message_wait_secs {
            return Err(invalid("http.request_timeout_secs", "must be longer than http.message_wait_secs"));
        }
        for (index, origin) in self.cors_allowed_origins.iter().enumerate() {
            check_url(&format!("http.cors_allowed_origins[{index}]"), origin, &["http", "https"])?;
        }
        Ok(())
    }

    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("http.body_limit_bytes", 1_024.0, 100.0 * 1_048_576.0),
        range("http.message_wait_secs", 0.0, HOUR_SECS),
        range("http.stream_heartbeat_secs", 1.0, HOUR_SECS),
        range("http.ip_requests_per_minute", 1.0, 100_000_000.0),
        range("http.expected_gateway_replicas", 1.0, 1_000.0),
        range("http.request_timeout_secs", 1.0, DAY_SECS),
        range("http.trusted_proxy_hops", 0.0, 16.0),
    ];
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    pub addr: String,
    pub user_url: String,
    pub chat_url: String,
    pub quota_url: String,
    pub analytics_url: String,
    pub agent_url: String,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:50051".to_owned(),
            user_url: "http://parley-user:50051".to_owned(),
            chat_url: "http://parley-chat:50051".to_owned(),
            quota_url: "http://parley-quota:50051".to_owned(),
            analytics_url: "http://parley-analytics:50051".to_owned(),
            agent_url: "http://parley-agent:50051".to_owned(),
        }
    }
}

impl GrpcConfig {
    /// What can be checked of this section alone (the field named by its path).
    fn validate(&self) -> Result<(), ConfigError> {
        check_socket_addr("grpc.addr", &self.addr)?;
        for (field, url) in [
            ("grpc.user_url", &self.user_url),
            ("grpc.chat_url", &self.chat_url),
            ("grpc.quota_url", &self.quota_url),
            ("grpc.analytics_url", &self.analytics_url),
            ("grpc.agent_url", &self.agent_url),
        ] {
            check_url(field, url, &["http", "https"])?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub issuer: String,
    pub audience: String,
    pub access_token_ttl_secs: i64,
    pub refresh_token_ttl_secs: i64,
    pub admin_emails: Vec<String>,
    /// Failed logins for one account within 15 minutes after which its logins are refused for a while.
    pub max_failed_logins: i64,
    /// How often gateways re-read the published signing keys (they also do on an unknown key id).
    pub jwks_refresh_secs: u64,
    /// 32 bytes, base64: the key that encrypts stored secrets (API keys' signing secrets). The same on
    /// every user-service replica. The development default must be replaced in production.
    pub secrets_key: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: "parley".to_owned(),
            audience: "parley-api".to_owned(),
            access_token_ttl_secs: 15 * 60,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            admin_emails: Vec::new(),
            max_failed_logins: 10,
            jwks_refresh_secs: 300,
            secrets_key: DEVELOPMENT_SECRETS_KEY.to_owned(),
        }
    }
}

impl AuthConfig {
    /// What can be checked of this section alone (the field named by its path).
    fn validate(&self) -> Result<(), ConfigError> {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD.decode(self.secrets_key.trim());
        if decoded.map(|bytes| bytes.len()) != Ok(32) {
            return Err(invalid("auth.secrets_key", "must be 32 bytes, base64-encoded (openssl rand -base64 32)"));
        }
        Ok(())
    }

    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("auth.access_token_ttl_secs", 1.0, 7.0 * DAY_SECS),
        range("auth.refresh_token_ttl_secs", 1.0, 10.0 * YEAR_SECS),
        range("auth.max_failed_logins", 1.0, 1_000_000.0),
        range("auth.jwks_refresh_secs", 1.0, DAY_SECS),
    ];
}

/// The development value of `chat.content_keys`; `parley check-config` warns when it is in use.
pub const DEVELOPMENT_CONTENT_KEYS: &str = "dev:cGFybGV5LWRldmVsb3BtZW50LWNvbnRlbnQta2V5ISE=";

/// The development value of `auth.secrets_key`; `parley check-config` warns when it is in use.
pub const DEVELOPMENT_SECRETS_KEY: &str = "cGFybGV5LWRldmVsb3BtZW50LXNlY3JldHMta2V5ISE=";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatConfig {
    pub cursor_secret: String,
    /// The key-encryption keys that wrap each conversation's data key (`id:base64,...`, 32-byte keys,
    /// the current one first; the others still open what they wrapped). The same on every chat replica.
    /// The development default must be replaced in production.
    pub content_keys: String,
    /// Longest accepted message, in characters.
    pub max_message_chars: usize,
    /// How many earlier messages an agent gets as context.
    pub history_limit: u32,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            cursor_secret: "parley-development-cursor-secret".to_owned(),
            content_keys: DEVELOPMENT_CONTENT_KEYS.to_owned(),
            max_message_chars: 100_000,
            history_limit: 50,
        }
    }
}

impl ChatConfig {
    /// What can be checked of this section alone (the field named by its path).
    fn validate(&self) -> Result<(), ConfigError> {
        if self.cursor_secret.len() < 16 {
            return Err(invalid("chat.cursor_secret", "must be at least 16 characters"));
        }
        crate::envelope::parse_keys(&self.content_keys).map_err(|why| invalid("chat.content_keys", why))?;
        Ok(())
    }

    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] =
        &[range("chat.max_message_chars", 1.0, 1_000_000.0), range("chat.history_limit", 1.0, 10_000.0)];
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// How long a reservation is held when its job never settles it (a job that died).
    pub reservation_ttl_secs: u64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self { reservation_ttl_secs: 900 }
    }
}

impl QuotaConfig {
    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[range("quota.reservation_ttl_secs", 1.0, 7.0 * DAY_SECS)];
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsConfig {
    /// Daily spend (USD, UTC day) of one user at which an alert is raised, once per threshold a day.
    pub user_daily_spend_alerts_usd: Vec<f64>,
    /// Daily spend (USD, UTC day) of all users together at which an alert is raised.
    pub global_daily_spend_alerts_usd: Vec<f64>,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self { user_daily_spend_alerts_usd: vec![10.0], global_daily_spend_alerts_usd: vec![1_000.0] }
    }
}

impl AnalyticsConfig {
    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("analytics.user_daily_spend_alerts_usd.*", 0.01, 1e9),
        range("analytics.global_daily_spend_alerts_usd.*", 0.01, 1e9),
    ];
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Jobs one agent replica runs at once.
    pub concurrency: usize,
    pub connect_timeout_ms: u64,
    /// Longest a provider may take to send the first token (including connecting).
    pub time_to_first_token_timeout_ms: u64,
    /// Longest one provider call may take in all.
    pub request_timeout_secs: u64,
    /// Most tokens a reply may use; also what a budget check reserves for the reply.
    pub max_output_tokens: u32,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
    pub cache: CacheConfig,
    /// The model that writes running summaries of long threads; by default a model's router target
    /// (its cheaper model), else the model itself.
    pub summary_model: Option<String>,
    /// Whether a conversation created without a title gets one from the summary model after its first
    /// exchange (a call charged to the user).
    pub titles: bool,
    /// On shutdown, how long jobs in flight may run on before they are handed back to JetStream
    /// unfinished. Keep it below the pod's termination grace period.
    pub drain_secs: u64,
    /// Most usage events an agent publishes in one message of the usage stream (those reported within
    /// a few milliseconds of one another go together). 1 publishes each alone, which is what quota and
    /// analytics before batched usage messages read: keep it at 1 until they run this version.
    pub usage_batch: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            concurrency: 1024,
            connect_timeout_ms: 5_000,
            time_to_first_token_timeout_ms: 30_000,
            request_timeout_secs: 120,
            max_output_tokens: 1024,
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            cache: CacheConfig::default(),
            summary_model: None,
            titles: true,
            drain_secs: 25,
            usage_batch: 64,
        }
    }
}

impl AgentConfig {
    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("agent.concurrency", 1.0, 100_000.0),
        range("agent.connect_timeout_ms", 1.0, 10.0 * MINUTE_SECS * 1e3),
        range("agent.time_to_first_token_timeout_ms", 1.0, HOUR_SECS * 1e3),
        range("agent.request_timeout_secs", 1.0, DAY_SECS),
        range("agent.max_output_tokens", 1.0, 1_000_000.0),
        range("agent.drain_secs", 0.0, HOUR_SECS),
        range("agent.usage_batch", 1.0, 1000.0),
    ];
}

/// The response cache: exact matches of deterministic requests, in Redis behind an in-process LRU.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    pub ttl_secs: u64,
    /// Entries the in-process LRU keeps (it also answers while Redis is down).
    pub local_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { enabled: true, ttl_secs: 24 * 3600, local_entries: 1024 }
    }
}

impl CacheConfig {
    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] =
        &[range("agent.cache.ttl_secs", 1.0, YEAR_SECS), range("agent.cache.local_entries", 0.0, 10_000_000.0)];
}

/// Retries of one provider before the chain moves on: exponential backoff with full jitter, on
/// retryable failures only, bounded in count and in time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Calls to one provider per job, the first included.
    pub max_attempts: u32,
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
    /// No retry starts after this long on one provider.
    pub max_elapsed_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { max_attempts: 3, base_delay_ms: 200, max_delay_ms: 5_000, max_elapsed_ms: 15_000 }
    }
}

impl RetryConfig {
    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("agent.retry.max_attempts", 1.0, 100.0),
        range("agent.retry.base_delay_ms", 0.0, 10.0 * MINUTE_SECS * 1e3),
        range("agent.retry.max_delay_ms", 0.0, HOUR_SECS * 1e3),
        range("agent.retry.max_elapsed_ms", 0.0, DAY_SECS * 1e3),
    ];
}

/// A circuit breaker per provider: open after `failure_threshold` consecutive failures, half-open (one
/// probe) after `cool_down_secs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub cool_down_secs: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failure_threshold: 5, cool_down_secs: 30 }
    }
}

impl BreakerConfig {
    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("agent.breaker.failure_threshold", 1.0, 10_000.0),
        range("agent.breaker.cool_down_secs", 1.0, DAY_SECS),
    ];
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub otlp_endpoint: Option<String>,
    /// The service name on exported spans (`OTEL_SERVICE_NAME`, a Deployment's own name); by default
    /// `parley-<service>`.
    pub service_name: Option<String>,
    pub log_filter: String,
    pub log_format: LogFormat,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { otlp_endpoint: None, service_name: None, log_filter: "info".to_owned(), log_format: LogFormat::Json }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FakeLlmConfig {
    pub addr: String,
    /// Delay before the response starts (non-streaming) or before the first token (streaming).
    pub time_to_first_token_ms: u64,
    pub tokens_per_second: f64,
    /// Fraction of requests answered 500.
    pub error_rate: f64,
    /// Fraction of requests answered 429 with `Retry-After`.
    pub rate_limit_rate: f64,
}

impl Default for FakeLlmConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:0".to_owned(),
            time_to_first_token_ms: 50,
            tokens_per_second: 200.0,
            error_rate: 0.0,
            rate_limit_rate: 0.0,
        }
    }
}

impl FakeLlmConfig {
    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("fake_llm.time_to_first_token_ms", 0.0, HOUR_SECS * 1e3),
        range("fake_llm.tokens_per_second", 0.01, 1e12),
        range("fake_llm.error_rate", 0.0, 1.0),
        range("fake_llm.rate_limit_rate", 0.0, 1.0),
    ];
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Provider/model pairs tried in order.
    pub chain: Vec<ModelTarget>,
    #[serde(default = "default_context_window")]
    pub context_window: u32,
    /// USD per million input tokens.
    #[serde(default)]
    pub input_price_per_mtok: f64,
    /// USD per million output tokens.
    #[serde(default)]
    pub output_price_per_mtok: f64,
    /// Sends simple requests for this model to a cheaper one.
    #[serde(default)]
    pub router: Option<RouterConfig>,
    /// Every provider of the chain takes images (`image_url` content parts); without it, a request
    /// with an image is refused.
    #[serde(default)]
    pub vision: bool,
    /// What the model makes: chat replies (the default), or embeddings (`POST /v1/embeddings` only).
    #[serde(default)]
    pub kind: ModelKind,
}

impl ModelConfig {
    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("models.*.context_window", 1.0, 100_000_000.0),
        range("models.*.input_price_per_mtok", 0.0, 1_000_000.0),
        range("models.*.output_price_per_mtok", 0.0, 1_000_000.0),
    ];
}

/// What a model makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Replies: conversations, `/v1/chat/completions`, `/v1/messages`.
    #[default]
    Chat,
    /// Vectors: `/v1/embeddings`, from OpenAI-compatible providers.
    Embeddings,
}

/// A request is simple, and goes to `model`, when its prompt is at most `max_prompt_chars` characters
/// in at most `max_messages` messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub model: String,
    pub max_prompt_chars: usize,
    #[serde(default = "default_router_messages")]
    pub max_messages: usize,
}

impl RouterConfig {
    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("models.*.router.max_prompt_chars", 0.0, 100_000_000.0),
        range("models.*.router.max_messages", 0.0, 100_000.0),
    ];
}

fn default_router_messages() -> usize {
    2
}

fn default_context_window() -> u32 {
    8192
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTarget {
    pub provider: String,
    pub model: String,
    /// USD per million input tokens when this entry answers, if it differs from the model's price (a
    /// fallback to another vendor's model costs what that model costs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_price_per_mtok: Option<f64>,
    /// USD per million output tokens when this entry answers, if it differs from the model's price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_price_per_mtok: Option<f64>,
}

impl ModelTarget {
    /// `provider`'s `model`, at the price of the model whose chain it is in.
    pub fn new(provider: impl Into<String>, model: impl Into<String>) -> Self {
        Self { provider: provider.into(), model: model.into(), input_price_per_mtok: None, output_price_per_mtok: None }
    }

    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("models.*.chain.*.input_price_per_mtok", 0.0, 1_000_000.0),
        range("models.*.chain.*.output_price_per_mtok", 0.0, 1_000_000.0),
    ];
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// Base URL up to and including `/v1`. For `fake` under `parley dev`, filled in with the built-in
    /// fake LLM's address when left empty.
    #[serde(default)]
    pub base_url: String,
    /// Name of the environment variable holding the API key, if the provider needs one.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// More keys, by environment variable name: with several, a key answered 401 or 429 is set aside
    /// and the next one used.
    #[serde(default)]
    pub api_key_envs: Vec<String>,
}

impl ProviderConfig {
    /// Every key variable, `api_key_env` first.
    pub fn key_variables(&self) -> Vec<&str> {
        self.api_key_env.iter().chain(self.api_key_envs.iter()).map(String::as_str).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Anything speaking the OpenAI Chat Completions API.
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
    /// The built-in fake LLM (OpenAI wire format).
    Fake,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub requests_per_minute: u32,
    pub tokens_per_day: i64,
    /// Tokens a calendar month (UTC); none means no monthly budget.
    #[serde(default)]
    pub tokens_per_month: Option<i64>,
}

impl TierConfig {
    /// The ranges of this section's numbers, by their paths in the configuration.
    pub const RANGES: &'static [NumericRange] = &[
        range("tiers.*.requests_per_minute", 1.0, 1_000_000_000.0),
        range("tiers.*.tokens_per_day", 0.0, 1e15),
        range("tiers.*.tokens_per_month", 0.0, 1e15),
    ];
}

/// The model every fresh install has: answered by the built-in fake LLM, so Parley runs offline.
pub const FAKE_MODEL: &str = "parley-fake";
/// The fake provider's embeddings model.
pub const FAKE_EMBEDDINGS_MODEL: &str = "parley-fake-embed";

/// A configuration that cannot be used, naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: String, source: Box<toml::de::Error> },
    #[error("invalid value for {field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.into() }
}

/// The range a numeric setting must fall in, by its path in the configuration: `*` stands for any key
/// of a map (a tier, a model) or any element of a list.
#[derive(Debug, Clone, Copy)]
pub struct NumericRange {
    pub path: &'static str,
    pub min: f64,
    pub max: f64,
}

const fn range(path: &'static str, min: f64, max: f64) -> NumericRange {
    NumericRange { path, min, max }
}

const MINUTE_SECS: f64 = 60.0;
const HOUR_SECS: f64 = 3_600.0;
const DAY_SECS: f64 = 86_400.0;
const YEAR_SECS: f64 = 365.0 * DAY_SECS;
const GIB: f64 = 1_073_741_824.0;

/// Every numeric setting's range, checked by [`Config::validate`] (so by `parley check-config` and at
/// start-up). The ranges are wider than any deployment needs and narrow enough that every duration,
/// share and product the services derive from them stays in range: whatever `check-config` accepts
/// runs. A numeric setting missing from this table fails a test.
/// Every numeric setting's range: each section's own (its `RANGES`, beside its struct).
pub fn numeric_ranges() -> impl Iterator<Item = &'static NumericRange> {
    [
        DatabaseConfig::RANGES,
        NatsConfig::RANGES,
        HttpConfig::RANGES,
        AuthConfig::RANGES,
        ChatConfig::RANGES,
        QuotaConfig::RANGES,
        AnalyticsConfig::RANGES,
        AgentConfig::RANGES,
        RetryConfig::RANGES,
        BreakerConfig::RANGES,
        CacheConfig::RANGES,
        FakeLlmConfig::RANGES,
        ModelConfig::RANGES,
        ModelTarget::RANGES,
        RouterConfig::RANGES,
        TierConfig::RANGES,
    ]
    .into_iter()
    .flatten()
}

/// The numbers at `path` (its `*` segments expanded) in a configuration written as JSON, each with its
/// own path; absent settings (an empty map, `None`) give none.
pub fn numbers_at<'a>(config: &'a serde_json::Value, path: &str) -> Vec<(String, &'a serde_json::Value)> {
    let mut found = vec![(String::new(), config)];
    for segment in path.split('.') {
        let mut next = Vec::new();
        for (at, value) in found {
            let join = |key: &str| if at.is_empty() { key.to_owned() } else { format!("{at}.{key}") };
            match (segment, value) {
                ("*", serde_json::Value::Object(entries)) => {
                    next.extend(entries.iter().map(|(key, value)| (join(key), value)));
                }
                ("*", serde_json::Value::Array(items)) => {
                    next.extend(items.iter().enumerate().map(|(index, value)| (format!("{at}[{index}]"), value)));
                }
                (key, serde_json::Value::Object(entries)) => {
                    if let Some(value) = entries.get(key) {
                        next.push((join(key), value));
                    }
                }
                _ => {}
            }
        }
        found = next;
    }
    found.retain(|(_, value)| value.is_number());
    found
}

/// A bound as people write it: 1000, not 1000.0.
fn bound_text(bound: f64) -> String {
    if bound.fract() == 0.0 && bound.abs() < 1e15 { format!("{}", bound as i64) } else { format!("{bound}") }
}

impl Config {
    /// Checks every numeric setting against its range ([`numeric_ranges`]).
    fn check_numeric_ranges(&self) -> Result<(), ConfigError> {
        let written = serde_json::to_value(self).map_err(|error| invalid("configuration", error.to_string()))?;
        // JSON has no NaN or infinity (they are written as null), so the fractional settings are
        // checked for those first.
        let fractions = [
            ("fake_llm.tokens_per_second", self.fake_llm.tokens_per_second),
            ("fake_llm.error_rate", self.fake_llm.error_rate),
            ("fake_llm.rate_limit_rate", self.fake_llm.rate_limit_rate),
        ]
        .into_iter()
        .map(|(path, value)| (path.to_owned(), value))
        .chain(self.models.iter().flat_map(|(name, model)| {
            [
                (format!("models.{name}.input_price_per_mtok"), model.input_price_per_mtok),
                (format!("models.{name}.output_price_per_mtok"), model.output_price_per_mtok),
            ]
        }))
        .chain(self.models.iter().flat_map(|(name, model)| {
            model.chain.iter().enumerate().flat_map(move |(index, target)| {
                [
                    (format!("models.{name}.chain[{index}].input_price_per_mtok"), target.input_price_per_mtok),
                    (format!("models.{name}.chain[{index}].output_price_per_mtok"), target.output_price_per_mtok),
                ]
                .into_iter()
                .filter_map(|(path, price)| Some((path, price?)))
            })
        }))
        .chain(
            self.analytics
                .user_daily_spend_alerts_usd
                .iter()
                .enumerate()
                .map(|(index, usd)| (format!("analytics.user_daily_spend_alerts_usd[{index}]"), *usd)),
        )
        .chain(
            self.analytics
                .global_daily_spend_alerts_usd
                .iter()
                .enumerate()
                .map(|(index, usd)| (format!("analytics.global_daily_spend_alerts_usd[{index}]"), *usd)),
        );
        for (path, value) in fractions {
            if !value.is_finite() {
                return Err(invalid(path, "must be a finite number"));
            }
        }
        for range in numeric_ranges() {
            for (path, value) in numbers_at(&written, range.path) {
                let number = value.as_f64().unwrap_or(f64::NAN);
                if !(range.min..=range.max).contains(&number) {
                    let (min, max) = (bound_text(range.min), bound_text(range.max));
                    return Err(invalid(path, format!("must be between {min} and {max}")));
                }
            }
        }
        Ok(())
    }
}

/// The prefix of the variables that set any setting by its path.
pub const PATH_PREFIX: &str = "PARLEY__";

/// Sets `leaf` in the table at `parents` (made where missing) to `value`; an existing key is matched
/// whatever its case (a model named `GPT-4o`).
fn set_at(tree: &mut toml::Table, parents: &[String], leaf: &str, value: toml::Value) -> Result<(), String> {
    fn key_in(table: &toml::Table, part: &str) -> String {
        table.keys().find(|key| key.eq_ignore_ascii_case(part)).cloned().unwrap_or_else(|| part.to_owned())
    }
    let mut table = tree;
    for part in parents {
        let key = key_in(table, part);
        let entry = table.entry(key).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| format!("{part} is a setting, not a section"))?;
    }
    table.insert(key_in(table, leaf), value);
    Ok(())
}

/// A variable's value as a TOML value (`8080`, `true`, `0.5`, `["a", "b"]`, `"quoted"`), else as the
/// string it is, so that a bare word or an address needs no quotes.
fn toml_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("value = {raw}"))
        .ok()
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

impl Config {
    /// Every setting's path and value, sorted by path: what `parley settings` prints. A setting at
    /// `a.b` is set from the environment with `PARLEY__A__B`.
    /// (`null` for an optional setting that is not set.)
    pub fn settings(&self) -> Result<Vec<(String, serde_json::Value)>, ConfigError> {
        fn walk(prefix: &str, value: &serde_json::Value, into: &mut Vec<(String, serde_json::Value)>) {
            match value {
                serde_json::Value::Object(fields) if !fields.is_empty() => {
                    for (key, value) in fields {
                        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                        walk(&path, value, into);
                    }
                }
                leaf => into.push((prefix.to_owned(), leaf.clone())),
            }
        }
        let tree = serde_json::to_value(self).map_err(|error| invalid("configuration", error.to_string()))?;
        let mut settings = Vec::new();
        walk("", &tree, &mut settings);
        Ok(settings)
    }

    /// The variable that sets the setting at `path`.
    pub fn variable_for(path: &str) -> String {
        format!("{PATH_PREFIX}{}", path.replace('.', "__").to_uppercase())
    }

    /// Applies the `PARLEY__<SECTION>__<FIELD>` variables among `variables`: each sets the setting at
    /// its path (`__` between the parts, any case: `PARLEY__TIERS__FREE__REQUESTS_PER_MINUTE` is
    /// `tiers.free.requests_per_minute`, and a map's entry is found whatever the case of its name) to
    /// its value read as TOML, or as the string it is when that does not fit (so `0x10` can be a
    /// prefix and `1234` a secret). An empty value is no value, as for the named variables. Each is
    /// applied over the configuration so far, so one setting of a tier or a model keeps the rest of
    /// it; a variable that names no setting, or whose value does not fit, is an error naming it.
    pub fn apply_env_paths(
        &mut self,
        variables: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let mut variables: Vec<(String, String)> = variables
            .into_iter()
            .filter(|(name, value)| name.starts_with(PATH_PREFIX) && !value.trim().is_empty())
            .collect();
        if variables.is_empty() {
            return Ok(());
        }
        variables.sort();
        let provider_keys = std::mem::take(&mut self.provider_keys);
        let mut tree = toml::Table::try_from(&*self).map_err(|error| invalid("configuration", error.to_string()))?;
        for (name, raw) in variables {
            let path: Vec<String> = name[PATH_PREFIX.len()..].split("__").map(str::to_lowercase).collect();
            let Some((leaf, parents)) = path.split_last().filter(|_| path.iter().all(|part| !part.is_empty())) else {
                return Err(invalid(&name, "names no setting: PARLEY__<SECTION>__<FIELD>, e.g. PARLEY__HTTP__ADDR"));
            };
            // Each variable is checked as it is applied, so an error names the one that caused it; a
            // value that does not fit as TOML is tried as the string it is.
            let fits = |tree: &mut toml::Table, value: toml::Value| -> Result<(), ConfigError> {
                set_at(tree, parents, leaf, value).map_err(|why| invalid(&name, why))?;
                let applied: Result<Config, toml::de::Error> = tree.clone().try_into();
                applied.map(|_| ()).map_err(|error| invalid(&name, error.message().trim().to_owned()))
            };
            if fits(&mut tree, toml_value(&raw)).is_err() {
                fits(&mut tree, toml::Value::String(raw.clone()))?;
            }
        }
        *self = tree.try_into().map_err(|error: toml::de::Error| invalid("configuration", error.to_string()))?;
        self.provider_keys = provider_keys;
        Ok(())
    }
}

impl Config {
    /// Defaults, then the file named by `PARLEY_CONFIG` (if set), then the environment (settings by
    /// path, then the named variables); validated.
    pub fn load() -> Result<Self, ConfigError> {
        // The one place the process environment is read (clippy.toml's disallowed-methods).
        #[allow(clippy::disallowed_methods)]
        let lookup = |name: &str| std::env::var(name).ok();
        let mut config = match lookup("PARLEY_CONFIG") {
            Some(path) if !path.is_empty() => Self::from_file(Path::new(&path))?,
            _ => Self::default(),
        };
        // (`vars_os`: a variable that is not UTF-8, which `vars` would panic on, cannot be one of ours.)
        #[allow(clippy::disallowed_methods)]
        let variables =
            std::env::vars_os().filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)));
        config.apply_env_paths(variables)?;
        config.apply_env(lookup)?;
        config.validate()?;
        config.read_provider_keys(lookup);
        Ok(config)
    }

    /// Points every `fake` provider without a base URL at the fake LLM at `base_url` (up to `/v1`): the
    /// one `parley dev` starts in-process, or one served on its own (`PARLEY_FAKE_LLM_URL`).
    pub fn point_fake_providers_at(&mut self, base_url: &str) {
        for provider in self.providers.values_mut() {
            if provider.kind == ProviderKind::Fake && provider.base_url.is_empty() {
                provider.base_url = base_url.to_owned();
            }
        }
    }

    /// Reads the API key of every variable a provider names, where it is set.
    pub fn read_provider_keys(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        let variables: Vec<String> = self
            .providers
            .values()
            .flat_map(|provider| provider.key_variables().into_iter().map(str::to_owned))
            .collect();
        for variable in variables {
            if let Some(key) = lookup(&variable).filter(|key| !key.is_empty()) {
                self.provider_keys.insert(variable, key);
            }
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let display = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: display.clone(), source })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse { path: display, source: Box::new(source) })
    }

    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Applies environment overrides read through `lookup`, so tests need not touch the process env.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        for variable in ENVIRONMENT {
            let value = lookup(variable.name).filter(|value| !value.trim().is_empty());
            if let (Some(set), Some(value)) = (variable.set, value) {
                set(self, value)?;
            }
        }
        Ok(())
    }

    /// Checks everything that can be checked without connecting anywhere.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_numeric_ranges()?;
        self.database.validate()?;
        self.redis.validate()?;
        self.nats.validate()?;
        self.http.validate()?;
        self.grpc.validate()?;
        self.auth.validate()?;
        self.chat.validate()?;
        if let Some(model) = &self.agent.summary_model
            && !self.serves_chat(model)
        {
            return Err(invalid("agent.summary_model", format!("no chat model named {model:?}")));
        }
        for (name, provider) in &self.providers {
            // The fake's address may be filled in at start-up; every other provider needs one now.
            if provider.kind != ProviderKind::Fake || !provider.base_url.is_empty() {
                check_url(&format!("providers.{name}.base_url"), &provider.base_url, &["http", "https"])?;
            }
        }
        if self.models.is_empty() {
            return Err(invalid("models", "at least one model is required"));
        }
        for (name, model) in &self.models {
            if model.chain.is_empty() {
                return Err(invalid(format!("models.{name}.chain"), "needs at least one provider/model pair"));
            }
            for (index, target) in model.chain.iter().enumerate() {
                if !self.providers.contains_key(&target.provider) {
                    return Err(invalid(
                        format!("models.{name}.chain[{index}].provider"),
                        format!("no provider named {:?}", target.provider),
                    ));
                }
            }
            if let Some(router) = &model.router {
                let field = format!("models.{name}.router.model");
                match self.models.get(&router.model) {
                    None => return Err(invalid(field, format!("no model named {:?}", router.model))),
                    Some(target) if target.router.is_some() => {
                        return Err(invalid(field, "the cheaper model cannot have a router of its own"));
                    }
                    Some(_) => {}
                }
            }
            if model.kind == ModelKind::Embeddings {
                if model.router.is_some() || model.vision {
                    return Err(invalid(format!("models.{name}"), "an embeddings model has no router and no vision"));
                }
                for (index, target) in model.chain.iter().enumerate() {
                    if self
                        .providers
                        .get(&target.provider)
                        .is_some_and(|provider| provider.kind == ProviderKind::Anthropic)
                    {
                        return Err(invalid(
                            format!("models.{name}.chain[{index}].provider"),
                            "embeddings come from OpenAI-compatible providers; Anthropic's API has none",
                        ));
                    }
                }
            }
            if let Some(router) = &model.router
                && self.models.get(&router.model).is_some_and(|routed| routed.kind != model.kind)
            {
                return Err(invalid(format!("models.{name}.router.model"), "must be a model of the same kind"));
            }
        }
        if !self.serves_chat(&self.default_model) {
            return Err(invalid("default_model", format!("no chat model named {:?}", self.default_model)));
        }
        if !self.tiers.contains_key(DEFAULT_TIER) {
            return Err(invalid("tiers", format!("the {DEFAULT_TIER:?} tier must exist")));
        }
        Ok(())
    }

    /// Whether `model` is configured and makes chat replies.
    pub fn serves_chat(&self, model: &str) -> bool {
        self.models.get(model).is_some_and(|model| model.kind == ModelKind::Chat)
    }

    /// Whether `model` is configured and makes embeddings.
    pub fn serves_embeddings(&self, model: &str) -> bool {
        self.models.get(model).is_some_and(|model| model.kind == ModelKind::Embeddings)
    }

    /// Whether `model` takes images: it and the model its router sends simple requests to both do.
    pub fn takes_images(&self, model: &str) -> bool {
        let Some(entry) = self.models.get(model) else {
            return false;
        };
        let routed = entry.router.as_ref().and_then(|router| self.models.get(&router.model));
        entry.vision && routed.is_none_or(|routed| routed.vision)
    }

    pub fn tier(&self, name: &str) -> Option<&TierConfig> {
        self.tiers.get(name)
    }
}

/// The tier a new account starts on.
pub const DEFAULT_TIER: &str = "free";

fn split_list(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::to_owned).collect()
}

fn check_url(field: &str, value: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let Some((scheme, rest)) = value.split_once("://") else {
        return Err(invalid(field, format!("{value:?} is not a URL")));
    };
    if !schemes.contains(&scheme) {
        return Err(invalid(field, format!("scheme must be one of {schemes:?}, got {scheme:?}")));
    }
    if rest.is_empty() {
        return Err(invalid(field, "has no host"));
    }
    Ok(())
}

fn check_socket_addr(field: &str, value: &str) -> Result<(), ConfigError> {
    value
        .parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|_| invalid(field, format!("{value:?} is not an address like 127.0.0.1:8080")))
}

fn check_name(field: &str, value: &str) -> Result<(), ConfigError> {
    let valid = !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid { Ok(()) } else { Err(invalid(field, "use only letters, digits, '-' and '_'")) }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn field_of(error: ConfigError) -> String {
        match error {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected an invalid field, got {other}"),
        }
    }

    /// A JSON value as TOML text, as someone would write it in a variable.
    fn toml_text(value: &serde_json::Value) -> String {
        match value {
            serde_json::Value::Array(items) => {
                format!("[{}]", items.iter().map(toml_text).collect::<Vec<_>>().join(", "))
            }
            serde_json::Value::Object(fields) => {
                let fields: Vec<String> = fields
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| format!("{k:?} = {}", toml_text(v)))
                    .collect();
                format!("{{{}}}", fields.join(", "))
            }
            other => other.to_string(),
        }
    }

    fn with_paths(variables: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        config.apply_env_paths(variables.iter().map(|(name, value)| (name.to_string(), value.to_string())))?;
        Ok(config)
    }

    #[test]
    fn every_setting_is_settable_from_the_environment_by_its_path() {
        let defaults = Config::default();
        let settings = defaults.settings().unwrap();
        assert!(settings.len() > 100, "{} settings", settings.len());
        let as_json = |config: &Config| serde_json::to_value(config).unwrap();
        for (path, value) in settings {
            if value.is_null() {
                continue;
            }
            // The default written back (a string quoted, as TOML) changes nothing and is accepted.
            let written = toml_text(&value);
            let config = with_paths(&[(&Config::variable_for(&path), &written)])
                .unwrap_or_else(|error| panic!("{path} = {written}: {error}"));
            assert_eq!(as_json(&config), as_json(&defaults), "{path}");
        }
        // An unset option is settable too.
        let config = with_paths(&[("PARLEY__TELEMETRY__OTLP_ENDPOINT", "http://collector:4317")]).unwrap();
        assert_eq!(config.telemetry.otlp_endpoint.as_deref(), Some("http://collector:4317"));
    }

    #[test]
    fn settings_by_path_take_toml_values_or_bare_strings_and_keep_the_rest_of_their_section() {
        let config = with_paths(&[
            ("PARLEY__HTTP__BODY_LIMIT_BYTES", "2048"),
            ("PARLEY__HTTP__HSTS", "true"),
            ("PARLEY__HTTP__CORS_ALLOWED_ORIGINS", r#"["https://chat.example.com"]"#),
            ("PARLEY__AUTH__ISSUER", "parley-test"),
            ("PARLEY__TIERS__FREE__REQUESTS_PER_MINUTE", "7"),
            ("PARLEY_HTTP_ADDR", "not a path variable, ignored here"),
        ])
        .unwrap();
        assert_eq!(config.http.body_limit_bytes, 2048);
        assert!(config.http.hsts);
        assert_eq!(config.http.cors_allowed_origins, ["https://chat.example.com"]);
        assert_eq!(config.auth.issuer, "parley-test");
        let free = &config.tiers["free"];
        assert_eq!(free.requests_per_minute, 7);
        assert_eq!(free.tokens_per_day, Config::default().tiers["free"].tokens_per_day);
        assert_eq!(config.http.addr, Config::default().http.addr);
        config.validate().unwrap();
    }

    #[test]
    fn a_value_that_only_looks_like_toml_is_the_string_it_is_and_map_entries_are_found_in_any_case() {
        let config = with_paths(&[
            ("PARLEY__AUTH__ISSUER", "1234"),
            ("PARLEY__NATS__PREFIX", "0x10"),
            ("PARLEY__CHAT__CURSOR_SECRET", "2026-01-01"),
            ("PARLEY__HTTP__ADDR", ""),
        ])
        .unwrap();
        assert_eq!((config.auth.issuer.as_str(), config.nats.prefix.as_str()), ("1234", "0x10"));
        assert_eq!(config.chat.cursor_secret, "2026-01-01");
        assert_eq!(config.http.addr, Config::default().http.addr, "an empty value is no value");

        let mut config = Config::default();
        let model = config.models[FAKE_MODEL].clone();
        config.models.insert("GPT-4o".to_owned(), model);
        config.apply_env_paths([("PARLEY__MODELS__GPT-4O__CONTEXT_WINDOW".to_owned(), "1000".to_owned())]).unwrap();
        assert_eq!(config.models["GPT-4o"].context_window, 1000);
        assert!(!config.models.contains_key("gpt-4o"));
    }

    #[test]
    fn a_path_variable_that_names_no_setting_or_does_not_fit_is_refused_by_name() {
        for (name, value) in [
            ("PARLEY__HTTP__NO_SUCH_SETTING", "1"),
            ("PARLEY__HTTP__BODY_LIMIT_BYTES", "lots"),
            ("PARLEY__HTTP__ADDR__PORT", "80"),
            ("PARLEY__", "1"),
            ("PARLEY__HTTP____ADDR", "x"),
        ] {
            let error = with_paths(&[(name, value)]).unwrap_err();
            assert_eq!(field_of(error), name);
        }
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn environment_overrides_file_and_defaults() {
        let mut config = Config::from_toml("[database]\nurl = \"postgres://file/db\"\n").unwrap();
        assert_eq!(config.database.url, "postgres://file/db");
        config
            .apply_env(|name| match name {
                "DATABASE_URL" => Some("postgres://env/db".to_owned()),
                "DATABASE_REPLICA_URLS" => Some("postgres://r1/db, postgres://r2/db".to_owned()),
                "PARLEY_ADMIN_EMAILS" => Some("a@example.com,b@example.com".to_owned()),
                "OTEL_SERVICE_NAME" => Some("parley-chat-eu".to_owned()),
                "PARLEY_TRUSTED_PROXY_HOPS" => Some("1".to_owned()),
                "PARLEY_FAKE_LLM_URL" => Some("http://fake-llm:8089/v1".to_owned()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.providers["fake"].base_url, "http://fake-llm:8089/v1");
        assert_eq!(config.telemetry.service_name.as_deref(), Some("parley-chat-eu"));
        assert_eq!(config.http.trusted_proxy_hops, 1);
        assert_eq!(config.database.url, "postgres://env/db");
        assert_eq!(config.database.replica_urls, vec!["postgres://r1/db", "postgres://r2/db"]);
        assert_eq!(config.auth.admin_emails.len(), 2);
        config.validate().unwrap();
    }

    #[test]
    fn the_readme_documents_every_environment_variable() {
        let readme = include_str!("../../../README.md");
        for name in ENVIRONMENT.iter().map(|variable| variable.name) {
            assert!(readme.contains(&format!("`{name}`")), "README.md does not document {name}");
        }
    }

    #[test]
    fn the_example_file_is_valid() {
        let config = Config::from_toml(include_str!("../../../config/parley.example.toml")).unwrap();
        config.validate().unwrap();
        assert_eq!(config.models["gpt-4o-mini"].chain.len(), 2);
    }

    #[test]
    fn provider_keys_are_read_for_the_variables_providers_name_and_never_printed() {
        let mut config = Config::from_toml(
            "[providers.openai]\nkind = \"openai\"\nbase_url = \"https://api.openai.com/v1\"\n\
             api_key_envs = [\"KEY_A\", \"KEY_B\", \"KEY_UNSET\"]\n",
        )
        .unwrap();
        let environment = [("KEY_A", "secret-a"), ("KEY_B", "secret-b"), ("OTHER", "not a key")];
        config.read_provider_keys(|name| {
            environment.iter().find(|(variable, _)| *variable == name).map(|(_, value)| (*value).to_owned())
        });
        assert_eq!(
            (config.provider_keys.get("KEY_A"), config.provider_keys.get("KEY_B")),
            (Some("secret-a"), Some("secret-b"))
        );
        assert_eq!((config.provider_keys.get("KEY_UNSET"), config.provider_keys.get("OTHER")), (None, None));
        let printed = format!("{config:?}");
        assert!(printed.contains("KEY_A") && !printed.contains("secret-a"), "{printed}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = Config::from_toml("[database]\nurll = \"x\"\n").unwrap_err();
        assert!(error.to_string().contains("urll"), "{error}");
    }

    #[test]
    fn embeddings_models_come_from_openai_compatible_providers_and_are_not_the_default() {
        let mut config = Config::default();
        assert!(config.serves_embeddings(FAKE_EMBEDDINGS_MODEL) && !config.serves_chat(FAKE_EMBEDDINGS_MODEL));
        config.providers.insert(
            "claude".to_owned(),
            ProviderConfig {
                kind: ProviderKind::Anthropic,
                base_url: "https://api.anthropic.com/v1".to_owned(),
                api_key_env: None,
                api_key_envs: Vec::new(),
            },
        );
        config.models.get_mut(FAKE_EMBEDDINGS_MODEL).unwrap().chain[0].provider = "claude".to_owned();
        assert_eq!(field_of(config.validate().unwrap_err()), "models.parley-fake-embed.chain[0].provider");
        let config = Config { default_model: FAKE_EMBEDDINGS_MODEL.to_owned(), ..Config::default() };
        assert_eq!(field_of(config.validate().unwrap_err()), "default_model");
        let toml =
            "[models.vectors]\nkind = \"embeddings\"\nchain = [{ provider = \"fake\", model = \"fake-embed\" }]\n";
        let config = Config::from_toml(toml).unwrap();
        assert_eq!(config.models["vectors"].kind, ModelKind::Embeddings);
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut config = Config::default();
        config.redis.url = "http://localhost".to_owned();
        assert_eq!(field_of(config.validate().unwrap_err()), "redis.url");

        let config = Config { default_model: "missing".to_owned(), ..Config::default() };
        assert_eq!(field_of(config.validate().unwrap_err()), "default_model");

        let mut config = Config::default();
        config.models.get_mut(FAKE_MODEL).unwrap().chain[0].provider = "nope".to_owned();
        assert_eq!(field_of(config.validate().unwrap_err()), "models.parley-fake.chain[0].provider");

        let mut config = Config::default();
        config.fake_llm.error_rate = 1.5;
        assert_eq!(field_of(config.validate().unwrap_err()), "fake_llm.error_rate");

        let mut config = Config::default();
        config.http.addr = "localhost".to_owned();
        assert_eq!(field_of(config.validate().unwrap_err()), "http.addr");
    }

    /// Every numeric leaf of `value`, by its path (`a.b`, `list[0]`).
    fn numeric_leaves(value: &serde_json::Value, at: &str, found: &mut BTreeSet<String>) {
        match value {
            serde_json::Value::Object(entries) => {
                for (key, value) in entries {
                    let path = if at.is_empty() { key.clone() } else { format!("{at}.{key}") };
                    numeric_leaves(value, &path, found);
                }
            }
            serde_json::Value::Array(items) => {
                for (index, value) in items.iter().enumerate() {
                    numeric_leaves(value, &format!("{at}[{index}]"), found);
                }
            }
            serde_json::Value::Number(_) => {
                found.insert(at.to_owned());
            }
            _ => {}
        }
    }

    #[test]
    fn every_numeric_setting_has_a_range() {
        // Every optional numeric setting present, so that each one is seen.
        let mut config = Config::default();
        config.models.get_mut(FAKE_MODEL).unwrap().router =
            Some(RouterConfig { model: FAKE_MODEL.to_owned(), max_prompt_chars: 100, max_messages: 2 });
        let target = &mut config.models.get_mut(FAKE_MODEL).unwrap().chain[0];
        (target.input_price_per_mtok, target.output_price_per_mtok) = (Some(1.0), Some(2.0));
        let written = serde_json::to_value(&config).unwrap();
        let mut numbers = BTreeSet::new();
        numeric_leaves(&written, "", &mut numbers);
        let ranged: BTreeSet<String> = numeric_ranges()
            .flat_map(|range| numbers_at(&written, range.path).into_iter().map(|(path, _)| path))
            .collect();
        let unranged: Vec<&String> = numbers.difference(&ranged).collect();
        assert!(unranged.is_empty(), "numeric settings without a range in their section's RANGES: {unranged:?}");
        assert!(numbers.len() > 50, "the walk found only {numbers:?}");
        for range in numeric_ranges() {
            assert!(range.min <= range.max, "{range:?}");
            assert!(!numbers_at(&written, range.path).is_empty(), "{} names no setting", range.path);
        }
    }

    #[test]
    fn a_number_out_of_its_range_is_named_with_the_range() {
        let mut config = Config::default();
        config.tiers.get_mut("pro").unwrap().requests_per_minute = 0;
        let error = config.validate().unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid value for tiers.pro.requests_per_minute: must be between 1 and 1000000000"
        );

        let mut config = Config::default();
        config.agent.retry.max_attempts = 101;
        assert_eq!(field_of(config.validate().unwrap_err()), "agent.retry.max_attempts");

        let mut config = Config::default();
        config.fake_llm.tokens_per_second = f64::NAN;
        assert_eq!(field_of(config.validate().unwrap_err()), "fake_llm.tokens_per_second");

        let mut config = Config::default();
        config.analytics.user_daily_spend_alerts_usd = vec![5.0, -1.0];
        assert_eq!(field_of(config.validate().unwrap_err()), "analytics.user_daily_spend_alerts_usd[1]");

        let mut config = Config::default();
        config.tiers.get_mut("free").unwrap().tokens_per_month = None;
        config.validate().unwrap();
    }

    #[test]
    fn bad_log_format_names_the_variable() {
        let mut config = Config::default();
        let error = config.apply_env(|name| (name == "PARLEY_LOG_FORMAT").then(|| "xml".to_owned())).unwrap_err();
        assert_eq!(field_of(error), "PARLEY_LOG_FORMAT");
    }
}
