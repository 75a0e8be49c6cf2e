//! Starts any subset of Parley's six services in one process: all of them for `parley dev` and the
//! end-to-end tests, one for `parley serve <service>` (one per Kubernetes Deployment).
//!
//! Even in one process every service listens on its own gRPC port and the others reach it over the
//! network, so the wire path under `parley dev` is the production path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use parley_platform::Config;
use parley_platform::config::ProviderKind;
use parley_platform::grpc::{lazy_channel, with_context};
use parley_platform::health::{self, Readiness};
use parley_platform::replicas::{Database, WriteMarks};
use parley_proto::agent::v1::agent_service_client::AgentServiceClient;
use parley_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use parley_proto::chat::v1::chat_service_client::ChatServiceClient;
use parley_proto::quota::v1::quota_service_client::QuotaServiceClient;
use parley_proto::user::v1::user_service_client::UserServiceClient;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The six services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Service {
    #[value(name = "api-gateway")]
    Gateway,
    User,
    Chat,
    Quota,
    Analytics,
    Agent,
}

impl Service {
    pub const ALL: [Service; 6] =
        [Service::User, Service::Chat, Service::Quota, Service::Analytics, Service::Agent, Service::Gateway];

    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => "api-gateway",
            Service::User => "user",
            Service::Chat => "chat",
            Service::Quota => "quota",
            Service::Analytics => "analytics",
            Service::Agent => "agent",
        }
    }

    fn serves_grpc(self) -> bool {
        !matches!(self, Service::Gateway)
    }

    fn uses_postgres(self) -> bool {
        matches!(self, Service::User | Service::Chat | Service::Quota | Service::Analytics)
    }
}

/// Where the gRPC services of this process listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcBind {
    /// Each service on its own ephemeral loopback port; peers are told the addresses (dev, tests).
    EphemeralLoopback,
    /// The one service of this process on `grpc.addr` (serve).
    Configured,
}

pub struct LaunchOptions {
    pub services: Vec<Service>,
    pub grpc_bind: GrpcBind,
    /// The gateway's listener; when `None` it binds `http.addr`.
    pub http_listener: Option<TcpListener>,
    /// Serve `/healthz`, `/readyz` and `/metrics` on `http.admin_addr` (services without HTTP).
    pub admin_server: bool,
    /// Start the built-in fake LLM and point `fake` providers without a base URL at it.
    pub fake_llm: bool,
    /// Create the database if needed and apply every schema's migrations first.
    pub migrate: bool,
}

/// A running set of services.
pub struct Platform {
    pub config: Arc<Config>,
    pub http_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub fake_llm: Option<(parley_fake_llm::FakeLlm, SocketAddr)>,
    pub readiness: Readiness,
    shutdown: CancellationToken,
    tasks: JoinSet<(Service, anyhow::Result<()>)>,
}

/// Applies every schema's migrations (idempotent).
pub async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    parley_user::migrate(pool).await.context("failed to migrate the identity schema")?;
    parley_chat::migrate(pool).await.context("failed to migrate the chat schema")?;
    parley_quota::migrate(pool).await.context("failed to migrate the quota schema")?;
    parley_analytics::migrate(pool).await.context("failed to migrate the analytics schema")?;
    Ok(())
}

