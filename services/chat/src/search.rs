//! Full-text search over content sealed at rest, through a blind index.
//!
//! PostgreSQL cannot index what it cannot read, and message content and titles are sealed with their
//! conversation's data key. So the chat service splits a text into words (runs of letters and digits,
//! lowercased), turns each into an opaque term with the user's search key
//! ([`parley_platform::envelope::SearchKey::blind`]) and stores the terms, with their positions, as a
//! `tsvector` in `chat.search_terms` under a GIN index. A query's words go through the same key, so
//! PostgreSQL matches and ranks (`ts_rank`) terms it cannot read; the chat service then opens the
//! matching texts and cuts the highlighted snippets itself.
//!
//! What this gives up, deliberately: matching is by whole words, case-insensitively, with no stemming
//! and no prefixes (a blind term carries nothing of its word's spelling), and someone who can read the
//! database learns how often each (unknown) word recurs in one user's texts, but not what any word is.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use parley_platform::envelope::SearchKey;

/// Most distinct words of one text that go into the index.
const MAX_TERMS: usize = 4_096;
/// Positions kept per word (PostgreSQL keeps at most 256, ranking needs far fewer).
const MAX_POSITIONS: usize = 32;
/// PostgreSQL's largest `tsvector` position.
const MAX_POSITION: usize = 16_383;
/// Most words of a query that count; the rest are ignored.
pub const MAX_QUERY_WORDS: usize = 16;
/// About how many characters of a text a snippet shows.
const SNIPPET_CHARS: usize = 160;
/// How many characters of context a snippet keeps before its first match.
const LEAD_CHARS: usize = 40;

/// The words of `text`, each with its byte range in `text` and its normalised (lowercased) form.
pub fn words(text: &str) -> impl Iterator<Item = (Range<usize>, String)> + '_ {
    let mut chars = text.char_indices().peekable();
    std::iter::from_fn(move || {
        while chars.next_if(|(_, c)| !c.is_alphanumeric()).is_some() {}
        let (start, first) = chars.next()?;
        let mut end = start + first.len_utf8();
        while let Some((at, c)) = chars.next_if(|(_, c)| c.is_alphanumeric()) {
            end = at + c.len_utf8();
        }
        Some((start..end, text[start..end].to_lowercase()))
    })
}

/// `text` as a `tsvector` of blind terms with positions, ready to bind as `$n::tsvector`; `None` when
/// it has no words.
pub fn index_terms(key: &SearchKey, text: &str) -> Option<String> {
    let mut positions: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (position, (_, word)) in words(text).enumerate() {
        if positions.len() >= MAX_TERMS && !positions.contains_key(&word) {
            continue;
        }
        let kept = positions.entry(word).or_default();
        if kept.len() < MAX_POSITIONS {
            kept.push((position + 1).min(MAX_POSITION));
        }
    }
    if positions.is_empty() {
        return None;
    }
    let entries: Vec<String> = positions
        .into_iter()
        .map(|(word, at)| {
            let at: Vec<String> = at.iter().map(usize::to_string).collect();
            format!("'{}':{}", key.blind(&word), at.join(","))
        })
        .collect();
    Some(entries.join(" "))
}

/// A parsed query: its distinct words, and the `tsquery` that finds texts holding all of them.
pub struct Query {
    pub words: HashSet<String>,
    pub tsquery: String,
}

impl Query {
    /// `None` when `text` has no words to search for.
    pub fn parse(key: &SearchKey, text: &str) -> Option<Query> {
        let mut words = HashSet::new();
        let mut terms = Vec::new();
        for (_, word) in words_of_query(text) {
            if words.insert(word.clone()) {
                terms.push(format!("'{}'", key.blind(&word)));
            }
        }
        (!terms.is_empty()).then(|| Query { words, tsquery: terms.join(" & ") })
    }
}

/// The words of a query that count: the first [`MAX_QUERY_WORDS`].
pub fn words_of_query(text: &str) -> impl Iterator<Item = (Range<usize>, String)> + '_ {
    words(text).take(MAX_QUERY_WORDS)
}

/// A piece of a snippet: plain, or a word the query matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub text: String,
    pub highlight: bool,
}

