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
use parley_platform::balance::Balanced;
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
    tasks: Tasks,
}

/// What a task of a running platform is: named in its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Service(Service),
    FakeLlm,
    DatabaseMonitor,
    AdminServer,
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Task::Service(service) => write!(f, "the {} service", service.name()),
            Task::FakeLlm => f.write_str("the fake LLM"),
            Task::DatabaseMonitor => f.write_str("the database monitor"),
            Task::AdminServer => f.write_str("the admin server"),
        }
    }
}

type Tasks = JoinSet<(Task, anyhow::Result<()>)>;

/// Runs `work` as `task` of the platform: its result, or its panic as an error, comes back labelled
/// with what it is.
fn spawn_task(
    tasks: &mut Tasks,
    task: Task,
    work: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) {
    use futures::FutureExt;
    tasks.spawn(async move {
        let result = match std::panic::AssertUnwindSafe(work).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => Err(anyhow::anyhow!("panicked: {}", panic_message(panic.as_ref()))),
        };
        (task, result)
    });
}

/// What a panic said, when it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// A service's server, until it stops.
type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// Applies every schema's migrations (idempotent).
pub async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    parley_user::migrate(pool).await.context("failed to migrate the identity schema")?;
    parley_chat::migrate(pool).await.context("failed to migrate the chat schema")?;
    parley_quota::migrate(pool).await.context("failed to migrate the quota schema")?;
    parley_analytics::migrate(pool).await.context("failed to migrate the analytics schema")?;
    Ok(())
}

/// Creates the database if needed and applies every schema's migrations.
async fn create_and_migrate(url: &str) -> anyhow::Result<()> {
    parley_platform::db::ensure_database(url).await.context("failed to create the database")?;
    let pool = sqlx::PgPool::connect(url).await.context("failed to connect to postgres")?;
    migrate(&pool).await?;
    pool.close().await;
    Ok(())
}

/// What the services of one process share: connections made once, for the services that need them.
struct Shared {
    services: Vec<Service>,
    database: Option<Arc<Database>>,
    nats: Option<async_nats::Client>,
    redis: Option<redis::aio::ConnectionManager>,
    providers: Option<Arc<BTreeMap<String, parley_agent::ProviderHandle>>>,
    channels: Channels,
}

/// A lazily connecting channel to each gRPC service.
struct Channels {
    user: Balanced,
    chat: Balanced,
    quota: Balanced,
    analytics: Balanced,
    agent: Balanced,
}

impl Channels {
    fn new(config: &Config) -> anyhow::Result<Self> {
        let channel = |url: &str| lazy_channel(url).with_context(|| format!("invalid gRPC address {url}"));
        Ok(Self {
            user: channel(&config.grpc.user_url)?,
            chat: channel(&config.grpc.chat_url)?,
            quota: channel(&config.grpc.quota_url)?,
            analytics: channel(&config.grpc.analytics_url)?,
            agent: channel(&config.grpc.agent_url)?,
        })
    }
}