impl Platform {
    pub async fn launch(mut config: Config, options: LaunchOptions) -> anyhow::Result<Platform> {
        let shutdown = CancellationToken::new();
        let mut services = options.services.clone();
        services.sort();
        services.dedup();

        if options.migrate {
            parley_platform::db::ensure_database(&config.database.url)
                .await
                .context("failed to create the database")?;
            let pool = sqlx::PgPool::connect(&config.database.url).await.context("failed to connect to postgres")?;
            migrate(&pool).await?;
            pool.close().await;
        }

        let mut tasks = JoinSet::new();
        let fake_llm = if options.fake_llm {
            let listener = TcpListener::bind(&config.fake_llm.addr).await.context("failed to bind the fake LLM")?;
            let addr = listener.local_addr()?;
            let fake = parley_fake_llm::FakeLlm::from_config(&config.fake_llm);
            for provider in config.providers.values_mut() {
                if provider.kind == ProviderKind::Fake && provider.base_url.is_empty() {
                    provider.base_url = format!("http://{addr}/v1");
                }
            }
            let (server, stop) = (fake.clone(), shutdown.clone());
            tasks.spawn(async move {
                let result = parley_fake_llm::serve(server, listener, stop).await.map_err(anyhow::Error::from);
                (Service::Agent, result.context("fake LLM failed"))
            });
            Some((fake, addr))
        } else {
            None
        };

        // Bind every gRPC listener first, so each service's peers know where to reach it.
        let mut grpc_listeners = BTreeMap::new();
        for service in services.iter().copied().filter(|service| service.serves_grpc()) {
            let addr = match options.grpc_bind {
                GrpcBind::EphemeralLoopback => "127.0.0.1:0",
                GrpcBind::Configured => config.grpc.addr.as_str(),
            };
            let listener = TcpListener::bind(addr).await.with_context(|| format!("failed to bind {addr}"))?;
            let url = format!("http://{}", listener.local_addr()?);
            match service {
                Service::User => config.grpc.user_url = url,
                Service::Chat => config.grpc.chat_url = url,
                Service::Quota => config.grpc.quota_url = url,
                Service::Analytics => config.grpc.analytics_url = url,
                Service::Agent => config.grpc.agent_url = url,
                Service::Gateway => {}
            }
            grpc_listeners.insert(service, listener);
        }
        let config = Arc::new(config);

        let needs = |wanted: &[Service]| services.iter().any(|service| wanted.contains(service));
        let database = if services.iter().any(|service| service.uses_postgres()) {
            let database = Database::connect_lazy(&config.database).context("invalid database URL")?;
            let database = Arc::new(database);
            let (monitored, stop) = (database.clone(), shutdown.child_token());
            let owner = services.first().copied().unwrap_or(Service::Gateway);
            tasks.spawn(async move {
                monitored.monitor(stop).await;
                (owner, Ok(()))
            });
            Some(database)
        } else {
            None
        };
        let pool = database.as_ref().map(|database| database.primary().clone());
        let nats = if needs(&[Service::Chat, Service::Analytics, Service::Agent, Service::Gateway]) {
            Some(parley_platform::nats::connect(&config.nats, "parley").await.context("failed to connect to NATS")?)
        } else {
            None
        };
        let redis = if needs(&[Service::Quota, Service::Agent, Service::Chat]) {
            match parley_platform::redis_pool::connect(&config.redis.url).await {
                Ok(connection) => Some(connection),
                // The agent only caches in Redis and chat only keeps write marks there: both can start
                // without it (a local cache; reads from the primary). Quota cannot.
                Err(error) if !needs(&[Service::Quota]) => {
                    tracing::warn!(%error, "redis unavailable; caches are local and reads go to the primary");
                    None
                }
                Err(error) => return Err(anyhow::Error::from(error).context("failed to connect to redis")),
            }
        } else {
            None
        };
        let providers =
            if needs(&[Service::Agent]) { Some(Arc::new(parley_agent::build_providers(&config)?)) } else { None };

        let channel = |url: &str| lazy_channel(url).with_context(|| format!("invalid gRPC address {url}"));
        let user_channel = channel(&config.grpc.user_url)?;
        let chat_channel = channel(&config.grpc.chat_url)?;
        let quota_channel = channel(&config.grpc.quota_url)?;
        let analytics_channel = channel(&config.grpc.analytics_url)?;
        let agent_channel = channel(&config.grpc.agent_url)?;

        let mut readiness = Readiness::new();
        if let Some(pool) = &pool {
            readiness = readiness.with_check("postgres", health::postgres_check(pool.clone()));
        }
        if let Some(nats) = &nats {
            readiness = readiness.with_check("nats", health::nats_check(nats.clone()));
        }
        if let Some(redis) = &redis {
            readiness = readiness.with_check("redis", health::redis_check(redis.clone()));
        }
        if needs(&[Service::Gateway]) {
            readiness = readiness
                .with_check("user", health::grpc_check(user_channel.clone(), parley_user::HEALTH_NAME))
                .with_check("chat", health::grpc_check(chat_channel.clone(), parley_chat::HEALTH_NAME))
                .with_check("quota", health::grpc_check(quota_channel.clone(), parley_quota::HEALTH_NAME))
                .with_check("analytics", health::grpc_check(analytics_channel.clone(), parley_analytics::HEALTH_NAME));
        } else if needs(&[Service::Agent]) {
            readiness = readiness
                .with_check("chat", health::grpc_check(chat_channel.clone(), parley_chat::HEALTH_NAME))
                .with_check("quota", health::grpc_check(quota_channel.clone(), parley_quota::HEALTH_NAME));
        }
        if let Some(providers) = &providers {
            let providers = providers.clone();
            readiness =
                readiness.with_info("providers", move || serde_json::json!(parley_agent::breaker_states(&providers)));
        }

        let missing = |what: &str| anyhow::anyhow!("{what} is required but was not set up");
        // The agent serves its completions beside its job loop, started below.
        let agent_listener = grpc_listeners.remove(&Service::Agent);
        for (service, listener) in grpc_listeners {
            let stop = shutdown.child_token();
            let config = config.clone();
            let pool = pool.clone().ok_or_else(|| missing("postgres"))?;
            match service {
                Service::User => {
                    let user = parley_user::build(config, pool).await.context("failed to start the user service")?;
                    tasks.spawn(async move { (service, parley_user::serve(user, listener, stop).await) });
                }
                Service::Chat => {
                    let nats = nats.clone().ok_or_else(|| missing("NATS"))?;
                    let database = database.clone().ok_or_else(|| missing("postgres"))?;
                    let marks = WriteMarks::new(database, redis.clone(), &config.redis.key_prefix);
                    tasks
                        .spawn(async move { (service, parley_chat::serve(config, marks, nats, listener, stop).await) });
                }
                Service::Quota => {
                    let redis = redis.clone().ok_or_else(|| missing("redis"))?;
                    tasks.spawn(
                        async move { (service, parley_quota::serve(config, pool, redis, listener, stop).await) },
                    );
                }
                Service::Analytics => {
                    let nats = nats.clone().ok_or_else(|| missing("NATS"))?;
                    let database = database.clone().ok_or_else(|| missing("postgres"))?;
                    tasks.spawn(async move {
                        (service, parley_analytics::serve(config, database, nats, listener, stop).await)
                    });
                }
                Service::Gateway | Service::Agent => {}
            }
        }

        if let Some(providers) = providers {
            let nats = nats.clone().ok_or_else(|| missing("NATS"))?;
            let chat = ChatServiceClient::new(with_context(chat_channel.clone()));
            let quota = QuotaServiceClient::new(with_context(quota_channel.clone()));
            let (config, stop, redis) = (config.clone(), shutdown.child_token(), redis.clone());
            tasks.spawn(async move {
                let run = parley_agent::run(config, providers, nats, redis, chat, quota, agent_listener, stop);
                (Service::Agent, run.await)
            });
        }

        let mut http_addr = None;
        if services.contains(&Service::Gateway) {
            let listener = match options.http_listener {
                Some(listener) => listener,
                None => TcpListener::bind(&config.http.addr)
                    .await
                    .with_context(|| format!("failed to bind PARLEY_HTTP_ADDR {}", config.http.addr))?,
            };
            http_addr = Some(listener.local_addr()?);
            let backends = parley_gateway::Backends {
                user: UserServiceClient::new(with_context(user_channel)),
                chat: ChatServiceClient::new(with_context(chat_channel)),
                quota: QuotaServiceClient::new(with_context(quota_channel)),
                analytics: AnalyticsServiceClient::new(with_context(analytics_channel)),
                agent: AgentServiceClient::new(with_context(agent_channel)),
            };
            let nats = nats.clone().ok_or_else(|| missing("NATS"))?;
            let state = parley_gateway::AppState::new(config.clone(), backends, nats, readiness.clone());
            let stop = shutdown.child_token();
            tasks.spawn(async move { (Service::Gateway, parley_gateway::serve(state, listener, stop).await) });
        }

        let mut admin_addr = None;
        if options.admin_server {
            let listener = TcpListener::bind(&config.http.admin_addr)
                .await
                .with_context(|| format!("failed to bind PARLEY_ADMIN_ADDR {}", config.http.admin_addr))?;
            admin_addr = Some(listener.local_addr()?);
            let router = health::admin_router(readiness.clone());
            let stop = shutdown.child_token();
            let service = services.first().copied().unwrap_or(Service::Gateway);
            tasks.spawn(async move {
                let result = axum::serve(parley_platform::net::without_nagle(listener), router)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                (service, result.context("admin server failed"))
            });
        }

        Ok(Platform { config, http_addr, admin_addr, fake_llm, readiness, shutdown, tasks })
    }

    /// A token that, once cancelled, stops every service.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled or a service ends; then stops the rest.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            Some(joined) = self.tasks.join_next() => {
                if let Some(error) = task_error(joined) {
                    first_error = Some(error);
                }
            }
        }
        self.shutdown.cancel();
        while let Some(joined) = self.tasks.join_next().await {
            if let Some(error) = task_error(joined) {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Ends every service at once, without any of the shutdown steps: what a crash looks like to the
    /// rest of the platform (jobs held are neither finished nor handed back).
    pub async fn kill(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stops every service and waits for them to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

fn task_error(joined: Result<(Service, anyhow::Result<()>), tokio::task::JoinError>) -> Option<anyhow::Error> {
    match joined {
        Ok((_, Ok(()))) => None,
        Ok((service, Err(error))) => Some(error.context(format!("the {} service failed", service.name()))),
        Err(error) => Some(anyhow::Error::from(error).context("a service task panicked")),
    }
}
