//! What a handler reports of its time to the HTTP layer (`middleware`), which writes `Server-Timing`.

use std::time::Duration;

/// Time a handler spent waiting on the model, reported as `llm;dur=` and left out of `gateway;dur=`.
#[derive(Debug, Clone, Copy)]
pub struct ModelWait(pub Duration);
