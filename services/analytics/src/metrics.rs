//! The metrics this crate records, declared once with their descriptions and units. Code records
//! them through these names only; `describe` registers the descriptions with the recorder.

parley_platform::declare_metrics! {
    counter EVENTS_INGESTED = "parley_analytics_events_ingested_total" in Count:
        "Usage events stored (a redelivered event counts once).";
    counter COST_MICRODOLLARS = "parley_analytics_cost_microdollars_total" in Count:
        "Cost of stored usage in millionths of a US dollar, by model.";
    counter COST_ALERTS = "parley_analytics_cost_alerts_total" in Count:
        "Daily spend thresholds crossed, by scope (user, global).";
    counter FEEDBACK = "parley_analytics_feedback_total" in Count:
        "Ratings given to replies (a changed rating counts again), by model and rating (up, down).";
}
