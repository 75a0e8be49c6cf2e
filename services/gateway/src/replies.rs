//! The reply hub: one NATS subscription per gateway to every reply's events, fanned out in memory to the
//! streams and waiting sends this gateway holds.
//!
//! Agents publish each reply's events (deltas, then completed or failed) on the core NATS subject
//! `<prefix>.messages.<message id>`. Rather than one subscription or JetStream consumer per open stream,
//! which makes NATS's work grow with the number of clients, the hub subscribes once to
//! `<prefix>.messages.>` and keeps, for every reply it has seen recently, the deltas so far and the
//! watchers to hand new events to. A stream that opens a moment after the agent's first delta (the
//! common race between chat's answer and the stream's start) still gets every delta from memory.
//!
//! The hub only answers for what it can vouch for: a reply whose deltas it holds without a gap from the
//! point a client asks for, or a reply created after the subscription started and too recently for its
//! record to have been dropped (so no event can have been missed). Anything else (a gateway that
//! started mid-reply, a resume long after the end, a gap from a NATS reconnect) is read from the
//! `<PREFIX>_EVENTS` JetStream stream by the caller instead, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use parley_platform::backoff::Backoff;
use parley_platform::events::{MessageEvent, StoredReply};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long a reply's record is kept after its last event when nobody watches it. Long enough for a
/// client that dropped to reconnect to this gateway and resume from memory.
const IDLE_RETENTION: Duration = Duration::from_secs(60);
/// A reply with no record is known to have had no events only if it is younger than this (and younger
/// than the subscription): an older record may have been dropped.
const FRESH_FOR: Duration = Duration::from_secs(30);
/// Allowance for the clocks of the database that stamps replies and of this gateway differing.
const CLOCK_MARGIN: Duration = Duration::from_secs(1);
/// How often records past their retention are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// What a watcher receives.
#[derive(Debug, Clone, PartialEq)]
pub enum HubEvent {
    Delta {
        index: u64,
        text: Arc<str>,
    },
    /// The reply starts again: the text of the deltas before `index` is void (an agent took over a job
    /// whose earlier attempt died mid-reply).
    Reset {
        index: u64,
    },
    /// The reply ended (completed or failed). A completed one may carry the reply as stored; else the
    /// stored message says how it ended.
    Ended(Option<Arc<StoredReply>>),
}

/// One indexed event of a reply: a piece of text, or a reset that voids the text before it.
#[derive(Clone)]
enum Piece {
    Text(Arc<str>),
    Reset,
}

/// One reply as this gateway has seen it.
#[derive(Default)]
struct ReplyRecord {
    /// The index of `pieces[0]`.
    first_index: u64,
    pieces: Vec<Piece>,
    /// A delta arrived out of sequence: the record cannot vouch for this reply any more.
    broken: bool,
    ended: bool,
    /// The stored reply, when the end carried it.
    reply: Option<Arc<StoredReply>>,
    watchers: Vec<mpsc::UnboundedSender<HubEvent>>,
    touched: Option<Instant>,
}

impl ReplyRecord {
    fn next_index(&self) -> u64 {
        self.first_index + self.pieces.len() as u64
    }

    fn record(&mut self, event: &HubEvent) {
        let (index, piece) = match event {
            HubEvent::Delta { index, text } => (*index, Piece::Text(text.clone())),
            HubEvent::Reset { index } => (*index, Piece::Reset),
            HubEvent::Ended(reply) => {
                self.ended = true;
                self.reply = reply.clone();
                self.watchers.retain(|watcher| watcher.send(event.clone()).is_ok());
                return;
            }
        };
        if self.pieces.is_empty() && !self.broken {
            self.first_index = index;
        }
        if index == self.next_index() {
            self.pieces.push(piece);
        } else if index > self.next_index() {
            self.broken = true;
        }
        // An index below the next one is a copy of one already held: nothing to add.
        self.watchers.retain(|watcher| watcher.send(event.clone()).is_ok());
    }
}

impl Piece {
    fn event(&self, index: u64) -> HubEvent {
        match self {
            Piece::Text(text) => HubEvent::Delta { index, text: text.clone() },
            Piece::Reset => HubEvent::Reset { index },
        }
    }
}

/// A reply being watched: what was already there, then everything new as it comes.
pub struct Watch {
    pub backlog: Vec<HubEvent>,
    pub live: mpsc::UnboundedReceiver<HubEvent>,
}

pub struct ReplyHub {
    records: Mutex<HashMap<Uuid, ReplyRecord>>,
    /// When the subscription was confirmed by the server; `None` until then.
    subscribed_at: Mutex<Option<time::OffsetDateTime>>,
}

