//! The metrics this crate records, declared once with their descriptions and units. Code records
//! them through these names only; `describe` registers the descriptions with the recorder.

parley_platform::declare_metrics! {
    counter TOKENS_CHARGED = "parley_quota_tokens_charged_total" in Count:
        "Tokens charged to budgets (recorded in the ledger).";
    counter REJECTIONS = "parley_quota_rejections_total" in Count: "Reservations refused for lack of budget, by tier.";
    counter DEGRADED_CHECKS = "parley_quota_degraded_checks_total" in Count:
        "Budget checks answered from the ledger, conservatively, because Redis was unreachable.";
    counter COUNTER_REBUILDS = "parley_quota_counter_rebuilds_total" in Count:
        "Budget counters rebuilt in Redis from the ledger.";
    counter SETTLEMENT_RETRIES = "parley_quota_settlement_retries_total" in Count:
        "Usage events whose settlement could not be stored and was handed back for a retry.";
}
