//! The metrics this crate records, declared once with their descriptions and units. Code records
//! them through these names only; `describe` registers the descriptions with the recorder.

parley_platform::declare_metrics! {
    counter JOBS = "parley_agent_jobs_total" in Count:
        "Jobs finished by an agent, by outcome (done, retry, handed_back).";
    counter DEAD_JOBS = "parley_agent_dead_jobs_total" in Count: "Jobs moved to the dead-letter stream.";
    counter JOB_CONTEXTS = "parley_agent_job_contexts_total" in Count:
        "Contexts of reply jobs, by source (carried in the job, asked of chat).";
    counter SUMMARIES = "parley_agent_summaries_total" in Count: "Running summaries written by a model, by model.";
    counter TITLES = "parley_agent_titles_total" in Count: "Conversation titles generated and stored, by model.";
    counter UNACCOUNTED_COMPLETIONS = "parley_agent_unaccounted_completions_total" in Count:
        "Stateless completions whose settlement or usage event could not be delivered after retries.";
    counter LLM_REQUESTS = "parley_llm_requests_total" in Count:
        "Model calls, by provider, model and outcome (ok, error, circuit_open).";
    histogram LLM_REQUEST_DURATION = "parley_llm_request_duration_seconds" in Seconds:
        "Duration of a model call, by provider and model.";
    histogram LLM_TIME_TO_FIRST_TOKEN = "parley_llm_time_to_first_token_seconds" in Seconds:
        "Time from a model call to its first token, by provider and model.";
    counter LLM_TOKENS = "parley_llm_tokens_total" in Count:
        "Tokens of model calls, by provider, model and direction (input, output).";
    counter LLM_RETRIES = "parley_llm_retries_total" in Count:
        "Retries of a model call on the same provider, by provider.";
    counter LLM_ROUTED = "parley_llm_routed_total" in Count:
        "Simple requests routed to a cheaper model, by requested and answering model.";
    gauge LLM_BREAKER_STATE = "parley_llm_breaker_state":
        "A provider's circuit breaker: 0 closed, 1 half-open, 2 open.";
    counter LLM_KEYS_BENCHED = "parley_llm_keys_benched_total" in Count:
        "API keys of a provider set aside for a while after repeated refusals, by provider.";
    counter LLM_CACHE_REQUESTS = "parley_llm_cache_requests_total" in Count:
        "Response-cache lookups, by outcome (hit, miss, coalesced, fail_open, not_cacheable).";
}