impl Default for ReplyHub {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplyHub {
    pub fn new() -> Self {
        Self { records: Mutex::new(HashMap::new()), subscribed_at: Mutex::new(None) }
    }

    fn records(&self) -> MutexGuard<'_, HashMap<Uuid, ReplyRecord>> {
        self.records.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Watches `message_id` from the delta with index `after` on, if the hub can vouch that it holds
    /// every event from there; `None` when the caller must read the recorded events instead.
    /// `created_at` is when the reply was created.
    pub fn watch(&self, message_id: Uuid, after: u64, created_at: time::OffsetDateTime) -> Option<Watch> {
        let subscribed_at = (*self.subscribed_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))?;
        let mut records = self.records();
        let complete_from = match records.get(&message_id) {
            Some(record) if record.broken => return None,
            Some(record) if !record.pieces.is_empty() => record.first_index,
            // A record without deltas (ended, or watched before any delta) holds everything.
            Some(_) => 0,
            None => {
                let now = time::OffsetDateTime::now_utc();
                let fresh = created_at > subscribed_at + CLOCK_MARGIN && now - created_at < FRESH_FOR;
                if !fresh {
                    return None;
                }
                0
            }
        };
        if complete_from > after {
            return None;
        }
        let (sender, live) = mpsc::unbounded_channel();
        let record = records.entry(message_id).or_default();
        let skip = after.saturating_sub(record.first_index) as usize;
        let mut backlog: Vec<HubEvent> = record
            .pieces
            .iter()
            .enumerate()
            .skip(skip)
            .map(|(offset, piece)| piece.event(record.first_index + offset as u64))
            .collect();
        if record.ended {
            backlog.push(HubEvent::Ended(record.reply.clone()));
        }
        record.watchers.push(sender);
        record.touched = Some(Instant::now());
        Some(Watch { backlog, live })
    }

    /// Takes one event from NATS.
    pub fn deliver(&self, message_id: Uuid, event: MessageEvent) {
        let event = match event {
            MessageEvent::Delta { index, text, .. } => HubEvent::Delta { index, text: text.into() },
            MessageEvent::Completed { reply, .. } => HubEvent::Ended(reply.map(Arc::new)),
            MessageEvent::Failed { .. } => HubEvent::Ended(None),
            MessageEvent::Reset { index, .. } => HubEvent::Reset { index },
        };
        let mut records = self.records();
        let record = records.entry(message_id).or_default();
        record.touched = Some(Instant::now());
        record.record(&event);
    }

    /// Drops the records nobody watches that have been quiet for longer than their retention.
    fn sweep(&self, now: Instant) {
        self.records().retain(|_, record| {
            record.watchers.retain(|watcher| !watcher.is_closed());
            let quiet = record.touched.is_none_or(|touched| now.duration_since(touched) > IDLE_RETENTION);
            !(record.watchers.is_empty() && quiet)
        });
    }

    /// Replies currently held, for the gauge.
    fn len(&self) -> usize {
        self.records().len()
    }

