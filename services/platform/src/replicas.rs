//! Reads from PostgreSQL streaming replicas, writes to the primary.
//!
//! [`Database`] holds a pool for the primary and one per replica. A monitor measures every replica
//! against the primary each `replica_check_interval_ms`: how many bytes of WAL it has still to replay,
//! and for how long it has been missing something the primary had (its lag in seconds, which stays
//! right on an idle primary, unlike `now() - pg_last_xact_replay_timestamp()`). A replica that is
//! unreachable, is not a standby, or lags beyond `replica_max_lag_ms` leaves the rotation until it
//! is back within the bound. A read that fails on a replica because the replica went away runs again
//! on the primary, so a replica stopping costs a read nothing but a retry.
//!
//! Read-your-writes: after a write, a service records the primary's WAL position for that user in
//! Redis ([`WriteMarks`]); the user's next reads go only to a replica that has replayed that far, or
//! to the primary. Marks expire once every replica still in rotation must have replayed them.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::DatabaseConfig;
use crate::db::{is_unavailable, pool_with};

/// A position in the primary's write-ahead log, in bytes from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFloor {
    /// Any replica in rotation will do.
    Any,
    /// Only a replica that has replayed at least this far.
    AtLeast(Lsn),
    /// Only the primary (freshness cannot be established).
    Primary,
}

/// SQLSTATEs a replica answers with when it cannot serve a read it would normally serve, beyond the
/// server being unavailable (shutting down or still starting: `db::is_unavailable`): a query cancelled
/// by a conflict with recovery.
const REPLICA_TRANSIENT_STATES: &[&str] = &["40001"];

/// Primary samples kept to date a replica's position: at one check a second, ten minutes.
const MAX_SAMPLES: usize = 600;

struct Replica {
    /// `host:port` for metrics and logs (never the credentials).
    label: String,
    pool: PgPool,
    in_rotation: AtomicBool,
    replayed: AtomicU64,
}

/// The primary pool and the replica pools of one process.
pub struct Database {
    primary: PgPool,
    replicas: Vec<Replica>,
    max_lag: Duration,
    check_interval: Duration,
    next: AtomicUsize,
}

impl Database {
    /// Pools that connect on first use: a process starts (and reports not-ready) while PostgreSQL is
    /// down. Replicas start out of rotation until the monitor has measured them.
    pub fn connect_lazy(config: &DatabaseConfig) -> Result<Self, sqlx::Error> {
        let primary = pool_with(&config.url, config.max_connections, config.acquire_timeout_ms)?;
        let mut replicas = Vec::with_capacity(config.replica_urls.len());
        for url in &config.replica_urls {
            let options: PgConnectOptions = url.parse()?;
            replicas.push(Replica {
                label: format!("{}:{}", options.get_host(), options.get_port()),
                pool: pool_with(url, config.replica_max_connections, config.replica_acquire_timeout_ms)?,
                in_rotation: AtomicBool::new(false),
                replayed: AtomicU64::new(0),
            });
        }
        Ok(Self {
            primary,
            replicas,
            max_lag: Duration::from_millis(config.replica_max_lag_ms),
            check_interval: Duration::from_millis(config.replica_check_interval_ms),
            next: AtomicUsize::new(0),
        })
    }

    /// The primary: every write, and every read that must see the latest state.
    pub fn primary(&self) -> &PgPool {
        &self.primary
    }

    pub fn has_replicas(&self) -> bool {
        !self.replicas.is_empty()
    }

    /// How long a write mark must live: until every replica in rotation has surely replayed it.
    pub fn write_mark_ttl(&self) -> Duration {
        self.max_lag + self.check_interval * 2 + Duration::from_secs(1)
    }

    /// The primary's current WAL position; taken after a commit, it covers that commit.
    pub async fn write_position(&self) -> Result<Lsn, sqlx::Error> {
        let (position,): (i64,) = sqlx::query_as("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
            .fetch_one(&self.primary)
            .await?;
        Ok(Lsn(u64::try_from(position).unwrap_or(0)))
    }

    /// Runs `query` on a replica that satisfies `floor`, or on the primary when none does. A replica
    /// that fails because it is unavailable leaves the rotation and the query runs on the primary.
    pub async fn read<T, F, Fut>(&self, floor: ReadFloor, query: F) -> Result<T, sqlx::Error>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        if let Some(replica) = self.pick(floor) {
            match query(replica.pool.clone()).await {
                Ok(value) => {
                    metrics::counter!(crate::metrics::DB_READS, "target" => "replica").increment(1);
                    return Ok(value);
                }
                Err(error) if replica_cannot_serve(&error) => {
                    if replica.in_rotation.swap(false, Ordering::Relaxed) {
                        tracing::warn!(replica = %replica.label, %error, "replica failed a read; out of rotation");
                        metrics::gauge!(crate::metrics::DB_REPLICA_IN_ROTATION, "replica" => replica.label.clone())
                            .set(0.0);
                    }
                    metrics::counter!(crate::metrics::DB_REPLICA_FALLBACKS, "replica" => replica.label.clone())
                        .increment(1);
                }
                Err(error) => return Err(error),
            }
        }
        metrics::counter!(crate::metrics::DB_READS, "target" => "primary").increment(1);
        query(self.primary.clone()).await
    }

