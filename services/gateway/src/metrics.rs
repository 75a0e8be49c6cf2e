//! The metrics this crate records, declared once with their descriptions and units. Code records
//! them through these names only; `describe` registers the descriptions with the recorder.

parley_platform::declare_metrics! {
    counter HTTP_REQUESTS = "parley_http_requests_total" in Count:
        "REST requests answered, by method, route and status.";
    histogram HTTP_REQUEST_DURATION = "parley_http_request_duration_seconds" in Seconds:
        "Time the gateway spent on a request, model time excluded, by method and route.";
    counter HTTP_TIMEOUTS = "parley_http_timeouts_total" in Count:
        "Requests that passed http.request_timeout_secs and were answered 503.";
    counter RATELIMIT_REJECTIONS = "parley_ratelimit_rejections_total" in Count:
        "Requests refused by a rate limit, by scope (ip, user) and tier.";
    counter RATELIMIT_FALLBACK_DECISIONS = "parley_ratelimit_fallback_decisions_total" in Count:
        "Rate-limit decisions taken locally because Redis was unreachable.";
    counter COMPLETIONS_NOT_STORED = "parley_gateway_completions_not_stored_total" in Count:
        "Completions asked to be stored (OpenAI's store: true) that chat could not keep; the client got them.";
    gauge REPLIES_FOLLOWED = "parley_gateway_replies_followed" in Count:
        "Replies this gateway is following on its one NATS subscription (open streams and waiting sends).";
}