/// About [`SNIPPET_CHARS`] characters of `text` around its first word the query holds, cut at word
/// boundaries, with "…" where text was left out, in parts that mark every matching word.
pub fn snippet(text: &str, query: &HashSet<String>) -> Vec<Part> {
    let found: Vec<(Range<usize>, bool)> = words(text).map(|(range, word)| (range, query.contains(&word))).collect();
    let first_match = found.iter().position(|(_, matched)| *matched);
    // Start a few words before the first match (at the text's start when there is none).
    let mut start = 0;
    if let Some(index) = first_match {
        let match_start = found[index].0.start;
        start = found[..index]
            .iter()
            .map(|(range, _)| range.start)
            .find(|&at| text[at..match_start].chars().count() <= LEAD_CHARS)
            .unwrap_or(match_start);
    }
    let end = text[start..].char_indices().nth(SNIPPET_CHARS).map_or(text.len(), |(at, _)| start + at);
    // End at a word's end rather than inside it.
    let end = found
        .iter()
        .find(|(range, _)| range.start < end && range.end > end)
        .map_or(end, |(range, _)| if range.start > start { range.start } else { range.end });
    let mut parts = Vec::new();
    let mut push = |text: &str, highlight: bool| {
        if text.is_empty() {
            return;
        }
        match parts.last_mut() {
            Some(Part { text: last, highlight: was }) if *was == highlight => last.push_str(text),
            _ => parts.push(Part { text: text.to_owned(), highlight }),
        }
    };
    if start > 0 {
        push("…", false);
    }
    let mut at = start;
    for (range, _) in found.iter().filter(|(range, matched)| *matched && range.start >= start && range.end <= end) {
        push(&text[at..range.start], false);
        push(&text[range.clone()], true);
        at = range.end;
    }
    push(text[at..end].trim_end(), false);
    if end < text.len() {
        push("…", false);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_platform::envelope::Keyring;
    use uuid::Uuid;

    fn key() -> SearchKey {
        let keyring = Keyring::new("k:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap();
        keyring.new_search_key(Uuid::now_v7()).unwrap().0
    }

    #[test]
    fn words_are_runs_of_letters_and_digits_lowercased() {
        let found: Vec<String> = words("Hello, WORLD! Café 42x — naïve").map(|(_, word)| word).collect();
        assert_eq!(found, ["hello", "world", "café", "42x", "naïve"]);
        let text = "  über-cool ";
        let ranges: Vec<&str> = words(text).map(|(range, _)| &text[range]).collect();
        assert_eq!(ranges, ["über", "cool"]);
        assert_eq!(words("¡¿ ...").count(), 0);
    }

    #[test]
    fn the_index_holds_blind_terms_with_positions_and_no_words() {
        let key = key();
        let terms = index_terms(&key, "Paris in spring; paris in autumn").unwrap();
        assert!(!terms.contains("paris"), "{terms}");
        assert!(terms.contains(&format!("'{}':1,4", key.blind("paris"))), "{terms}");
        assert!(terms.contains(&format!("'{}':2,5", key.blind("in"))), "{terms}");
        assert_eq!(index_terms(&key, " ... "), None);
    }

    #[test]
    fn a_query_asks_for_every_distinct_word() {
        let key = key();
        let query = Query::parse(&key, "Paris paris SPRING").unwrap();
        assert_eq!(query.words, HashSet::from(["paris".to_owned(), "spring".to_owned()]));
        assert_eq!(query.tsquery, format!("'{}' & '{}'", key.blind("paris"), key.blind("spring")));
        assert!(Query::parse(&key, "?!").is_none());
        let long = (0..40).map(|n| format!("w{n}")).collect::<Vec<_>>().join(" ");
        assert_eq!(Query::parse(&key, &long).unwrap().words.len(), MAX_QUERY_WORDS);
    }

    #[test]
    fn a_snippet_shows_the_matches_in_context() {
        let query = HashSet::from(["tea".to_owned()]);
        let parts = snippet("I like Tea. Green tea most.", &query);
        let shown: Vec<(&str, bool)> = parts.iter().map(|part| (part.text.as_str(), part.highlight)).collect();
        assert_eq!(shown, [("I like ", false), ("Tea", true), (". Green ", false), ("tea", true), (" most.", false)]);

        let long = format!("{} the answer is tea {}", "word ".repeat(100), "more ".repeat(100));
        let parts = snippet(&long, &query);
        assert!(parts.first().unwrap().text.starts_with('…'));
        assert!(parts.last().unwrap().text.ends_with('…'));
        assert!(parts.iter().any(|part| part.highlight && part.text == "tea"));
        let shown: usize = parts.iter().map(|part| part.text.chars().count()).sum();
        assert!(shown <= SNIPPET_CHARS + 4, "{shown}");
        assert!(!parts.iter().any(|part| part.text.contains("wor…") || part.text.ends_with("mor")));

        // No match in the text (a title hit, say): its start.
        let parts = snippet(&"abc ".repeat(100), &query);
        assert!(parts.iter().all(|part| !part.highlight));
        assert!(parts.last().unwrap().text.ends_with("abc…"));
    }
}
