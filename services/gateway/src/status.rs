//! The public status page's facts (`GET /v1/status`, drawn by the web client at `/status`): the state
//! of each component this gateway depends on and the share of recent requests it answered with a
//! server error. Nothing in it is secret or per user: failures are named by component, never by their
//! message. The answer is worked out at most once per `REFRESH` per gateway, so a crowd refreshing the
//! page costs the dependencies nothing more.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;

/// How long one answer is served before the components are checked again.
const REFRESH: Duration = Duration::from_secs(5);

/// The error rate's window, in minutes.
const WINDOW_MINUTES: u64 = 15;

/// A share of server errors above which the service is shown degraded.
const DEGRADED_ERROR_RATIO: f64 = 0.05;

/// Requests and server errors of the last `WINDOW_MINUTES` minutes, by minute.
#[derive(Default)]
pub struct StatusBoard {
    minutes: Mutex<[Minute; WINDOW_MINUTES as usize]>,
    answer: tokio::sync::Mutex<Option<(Instant, StatusView)>>,
}

#[derive(Default, Clone, Copy)]
struct Minute {
    /// Minutes since the Unix epoch.
    at: u64,
    requests: u64,
    server_errors: u64,
}

fn this_minute() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs() / 60)
}

/// The platform as a visitor of the status page sees it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StatusView {
    /// "operational", "degraded" (working, with some parts down or errors above 5%) or "outage".
    pub status: &'static str,
    pub components: Vec<ComponentView>,
    pub error_rate: ErrorRateView,
    pub checked_at: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ComponentView {
    /// Stable identifier: api, database, accounts, conversations, quotas, usage, messaging, cache,
    /// replies (a check this page has no name for keeps its own).
    pub id: String,
    /// What it is to a user.
    pub name: String,
    /// "operational", "degraded" or "outage".
    pub status: &'static str,
}

/// Requests this gateway answered in the window, and those it answered with a 5xx.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorRateView {
    pub window_seconds: u64,
    pub requests: u64,
    pub server_errors: u64,
    /// server_errors / requests (0 when there were none).
    pub ratio: f64,
}

impl StatusBoard {
    /// Counts one answered API request.
    pub fn record(&self, server_error: bool) {
        let now = this_minute();
        let mut minutes = self.minutes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let minute = &mut minutes[(now % WINDOW_MINUTES) as usize];
        if minute.at != now {
            *minute = Minute { at: now, ..Minute::default() };
        }
        minute.requests += 1;
        minute.server_errors += u64::from(server_error);
    }

    fn error_rate(&self) -> ErrorRateView {
        let now = this_minute();
        let minutes = *self.minutes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let recent = minutes.iter().filter(|minute| minute.at + WINDOW_MINUTES > now);
        let (requests, server_errors) = recent
            .fold((0, 0), |(requests, errors), minute| (requests + minute.requests, errors + minute.server_errors));
        let ratio = if requests == 0 { 0.0 } else { server_errors as f64 / requests as f64 };
        ErrorRateView { window_seconds: WINDOW_MINUTES * 60, requests, server_errors, ratio }
    }

    /// The current answer, worked out again when the last is older than `REFRESH`.
    pub async fn view(&self, state: &AppState) -> StatusView {
        let mut answer = self.answer.lock().await;
        if let Some((at, view)) = answer.as_ref()
            && at.elapsed() < REFRESH
        {
            return view.clone();
        }
        let view = self.work_out(state).await;
        *answer = Some((Instant::now(), view.clone()));
        view
    }

    async fn work_out(&self, state: &AppState) -> StatusView {
        let mut components =
            vec![ComponentView { id: "api".to_owned(), name: "API".to_owned(), status: "operational" }];
        for (check, required, passed) in state.readiness.check_each().await {
            let (id, name) = match check.as_str() {
                "user" => ("accounts", "Sign-in and accounts"),
                "chat" => ("conversations", "Conversations"),
                "quota" => ("quotas", "Usage limits"),
                "analytics" => ("usage", "Usage reports"),
                "nats" => ("messaging", "Message delivery"),
                "redis" => ("cache", "Rate limits and caches"),
                "postgres" => ("database", "Database"),
                other => (other, other),
            };
            let status = match (passed, required) {
                (true, _) => "operational",
                (false, false) => "degraded",
                (false, true) => "outage",
            };
            components.push(ComponentView { id: id.to_owned(), name: name.to_owned(), status });
        }
        components.push(ComponentView {
            id: "replies".to_owned(),
            name: "AI replies".to_owned(),
            status: replies_status(state).await,
        });
        let error_rate = self.error_rate();
        let worst = |wanted: &str| components.iter().any(|component| component.status == wanted);
        let status = if worst("outage") {
            "outage"
        } else if worst("degraded") || error_rate.ratio > DEGRADED_ERROR_RATIO {
            "degraded"
        } else {
            "operational"
        };
        let checked_at = parley_platform::timestamps::rfc3339(time::OffsetDateTime::now_utc());
        StatusView { status, components, error_rate, checked_at }
    }
}

/// Whether agents are taking jobs, from the jobs consumer they share: one waiting for work or busy
/// with some is operational; none with jobs queued is an outage; none and nothing queued is degraded
/// (the next message would wait). Jobs that agents which died were holding count as busy until their
/// acknowledgement wait passes (`nats.job_ack_wait_secs`), so an outage shows that much late.
async fn replies_status(state: &AppState) -> &'static str {
    let jetstream = async_nats::jetstream::new(state.nats.clone());
    let info = async {
        let stream = jetstream.get_stream(state.names.jobs_stream()).await.ok()?;
        stream.consumer_info(state.names.agent_consumer()).await.ok()
    };
    match tokio::time::timeout(Duration::from_secs(2), info).await {
        Ok(Some(info)) if info.num_waiting > 0 || info.num_ack_pending > 0 => "operational",
        Ok(Some(info)) if info.num_pending == 0 => "degraded",
        _ => "outage",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_rate_counts_the_recent_minutes() {
        let board = StatusBoard::default();
        assert_eq!(board.error_rate().ratio, 0.0);
        for server_error in [false, false, false, true] {
            board.record(server_error);
        }
        let rate = board.error_rate();
        assert_eq!((rate.requests, rate.server_errors, rate.ratio), (4, 1, 0.25));
        // A minute older than the window no longer counts.
        let stale = ((this_minute() + 1) % WINDOW_MINUTES) as usize;
        board.minutes.lock().unwrap()[stale] = Minute { at: 1, requests: 100, server_errors: 100 };
        assert_eq!(board.error_rate().requests, 4);
    }
}