    /// The next replica in rotation, round robin, that has replayed at least `floor`.
    fn pick(&self, floor: ReadFloor) -> Option<&Replica> {
        let needed = match floor {
            ReadFloor::Primary => return None,
            ReadFloor::Any => 0,
            ReadFloor::AtLeast(Lsn(position)) => position,
        };
        let count = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count).map(|offset| &self.replicas[(start + offset) % count]).find(|replica| {
            replica.in_rotation.load(Ordering::Relaxed) && replica.replayed.load(Ordering::Relaxed) >= needed
        })
    }

    /// Measures the replicas and exports pool and replica metrics until `shutdown` is cancelled.
    pub async fn monitor(self: Arc<Self>, shutdown: CancellationToken) {
        let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut ticker = tokio::time::interval(self.check_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            export_pool("primary", &self.primary);
            for replica in &self.replicas {
                export_pool(&replica.label, &replica.pool);
            }
            if self.replicas.is_empty() {
                continue;
            }
            match tokio::time::timeout(self.check_interval, self.write_position()).await {
                Ok(Ok(Lsn(position))) => {
                    if samples.len() == MAX_SAMPLES {
                        samples.pop_front();
                    }
                    samples.push_back((Instant::now(), position));
                }
                // Without the primary's position no lag can be measured: keep the last verdicts.
                Ok(Err(error)) => {
                    tracing::debug!(%error, "primary unavailable; replica lag not measured");
                    continue;
                }
                Err(_) => continue,
            }
            for replica in &self.replicas {
                self.check(replica, &samples).await;
            }
        }
    }

    async fn check(&self, replica: &Replica, samples: &VecDeque<(Instant, u64)>) {
        let label = replica.label.clone();
        let probe = sqlx::query_as::<_, (bool, Option<i64>)>(
            "SELECT pg_is_in_recovery(), pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint",
        )
        .fetch_one(&replica.pool);
        let replayed = match tokio::time::timeout(self.check_interval, probe).await {
            Ok(Ok((true, Some(replayed)))) => Some(u64::try_from(replayed).unwrap_or(0)),
            Ok(Ok(_)) => {
                tracing::warn!(replica = %label, "configured as a replica but is not a standby; not used");
                None
            }
            Ok(Err(error)) => {
                tracing::debug!(replica = %label, %error, "replica check failed");
                None
            }
            Err(_) => None,
        };
        metrics::gauge!(crate::metrics::DB_REPLICA_UP, "replica" => label.clone()).set(if replayed.is_some() {
            1.0
        } else {
            0.0
        });
        let in_rotation = match replayed {
            Some(replayed) => {
                replica.replayed.store(replayed, Ordering::Relaxed);
                let primary = samples.back().map_or(replayed, |&(_, position)| position);
                let lag = lag_behind(samples, replayed);
                metrics::gauge!(crate::metrics::DB_REPLICA_LAG_BYTES, "replica" => label.clone())
                    .set(primary.saturating_sub(replayed) as f64);
                metrics::gauge!(crate::metrics::DB_REPLICA_LAG_SECONDS, "replica" => label.clone())
                    .set(lag.as_secs_f64());
                lag <= self.max_lag
            }
            None => false,
        };
        metrics::gauge!(crate::metrics::DB_REPLICA_IN_ROTATION, "replica" => label.clone()).set(if in_rotation {
            1.0
        } else {
            0.0
        });
        let was = replica.in_rotation.swap(in_rotation, Ordering::Relaxed);
        if was != in_rotation {
            if in_rotation {
                tracing::info!(replica = %label, "replica in rotation");
            } else {
                tracing::warn!(replica = %label, "replica out of rotation (unreachable or lagging)");
            }
        }
    }
}

/// How long the replica has been missing WAL the primary had: the age of the oldest primary sample
/// beyond what it has replayed. Zero when it has replayed everything sampled.
fn lag_behind(samples: &VecDeque<(Instant, u64)>, replayed: u64) -> Duration {
    samples.iter().find(|&&(_, position)| position > replayed).map_or(Duration::ZERO, |&(at, _)| at.elapsed())
}