    /// Follows every reply's events until `shutdown`, resubscribing when the subscription ends.
    pub async fn follow(self: Arc<Self>, nats: async_nats::Client, subject: String, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !shutdown.is_cancelled() {
            let mut subscriber = match nats.subscribe(subject.clone()).await {
                Ok(subscriber) => subscriber,
                Err(error) => {
                    tracing::warn!(%error, "cannot follow reply events; streams read them from JetStream");
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            // Only once the server has the subscription can a reply created from now on be vouched for.
            if nats.flush().await.is_ok() {
                *self.subscribed_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
                    Some(time::OffsetDateTime::now_utc());
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = sweep.tick() => {
                        self.sweep(Instant::now());
                        metrics::gauge!(crate::metrics::REPLIES_FOLLOWED).set(self.len() as f64);
                    }
                    message = subscriber.next() => {
                        let Some(message) = message else { break };
                        let message_id = message.subject.rsplit('.').next().and_then(|id| Uuid::parse_str(id).ok());
                        let event = serde_json::from_slice::<MessageEvent>(&message.payload).ok();
                        if let (Some(message_id), Some(event)) = (message_id, event) {
                            self.deliver(message_id, event);
                        }
                    }
                }
            }
            // The subscription ended: what arrives while there is none cannot be vouched for.
            *self.subscribed_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
            self.records().clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> ReplyHub {
        let hub = ReplyHub::new();
        *hub.subscribed_at.lock().unwrap() = Some(time::OffsetDateTime::now_utc() - Duration::from_secs(20));
        hub
    }

    fn delta(index: u64, text: &str) -> MessageEvent {
        MessageEvent::Delta { message_id: Uuid::nil(), index, text: text.to_owned() }
    }

    fn texts(events: &[HubEvent]) -> Vec<String> {
        events
            .iter()
            .map(|event| match event {
                HubEvent::Delta { index, text } => format!("{index}:{text}"),
                HubEvent::Reset { index } => format!("{index}:reset"),
                HubEvent::Ended(_) => "end".to_owned(),
            })
            .collect()
    }

    #[test]
    fn a_late_watcher_gets_what_it_missed_then_what_follows() {
        let hub = hub();
        let id = Uuid::now_v7();
        hub.deliver(id, delta(0, "Hel"));
        hub.deliver(id, delta(1, "lo"));
        let mut watch = hub.watch(id, 1, time::OffsetDateTime::now_utc()).unwrap();
        assert_eq!(texts(&watch.backlog), ["1:lo"]);
        hub.deliver(id, delta(2, "!"));
        hub.deliver(id, MessageEvent::Completed { message_id: id, reply: None });
        assert_eq!(watch.live.try_recv().unwrap(), HubEvent::Delta { index: 2, text: "!".into() });
        assert_eq!(watch.live.try_recv().unwrap(), HubEvent::Ended(None));
    }

    #[test]
    fn a_fresh_reply_without_events_is_watched_from_the_start() {
        let hub = hub();
        let id = Uuid::now_v7();
        let mut watch = hub.watch(id, 0, time::OffsetDateTime::now_utc()).unwrap();
        assert!(watch.backlog.is_empty());
        hub.deliver(id, delta(0, "a"));
        assert_eq!(watch.live.try_recv().unwrap(), HubEvent::Delta { index: 0, text: "a".into() });
    }

    #[test]
    fn what_the_hub_cannot_vouch_for_is_left_to_the_recorded_events() {
        let hub = hub();
        let old = time::OffsetDateTime::now_utc() - Duration::from_secs(120);
        // Created before the subscription (or long enough ago that its record may have been dropped).
        assert!(hub.watch(Uuid::now_v7(), 0, old).is_none());
        // Deltas seen only from index 3 on: the first three are not held.
        let id = Uuid::now_v7();
        hub.deliver(id, delta(3, "d"));
        assert!(hub.watch(id, 0, time::OffsetDateTime::now_utc()).is_none());
        assert!(hub.watch(id, 3, time::OffsetDateTime::now_utc()).is_some());
        // A gap: delta 1 never arrived.
        let gapped = Uuid::now_v7();
        hub.deliver(gapped, delta(0, "a"));
        hub.deliver(gapped, delta(2, "c"));
        assert!(hub.watch(gapped, 0, time::OffsetDateTime::now_utc()).is_none());
        // Before the subscription is confirmed, nothing is vouched for.
        assert!(ReplyHub::new().watch(Uuid::now_v7(), 0, time::OffsetDateTime::now_utc()).is_none());
    }

    #[test]
    fn a_repeated_delta_is_held_once() {
        let hub = hub();
        let id = Uuid::now_v7();
        hub.deliver(id, delta(0, "a"));
        hub.deliver(id, delta(0, "a"));
        hub.deliver(id, delta(1, "b"));
        let watch = hub.watch(id, 0, time::OffsetDateTime::now_utc()).unwrap();
        assert_eq!(texts(&watch.backlog), ["0:a", "1:b"]);
    }

    #[test]
    fn a_reset_is_held_in_order_with_the_deltas() {
        let hub = hub();
        let id = Uuid::now_v7();
        hub.deliver(id, delta(0, "a"));
        hub.deliver(id, MessageEvent::Reset { message_id: id, index: 1 });
        hub.deliver(id, delta(2, "b"));
        let watch = hub.watch(id, 0, time::OffsetDateTime::now_utc()).unwrap();
        assert_eq!(texts(&watch.backlog), ["0:a", "1:reset", "2:b"]);
        let watch = hub.watch(id, 1, time::OffsetDateTime::now_utc()).unwrap();
        assert_eq!(texts(&watch.backlog), ["1:reset", "2:b"]);
    }

    #[test]
    fn quiet_unwatched_records_are_dropped() {
        let hub = hub();
        let id = Uuid::now_v7();
        hub.deliver(id, delta(0, "a"));
        hub.sweep(Instant::now());
        assert_eq!(hub.len(), 1);
        hub.sweep(Instant::now() + IDLE_RETENTION + Duration::from_secs(1));
        assert_eq!(hub.len(), 0);
    }
}
