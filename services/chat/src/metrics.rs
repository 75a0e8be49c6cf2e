//! The metrics this crate records, declared once with their descriptions and units. Code records
//! them through these names only; `describe` registers the descriptions with the recorder.

parley_platform::declare_metrics! {
    counter MESSAGES_SENT = "parley_chat_messages_sent_total" in Count: "Messages stored with a job for their reply.";
    counter MESSAGES_COMPLETED = "parley_chat_messages_completed_total" in Count: "Replies stored complete.";
    counter MESSAGES_FAILED = "parley_chat_messages_failed_total" in Count: "Replies stored failed.";
    counter SUMMARIES_UPDATED = "parley_chat_summaries_updated_total" in Count:
        "Running summaries replaced by one covering more of the conversation.";
    counter OUTBOX_PUBLISHED = "parley_chat_outbox_published_total" in Count:
        "Jobs JetStream acknowledged, whether published by their send or by the sweep.";
    counter OUTBOX_SWEPT = "parley_chat_outbox_swept_total" in Count:
        "Jobs only the outbox sweep published: their send did not (a replica died, NATS was down, ...).";
    counter OUTBOX_LEFT_TO_SWEEP = "parley_chat_outbox_left_to_sweep_total" in Count:
        "Committed jobs handed to the sweep because the relay queue was full.";
    counter OUTBOX_PUBLISH_ERRORS = "parley_chat_outbox_publish_errors_total" in Count:
        "Failed attempts to publish jobs; they stay in the outbox and are published again.";
}
