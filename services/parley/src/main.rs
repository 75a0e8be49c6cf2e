//! The `parley` command: parses the command line and starts what was asked. Nothing else lives here.

#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use parley::{GrpcBind, LaunchOptions, Platform, Service};
use parley_platform::Config;
use parley_platform::config::ProviderKind;
use parley_proto::user::v1::user_service_server::UserService as _;
use parley_proto::user::v1::{SetRoleRequest, SetTierRequest};

/// mimalloc rather than glibc's allocator: every request allocates many small, short-lived buffers on
/// several threads (HTTP, gRPC, JSON), where glibc's malloc and free were a tenth of the CPU in profiles.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "parley", version, about = "Parley: a self-hosted backend for AI chat products")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run all six services and the fake LLM in one process, for trying Parley out.
    Dev,
    /// Run one service (one per Kubernetes Deployment).
    Serve {
        #[arg(value_enum)]
        service: Service,
    },
    /// Apply every schema's migrations, then exit.
    Migrate,
    /// Move the messages of conversations idle for N days to the archive table (reads keep working),
    /// and delete what every schema keeps past its retention (the chart's CronJob runs it daily).
    Archive(ArchiveArgs),
    /// Validate the configuration, then exit.
    CheckConfig,
    /// Print every setting: its path, the variable that sets it, and its value as loaded (secrets
    /// hidden).
    Settings,
    /// GET a URL and succeed only on a 2xx answer: a readiness check for images without a shell.
    Probe {
        /// For example http://parley-gateway/readyz.
        url: String,
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
    /// Run the fake OpenAI-compatible LLM on its own.
    FakeLlm(FakeLlmArgs),
    /// Operator commands.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Debug, Args)]
struct ArchiveArgs {
    /// Archive conversations with no activity for this many days.
    #[arg(long, default_value_t = 90)]
    idle_days: u32,
    /// Conversations moved per transaction.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    batch: i64,
    /// Also drop raw usage events older than this many whole months before the current one (their
    /// daily rollups stay, so reports over whole days are unchanged). Unset: keep them all.
    #[arg(long)]
    usage_months: Option<u32>,
    /// Delete the daily usage totals, daily spend and spend alerts of days before this many whole
    /// months before the current one. Unset: keep them all.
    #[arg(long)]
    rollup_months: Option<u32>,
    /// Delete audit-log entries older than this many days.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
    audit_days: u32,
    /// Delete quota ledger rows of days before this many whole months before the current one (budgets
    /// need the current month only).
    #[arg(long, default_value_t = 13, value_parser = clap::value_parser!(u32).range(1..))]
    ledger_months: u32,
    /// Delete conversations (with their messages) with no activity for this many days, and stored
    /// completions made that long ago. Unset: keep them all.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    conversation_days: Option<u32>,
}

#[derive(Debug, Args)]
struct FakeLlmArgs {
    #[arg(long, default_value = "127.0.0.1:8089")]
    addr: String,
    #[arg(long)]
    time_to_first_token_ms: Option<u64>,
    #[arg(long)]
    tokens_per_second: Option<f64>,
    #[arg(long)]
    error_rate: Option<f64>,
    #[arg(long)]
    rate_limit_rate: Option<f64>,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Give an account role `user` or `admin`.
    SetRole {
        #[arg(long)]
        email: String,
        #[arg(long)]
        role: String,
    },
    /// Move an account to another tier.
    SetTier {
        #[arg(long)]
        email: String,
        #[arg(long)]
        tier: String,
    },
    /// Add a new access-token signing key: published at once, signing after the delay (long enough for
    /// every gateway to fetch it); older keys stay published until the tokens they signed expire.
    RotateSigningKey {
        #[arg(long, default_value_t = 600)]
        activate_in_secs: u64,
    },
    /// Bring stored content under the current content key (the first of PARLEY_CONTENT_KEYS): data keys
    /// wrapped by an older key are wrapped again, and conversations from before content was sealed get
    /// a data key and their texts sealed. Run it after adding a new key first in the list, and before
    /// removing the old one. Safe to run again.
    SealContent {
        /// Conversations per transaction.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        batch: i64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::CheckConfig => check_config(),
        Command::Settings => settings(),
        Command::Probe { url, timeout_secs } => probe(&url, Duration::from_secs(timeout_secs)).await,
        Command::Migrate => migrate().await,
        Command::Archive(args) => archive(args).await,
        Command::Dev => dev().await,
        Command::Serve { service } => serve(service).await,
        Command::FakeLlm(args) => fake_llm(args).await,
        Command::Admin(command) => admin(command).await,
    }
}

fn check_config() -> anyhow::Result<()> {
    let config = Config::load()?;
    println!("configuration is valid");
    println!("  models: {}", config.models.keys().cloned().collect::<Vec<_>>().join(", "));
    println!("  default model: {}", config.default_model);
    println!("  tiers: {}", config.tiers.keys().cloned().collect::<Vec<_>>().join(", "));
    if config.auth.secrets_key == parley_platform::config::DEVELOPMENT_SECRETS_KEY {
        println!("warning: PARLEY_SECRETS_KEY is the development default; set your own in production");
    }
    if config.chat.cursor_secret == parley_platform::config::ChatConfig::default().cursor_secret {
        println!("warning: PARLEY_CURSOR_SECRET is the development default; set your own in production");
    }
    if config.chat.content_keys == parley_platform::config::DEVELOPMENT_CONTENT_KEYS {
        println!("warning: PARLEY_CONTENT_KEYS is the development default; set your own in production");
    }
    Ok(())
}

fn settings() -> anyhow::Result<()> {
    /// A value as printed: a URL's password hidden, in lists too.
    fn shown(value: &serde_json::Value) -> String {
        match value {
            serde_json::Value::Null => "(unset)".to_owned(),
            serde_json::Value::String(text) => without_password(text),
            serde_json::Value::Array(items) => format!("[{}]", items.iter().map(shown).collect::<Vec<_>>().join(", ")),
            other => other.to_string(),
        }
    }
    fn without_password(text: &str) -> String {
        match text.split_once("://").zip(text.rfind('@')) {
            Some(((scheme, _), at)) if at > scheme.len() + 3 && text[scheme.len() + 3..at].contains(':') => {
                format!("{scheme}://(hidden){}", &text[at..])
            }
            _ => text.to_owned(),
        }
    }
    let config = Config::load()?;
    for (path, value) in config.settings()? {
        let last = path.rsplit('.').next().unwrap_or_default();
        let secret = last.contains("secret") || last.contains("keys");
        let shown = if secret { "(hidden)".to_owned() } else { shown(&value) };
        println!("{path}  {}  {shown}", Config::variable_for(&path));
    }
    Ok(())
}

async fn migrate() -> anyhow::Result<()> {
    let config = Config::load()?;
    let _telemetry = parley_platform::telemetry::init("parley-migrate", &config.telemetry)?;
    let pool = sqlx::PgPool::connect(&config.database.url).await.context("failed to connect to postgres")?;
    parley::migrate(&pool).await?;
    println!("migrations applied");
    Ok(())
}

async fn probe(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(timeout).build()?;
    let response = client.get(url).send().await.with_context(|| format!("{url} did not answer"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    println!("{status} {body}");
    anyhow::ensure!(status.is_success(), "{url} answered {status}");
    Ok(())
}

/// Archives idle conversations and applies every schema's retention: one command, so that the chart's
/// one CronJob keeps the whole database bounded.
async fn archive(args: ArchiveArgs) -> anyhow::Result<()> {
    let config = Config::load()?;
    let _telemetry = parley_platform::telemetry::init("parley-archive", &config.telemetry)?;
    let pool = sqlx::PgPool::connect(&config.database.url).await.context("failed to connect to postgres")?;
    let archived = parley_chat::archive_idle(&pool, args.idle_days, args.batch).await.context("archiving failed")?;
    println!(
        "archived {} conversations idle for {} days or more ({} messages moved)",
        archived.conversations, args.idle_days, archived.messages
    );
    if let Some(months) = args.usage_months {
        let today = time::OffsetDateTime::now_utc().date();
        let dropped = parley_analytics::drop_old_usage_partitions(&pool, today, months)
            .await
            .context("dropping old usage partitions failed")?;
        println!("dropped {} usage event partitions older than {months} months: {}", dropped.len(), dropped.join(", "));
    }
    // Retention: what every service's schema holds that grows without bound.
    let identity = parley_user::prune(&pool, args.audit_days).await.context("identity retention failed")?;
    println!(
        "identity: {} expired refresh tokens, {} audit entries older than {} days, {} retired signing keys deleted",
        identity.refresh_tokens, identity.audit_entries, args.audit_days, identity.signing_keys
    );
    let chat = parley_chat::prune(&pool, args.conversation_days).await.context("chat retention failed")?;
    println!(
        "chat: {} idempotency keys past 24 hours, {} conversations idle for {days} and {} stored completions older than {days} deleted",
        chat.idempotency_keys,
        chat.conversations,
        chat.stored_completions,
        days = args.conversation_days.map_or_else(|| "ever (kept)".to_owned(), |days| format!("{days} days"))
    );
    let ledger = parley_quota::prune(&pool, args.ledger_months).await.context("quota retention failed")?;
    println!("quota: {ledger} ledger rows older than {} months deleted", args.ledger_months);
    let analytics = parley_analytics::prune(&pool, args.rollup_months).await.context("analytics retention failed")?;
    println!(
        "analytics: {} daily totals, {} spend days, {} spend alerts, {} erased-account records deleted",
        analytics.daily_rows, analytics.spend_days, analytics.cost_alerts, analytics.erased_users
    );
    Ok(())
}

async fn dev() -> anyhow::Result<()> {
    let config = Config::load()?;
    let telemetry = parley_platform::telemetry::init("parley-dev", &config.telemetry)?;
    let options = LaunchOptions {
        services: Service::ALL.to_vec(),
        grpc_bind: GrpcBind::EphemeralLoopback,
        http_listener: None,
        admin_server: false,
        fake_llm: true,
        migrate: true,
    };
    let platform = Platform::launch(config, options).await?;
    let shutdown = parley_platform::shutdown::on_signal();
    let stop = platform.shutdown_token();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stop.cancel();
    });
    if let Some(addr) = platform.http_addr {
        let model = &platform.config.default_model;
        let served_by_fake =
            platform.config.models.get(model).and_then(|model| model.chain.first()).is_some_and(|target| {
                platform
                    .config
                    .providers
                    .get(&target.provider)
                    .is_some_and(|provider| provider.kind == ProviderKind::Fake)
            });
        let what =
            if served_by_fake { "the built-in fake LLM; no API key needed" } else { "from its configured providers" };
        print_walkthrough(&format!("http://{addr}"), model, what);
    }
    let result = platform.wait().await;
    telemetry.shutdown();
    result
}

fn print_walkthrough(base: &str, model: &str, served_by: &str) {
    println!(
        r#"
Parley is running: all six services in this process, each on its own gRPC port.
  web client   {base}/   (status page at {base}/status)
  REST API     {base}   (OpenAPI at {base}/openapi.json)
  health       {base}/healthz  {base}/readyz
  metrics      {base}/metrics
  model        {model} ({served_by})

Try it:
  TOKEN=$(curl -s {base}/v1/auth/register -H 'content-type: application/json' \
      -d '{{"email":"ada@example.com","password":"correct horse battery"}}' | jq -r .access_token)
  # (already registered? use /v1/auth/login with the same body)
  CONV=$(curl -s {base}/v1/conversations -H "authorization: Bearer $TOKEN" \
      -H 'content-type: application/json' -d '{{"title":"First chat"}}' | jq -r .id)
  curl -s {base}/v1/conversations/$CONV/messages -H "authorization: Bearer $TOKEN" \
      -H 'content-type: application/json' -d '{{"content":"Hello, Parley!"}}' | jq
  curl -s {base}/v1/usage -H "authorization: Bearer $TOKEN" | jq

Stop with Ctrl-C."#
    );
}

async fn serve(service: Service) -> anyhow::Result<()> {
    let config = Config::load()?;
    let telemetry = parley_platform::telemetry::init(&format!("parley-{}", service.name()), &config.telemetry)?;
    let options = LaunchOptions {
        services: vec![service],
        grpc_bind: GrpcBind::Configured,
        http_listener: None,
        admin_server: service != Service::Gateway,
        fake_llm: false,
        migrate: false,
    };
    let platform = Platform::launch(config, options).await?;
    tracing::info!(service = service.name(), "service started");
    let shutdown = parley_platform::shutdown::on_signal();
    let stop = platform.shutdown_token();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stop.cancel();
    });
    let result = platform.wait().await;
    telemetry.shutdown();
    result
}