fn replica_cannot_serve(error: &sqlx::Error) -> bool {
    if is_unavailable(error) {
        return true;
    }
    matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|code| REPLICA_TRANSIENT_STATES.contains(&code.as_ref())))
}

fn export_pool(pool_label: &str, pool: &PgPool) {
    let idle = pool.num_idle() as f64;
    let size = f64::from(pool.size());
    metrics::gauge!(crate::metrics::DB_POOL_CONNECTIONS, "pool" => pool_label.to_owned(), "state" => "idle").set(idle);
    metrics::gauge!(crate::metrics::DB_POOL_CONNECTIONS, "pool" => pool_label.to_owned(), "state" => "in_use")
        .set((size - idle).max(0.0));
}

/// The latest write position of each user, shared by every replica of a service through Redis.
#[derive(Clone)]
pub struct WriteMarks {
    redis: Option<redis::aio::ConnectionManager>,
    prefix: String,
    database: Arc<Database>,
}

/// Raises a user's mark to ARGV[1] (never lowers it) and keeps it ARGV[2] ms.
const RAISE_MARK: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
";

impl WriteMarks {
    pub fn new(database: Arc<Database>, redis: Option<redis::aio::ConnectionManager>, key_prefix: &str) -> Self {
        Self { redis, prefix: format!("{key_prefix}:wrote"), database }
    }

    pub fn database(&self) -> &Database {
        &self.database
    }

    /// Records that `user_id` just wrote (call after the commit).
    pub async fn wrote(&self, user_id: Uuid) {
        if !self.database.has_replicas() {
            return;
        }
        let Some(redis) = &self.redis else { return };
        // Without the position, keep the user on the primary until the mark expires.
        let position = match self.database.write_position().await {
            Ok(Lsn(position)) => position,
            Err(error) => {
                tracing::warn!(%error, "could not read the write position; the user reads from the primary");
                i64::MAX as u64
            }
        };
        let ttl = self.database.write_mark_ttl().as_millis().to_string();
        let result: Result<i64, _> = redis::Script::new(RAISE_MARK)
            .key(format!("{}:{user_id}", self.prefix))
            .arg(position.to_string())
            .arg(ttl)
            .invoke_async(&mut redis.clone())
            .await;
        if let Err(error) = result {
            tracing::warn!(%error, "could not record a write mark; later reads may miss this write on a replica");
        }
    }

    /// How fresh `user_id`'s reads must be: past their last write, or the primary while that is unknown.
    pub async fn floor(&self, user_id: Uuid) -> ReadFloor {
        if !self.database.has_replicas() {
            return ReadFloor::Primary;
        }
        let Some(redis) = &self.redis else { return ReadFloor::Primary };
        let mark: Result<Option<String>, _> =
            redis::cmd("GET").arg(format!("{}:{user_id}", self.prefix)).query_async(&mut redis.clone()).await;
        match mark {
            Ok(None) => ReadFloor::Any,
            Ok(Some(position)) => {
                position.parse().map_or(ReadFloor::Primary, |position| ReadFloor::AtLeast(Lsn(position)))
            }
            Err(_) => ReadFloor::Primary,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_position_not_replayed() {
        let now = Instant::now();
        let samples: VecDeque<(Instant, u64)> =
            [(now - Duration::from_secs(3), 100), (now - Duration::from_secs(2), 200), (now, 300)].into();
        assert_eq!(lag_behind(&samples, 300), Duration::ZERO);
        let lag = lag_behind(&samples, 150);
        assert!(lag >= Duration::from_secs(2) && lag < Duration::from_secs(3), "{lag:?}");
        assert!(lag_behind(&samples, 50) >= Duration::from_secs(3));
    }

    #[tokio::test]
    async fn replicas_are_picked_by_rotation_and_position() {
        let config = DatabaseConfig {
            replica_urls: vec!["postgres://r1:5432/db".into(), "postgres://r2:5433/db".into()],
            ..DatabaseConfig::default()
        };
        let database = Database::connect_lazy(&config).unwrap();
        assert!(database.pick(ReadFloor::Any).is_none(), "replicas start out of rotation");
        database.replicas[1].in_rotation.store(true, Ordering::Relaxed);
        database.replicas[1].replayed.store(500, Ordering::Relaxed);
        assert_eq!(database.pick(ReadFloor::Any).map(|r| r.label.as_str()), Some("r2:5433"));
        assert_eq!(database.pick(ReadFloor::AtLeast(Lsn(500))).map(|r| r.label.as_str()), Some("r2:5433"));
        assert!(database.pick(ReadFloor::AtLeast(Lsn(501))).is_none());
        assert!(database.pick(ReadFloor::Primary).is_none());
    }
}