impl Shared {
    /// Connects what `services` need; the database's replica monitor joins `tasks`.
    async fn connect(
        config: &Arc<Config>,
        services: &[Service],
        tasks: &mut Tasks,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let needs = |wanted: &[Service]| services.iter().any(|service| wanted.contains(service));
        let database = if services.iter().any(|service| service.uses_postgres()) {
            let database = Arc::new(Database::connect_lazy(&config.database).context("invalid database URL")?);
            let (monitored, stop) = (database.clone(), shutdown.child_token());
            spawn_task(tasks, Task::DatabaseMonitor, async move {
                monitored.monitor(stop).await;
                Ok(())
            });
            Some(database)
        } else {
            None
        };
        let nats = if needs(&[Service::Chat, Service::Analytics, Service::Agent, Service::Gateway, Service::Quota]) {
            Some(parley_platform::nats::connect(&config.nats, "parley").await.context("failed to connect to NATS")?)
        } else {
            None
        };
        let redis = if needs(&[Service::Quota, Service::Agent, Service::Chat, Service::Gateway]) {
            match parley_platform::redis_pool::connect(&config.redis.url).await {
                Ok(connection) => Some(connection),
                // The agent only caches in Redis, chat only keeps write marks there, and the gateway
                // only reports it in its readiness (its rate limits keep a connection of their own):
                // they can start without it (a local cache; reads from the primary; local limits).
                // Quota cannot.
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
            if needs(&[Service::Agent]) { Some(Arc::new(parley_agent::build_providers(config)?)) } else { None };
        let channels = Channels::new(config)?;
        Ok(Self { services: services.to_vec(), database, nats, redis, providers, channels })
    }

    fn needs(&self, wanted: &[Service]) -> bool {
        self.services.iter().any(|service| wanted.contains(service))
    }

    fn pool(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(self.database()?.primary().clone())
    }

    fn database(&self) -> anyhow::Result<Arc<Database>> {
        self.database.clone().ok_or_else(|| missing("postgres"))
    }

    fn nats(&self) -> anyhow::Result<async_nats::Client> {
        self.nats.clone().ok_or_else(|| missing("NATS"))
    }

    /// What `/readyz` checks: the dependencies of these services, and the peers they cannot work without.
    fn readiness(&self) -> Readiness {
        let mut readiness = Readiness::new();
        if let Some(database) = &self.database {
            readiness = readiness.with_check("postgres", health::postgres_check(database.primary().clone()));
        }
        // Quota reads NATS only to settle usage events, which wait in the stream while it is away: a
        // process that runs quota alone stays ready without it.
        if let Some(nats) = &self.nats
            && self.needs(&[Service::Chat, Service::Analytics, Service::Agent, Service::Gateway])
        {
            readiness = readiness.with_check("nats", health::nats_check(nats.clone()));
        }
        // Every service degrades around Redis (local rate limits, conservative budgets, a local cache,
        // reads from the primary); the gateway around the user service (tokens verify locally, API keys
        // are cached) and analytics (only usage reports need it).
        if let Some(redis) = &self.redis {
            readiness = readiness.with_degradable("redis", health::redis_check(redis.clone()));
        }
        let channels = &self.channels;
        if self.needs(&[Service::Gateway]) {
            readiness = readiness
                .with_degradable("user", health::grpc_check(channels.user.clone(), parley_user::HEALTH_NAME))
                .with_check("chat", health::grpc_check(channels.chat.clone(), parley_chat::HEALTH_NAME))
                .with_check("quota", health::grpc_check(channels.quota.clone(), parley_quota::HEALTH_NAME))
                .with_degradable(
                    "analytics",
                    health::grpc_check(channels.analytics.clone(), parley_analytics::HEALTH_NAME),
                );
        } else if self.needs(&[Service::Agent]) {
            readiness = readiness
                .with_check("chat", health::grpc_check(channels.chat.clone(), parley_chat::HEALTH_NAME))
                .with_check("quota", health::grpc_check(channels.quota.clone(), parley_quota::HEALTH_NAME));
        }
        if let Some(providers) = &self.providers {
            let providers = providers.clone();
            readiness =
                readiness.with_info("providers", move || serde_json::json!(parley_agent::breaker_states(&providers)));
        }
        readiness
    }
}

fn missing(what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what} is required but was not set up")
}

impl Platform {
    pub async fn launch(mut config: Config, options: LaunchOptions) -> anyhow::Result<Platform> {
        let shutdown = CancellationToken::new();
        let mut services = options.services.clone();
        services.sort();
        services.dedup();
        if options.migrate {
            create_and_migrate(&config.database.url).await?;
        }
        let mut tasks = Tasks::new();
        let fake_llm = match options.fake_llm {
            true => Some(start_fake_llm(&mut config, &mut tasks, &shutdown).await?),
            false => None,
        };
        let mut grpc_listeners = bind_grpc_listeners(&mut config, &services, options.grpc_bind).await?;
        let config = Arc::new(config);
        let shared = Shared::connect(&config, &services, &mut tasks, &shutdown).await?;
        let readiness = shared.readiness();

        // The agent serves its completions beside its job loop, started below.
        let agent_listener = grpc_listeners.remove(&Service::Agent);
        for (service, listener) in grpc_listeners {
            let serving = serve_grpc(service, listener, &config, &shared, shutdown.child_token()).await?;
            spawn_task(&mut tasks, Task::Service(service), serving);
        }
        if let Some(providers) = shared.providers.clone() {
            start_agent(&config, providers, &shared, agent_listener, &mut tasks, &shutdown)?;
        }
        let http_addr = match services.contains(&Service::Gateway) {
            true => {
                Some(start_gateway(&config, options.http_listener, &shared, &readiness, &mut tasks, &shutdown).await?)
            }
            false => None,
        };
        let admin_addr = match options.admin_server {
            true => Some(start_admin_server(&config, &readiness, &mut tasks, &shutdown).await?),
            false => None,
        };
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

/// Starts the built-in fake LLM and points `fake` providers without a base URL at it.
async fn start_fake_llm(
    config: &mut Config,
    tasks: &mut Tasks,
    shutdown: &CancellationToken,
) -> anyhow::Result<(parley_fake_llm::FakeLlm, SocketAddr)> {
    let listener = TcpListener::bind(&config.fake_llm.addr).await.context("failed to bind the fake LLM")?;
    let addr = listener.local_addr()?;
    let fake = parley_fake_llm::FakeLlm::from_config(&config.fake_llm);
    config.point_fake_providers_at(&format!("http://{addr}/v1"));
    let (server, stop) = (fake.clone(), shutdown.clone());
    spawn_task(tasks, Task::FakeLlm, async move {
        parley_fake_llm::serve(server, listener, stop).await.map_err(Into::into)
    });
    Ok((fake, addr))
}

/// Starts the agent: its job loop, and its completions served on `listener` beside it.
fn start_agent(
    config: &Arc<Config>,
    providers: Arc<BTreeMap<String, parley_agent::ProviderHandle>>,
    shared: &Shared,
    listener: Option<TcpListener>,
    tasks: &mut Tasks,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let nats = shared.nats()?;
    let chat = ChatServiceClient::new(with_context(shared.channels.chat.clone()));
    let quota = QuotaServiceClient::new(with_context(shared.channels.quota.clone()));
    let (config, stop, redis) = (config.clone(), shutdown.child_token(), shared.redis.clone());
    let run = parley_agent::run(config, providers, nats, redis, chat, quota, listener, stop);
    spawn_task(tasks, Task::Service(Service::Agent), run);
    Ok(())
}

/// Binds every gRPC listener first and tells the configuration where each service listens, so each
/// service's peers know where to reach it.
async fn bind_grpc_listeners(
    config: &mut Config,
    services: &[Service],
    bind: GrpcBind,
) -> anyhow::Result<BTreeMap<Service, TcpListener>> {
    let mut listeners = BTreeMap::new();
    for service in services.iter().copied().filter(|service| service.serves_grpc()) {
        let addr = match bind {
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
        listeners.insert(service, listener);
    }
    Ok(listeners)
}

/// Builds one gRPC service (user, chat, quota or analytics): the future that serves it until `stop`.
async fn serve_grpc(
    service: Service,
    listener: TcpListener,
    config: &Arc<Config>,
    shared: &Shared,
    stop: CancellationToken,
) -> anyhow::Result<Serving> {
    let config = config.clone();
    Ok(match service {
        Service::User => {
            let user = parley_user::build(config, shared.pool()?).await.context("failed to start the user service")?;
            Box::pin(parley_user::serve(user, listener, stop))
        }
        Service::Chat => {
            let marks = WriteMarks::new(shared.database()?, shared.redis.clone(), &config.redis.key_prefix);
            Box::pin(parley_chat::serve(config, marks, shared.nats()?, listener, stop))
        }
        Service::Quota => {
            let redis = shared.redis.clone().ok_or_else(|| missing("redis"))?;
            Box::pin(parley_quota::serve(config, shared.pool()?, redis, shared.nats()?, listener, stop))
        }
        Service::Analytics => {
            Box::pin(parley_analytics::serve(config, shared.database()?, shared.nats()?, listener, stop))
        }
        Service::Gateway | Service::Agent => unreachable!("{} is not started as a plain gRPC service", service.name()),
    })
}

/// Starts the REST gateway on `listener` (else on `http.addr`); the address it serves.
async fn start_gateway(
    config: &Arc<Config>,
    listener: Option<TcpListener>,
    shared: &Shared,
    readiness: &Readiness,
    tasks: &mut Tasks,
    shutdown: &CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = match listener {
        Some(listener) => listener,
        None => TcpListener::bind(&config.http.addr)
            .await
            .with_context(|| format!("failed to bind PARLEY_HTTP_ADDR {}", config.http.addr))?,
    };
    let addr = listener.local_addr()?;
    let channels = &shared.channels;
    let backends = parley_gateway::Backends {
        user: UserServiceClient::new(with_context(channels.user.clone())),
        chat: ChatServiceClient::new(with_context(channels.chat.clone()))
            .max_decoding_message_size(parley_platform::grpc::MAX_CHAT_MESSAGE_BYTES),
        quota: QuotaServiceClient::new(with_context(channels.quota.clone())),
        analytics: AnalyticsServiceClient::new(with_context(channels.analytics.clone())),
        agent: AgentServiceClient::new(with_context(channels.agent.clone())),
    };
    let state = parley_gateway::AppState::new(config.clone(), backends, shared.nats()?, readiness.clone());
    let stop = shutdown.child_token();
    spawn_task(tasks, Task::Service(Service::Gateway), parley_gateway::serve(state, listener, stop));
    Ok(addr)
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `http.admin_addr` (services without HTTP of their own).
async fn start_admin_server(
    config: &Config,
    readiness: &Readiness,
    tasks: &mut Tasks,
    shutdown: &CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(&config.http.admin_addr)
        .await
        .with_context(|| format!("failed to bind PARLEY_ADMIN_ADDR {}", config.http.admin_addr))?;
    let addr = listener.local_addr()?;
    let router = health::admin_router(readiness.clone());
    let stop = shutdown.child_token();
    spawn_task(tasks, Task::AdminServer, async move {
        parley_platform::net::serve_http(listener, router, stop.cancelled_owned()).await.map_err(Into::into)
    });
    Ok(addr)
}

fn task_error(joined: Result<(Task, anyhow::Result<()>), tokio::task::JoinError>) -> Option<anyhow::Error> {
    match joined {
        Ok((_, Ok(()))) => None,
        Ok((task, Err(error))) => Some(error.context(format!("{task} failed"))),
        // Every task catches its own panic (spawn_task); this is a task aborted from outside.
        Err(error) => Some(anyhow::Error::from(error).context("a task of the platform was cancelled")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_task_is_named_for_what_it_is() {
        let failed = |task| task_error(Ok((task, Err(anyhow::anyhow!("boom"))))).map(|error| error.to_string());
        assert_eq!(failed(Task::FakeLlm).as_deref(), Some("the fake LLM failed"));
        assert_eq!(failed(Task::DatabaseMonitor).as_deref(), Some("the database monitor failed"));
        assert_eq!(failed(Task::AdminServer).as_deref(), Some("the admin server failed"));
        assert_eq!(failed(Task::Service(Service::Gateway)).as_deref(), Some("the api-gateway service failed"));
        assert!(task_error(Ok((Task::Service(Service::Chat), Ok(())))).is_none());
    }

    #[tokio::test]
    async fn a_panicking_task_is_named_too() {
        let mut tasks = Tasks::new();
        spawn_task(&mut tasks, Task::DatabaseMonitor, async { panic!("lost the plot") });
        let error = task_error(tasks.join_next().await.unwrap()).unwrap();
        assert_eq!(format!("{error:#}"), "the database monitor failed: panicked: lost the plot");
    }
}