async fn fake_llm(args: FakeLlmArgs) -> anyhow::Result<()> {
    let mut config = Config::load()?.fake_llm;
    config.time_to_first_token_ms = args.time_to_first_token_ms.unwrap_or(config.time_to_first_token_ms);
    config.tokens_per_second = args.tokens_per_second.unwrap_or(config.tokens_per_second);
    config.error_rate = args.error_rate.unwrap_or(config.error_rate);
    config.rate_limit_rate = args.rate_limit_rate.unwrap_or(config.rate_limit_rate);
    let listener =
        tokio::net::TcpListener::bind(&args.addr).await.with_context(|| format!("failed to bind {}", args.addr))?;
    println!("fake LLM listening on http://{}/v1", listener.local_addr()?);
    let shutdown = parley_platform::shutdown::on_signal();
    parley_fake_llm::serve(parley_fake_llm::FakeLlm::from_config(&config), listener, shutdown).await?;
    Ok(())
}

/// Runs the user service's own handlers in-process, so the command line follows the API's rules.
async fn admin(command: AdminCommand) -> anyhow::Result<()> {
    let config = Arc::new(Config::load()?);
    let users_config = config.clone();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(5))
        .connect(&config.database.url)
        .await
        .context("failed to connect to postgres")?;
    let users = parley_user::build(users_config, pool.clone()).await?;
    let user = match command {
        AdminCommand::SetRole { email, role } => {
            let request = SetRoleRequest { email, user_id: String::new(), role, actor_id: String::new() };
            users.set_role(tonic::Request::new(request)).await
        }
        AdminCommand::SealContent { batch } => {
            let keyring = parley_platform::envelope::Keyring::new(&config.chat.content_keys)?;
            let sealed = parley_chat::seal_stored(&pool, &keyring, batch).await.context("sealing content failed")?;
            println!(
                "content keys: {} data keys and {} search keys wrapped again with {:?}, {} conversations given a data \
                 key, {} texts sealed, {} texts put in the search index",
                sealed.rewrapped,
                sealed.search_keys,
                keyring.current(),
                sealed.keyed,
                sealed.texts,
                sealed.indexed
            );
            return Ok(());
        }
        AdminCommand::RotateSigningKey { activate_in_secs } => {
            let kid = users.rotate_signing_key(Duration::from_secs(activate_in_secs)).await?;
            println!("new signing key {kid}: published now, signing in {activate_in_secs} s");
            return Ok(());
        }
        AdminCommand::SetTier { email, tier } => {
            let request = SetTierRequest {
                email,
                user_id: String::new(),
                tier,
                actor_id: String::new(),
                client_ip: String::new(),
            };
            users.set_tier(tonic::Request::new(request)).await
        }
    };
    let user = user.map_err(|status| anyhow::anyhow!("{}", parley_platform::ServiceError::from(status).message))?;
    let user = user.into_inner();
    announce_account(&config, &user).await;
    println!("{}: role {}, tier {}", user.email, user.role, user.tier);
    Ok(())
}

/// Tells running gateways about the account's tier, so a change applies on its next request. Best
/// effort: without NATS the change applies with the user's next token.
async fn announce_account(config: &Config, user: &parley_proto::user::v1::User) {
    let Ok(user_id) = uuid::Uuid::parse_str(&user.id) else {
        return;
    };
    let names = parley_platform::nats::Names::new(&config.nats.prefix);
    let connect =
        async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2)).connect(&config.nats.url);
    let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(3), connect).await else {
        eprintln!("note: NATS unreachable; the change applies with the user's next access token");
        return;
    };
    let _sent = parley_platform::nats::announce_account_change(&client, &names, user_id, &user.tier, &user.role).await;
    let _flushed = client.flush().await;
}
