//! Envelope encryption of what users write: each conversation has its own data key (256-bit, AES-GCM),
//! stored wrapped (sealed) by a key-encryption key from configuration (`PARLEY_CONTENT_KEYS`); texts
//! are sealed with the data key. Rotating the key-encryption key means adding a new one first in the
//! list (new data keys are wrapped with it, old ones still open with theirs), re-wrapping the stored
//! data keys (`parley admin seal-content`), then dropping the old key: no text is re-encrypted and
//! nothing stops.
//!
//! A wrapped data key: the key-encryption key's id (one length byte, then its bytes), a 12-byte nonce,
//! then the sealed key and its tag. A sealed text is stored in the same text column it always was:
//! [`SEALED_PREFIX`], then base64 of a 12-byte nonce, the ciphertext and its tag. The associated data
//! binds it to its conversation and its field, so a sealed text copied to another row or column does
//! not open.
//!
//! Search works on sealed content through a blind index: each user has a search key (256 bits,
//! wrapped like a data key, with the user's id and "search" as associated data), and a word is indexed
//! and looked up as a keyed hash of it ([`SearchKey::blind`]), never as itself.

use std::collections::HashMap;

use base64::Engine;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use uuid::Uuid;

/// The start of every sealed text. Starts with a control character that text a person types does not.
pub const SEALED_PREFIX: &str = "\u{1}pe1:";

/// What a sealed text is: its field goes into the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Content,
    Title,
    Summary,
    /// A stored completion's `chat.completion` object.
    Completion,
    /// A stored completion's request messages.
    Prompt,
}

impl Field {
    fn tag(self) -> &'static [u8] {
        match self {
            Field::Content => b"content",
            Field::Title => b"title",
            Field::Summary => b"summary",
            Field::Completion => b"completion",
            Field::Prompt => b"prompt",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("content keys: {0}")]
    Keys(String),
    #[error("a data key is wrapped by key {0:?}, which is not among the configured content keys")]
    UnknownKey(String),
    #[error("a sealed value does not open (corrupt, or not sealed for this conversation and field)")]
    Corrupt,
    #[error("no randomness")]
    Randomness,
}

/// The key-encryption keys: the current one wraps new data keys; every one opens what it wrapped.
pub struct Keyring {
    current: String,
    keys: HashMap<String, LessSafeKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("current", &self.current).field("ids", &self.keys.keys()).finish()
    }
}

/// Parses `id:base64,id:base64,...` (the first is current): each id 1 to 32 of `a-z`, `0-9`, `-`, `_`,
/// each key 32 bytes. The ids, in order, or what is wrong.
pub fn parse_keys(text: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut keys = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
        let (id, key) = entry.split_once(':').ok_or_else(|| format!("{entry:?} is not id:base64-key"))?;
        let valid_id = !id.is_empty()
            && id.len() <= 32
            && id.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"-_".contains(&byte));
        if !valid_id {
            return Err(format!("key id {id:?} must be 1 to 32 of a-z, 0-9, - and _"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|_| format!("key {id:?} is not base64"))?;
        if bytes.len() != 32 {
            return Err(format!("key {id:?} must be 32 bytes (openssl rand -base64 32)"));
        }
        if keys.iter().any(|(known, _)| known == id) {
            return Err(format!("key id {id:?} appears twice"));
        }
        keys.push((id.to_owned(), bytes));
    }
    if keys.is_empty() {
        return Err("at least one key is needed".to_owned());
    }
    Ok(keys)
}

fn aead_key(bytes: &[u8]) -> Result<LessSafeKey, EnvelopeError> {
    let unbound = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| EnvelopeError::Keys("not a 256-bit key".into()))?;
    Ok(LessSafeKey::new(unbound))
}

fn nonce() -> Result<[u8; NONCE_LEN], EnvelopeError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new().fill(&mut nonce).map_err(|_| EnvelopeError::Randomness)?;
    Ok(nonce)
}

/// Seals `plaintext` under `key` with `aad`: nonce, then ciphertext and tag.
fn seal(key: &LessSafeKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let nonce = nonce()?;
    let mut sealed = plaintext.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut sealed)
        .map_err(|_| EnvelopeError::Corrupt)?;
    let mut stored = Vec::with_capacity(NONCE_LEN + sealed.len());
    stored.extend_from_slice(&nonce);
    stored.extend_from_slice(&sealed);
    Ok(stored)
}

fn open(key: &LessSafeKey, aad: &[u8], stored: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    if stored.len() < NONCE_LEN {
        return Err(EnvelopeError::Corrupt);
    }
    let (nonce, sealed) = stored.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| EnvelopeError::Corrupt)?;
    let mut buffer = sealed.to_vec();
    let plaintext = key.open_in_place(nonce, Aad::from(aad), &mut buffer).map_err(|_| EnvelopeError::Corrupt)?;
    Ok(plaintext.to_vec())
}

impl Keyring {
    /// From the configured `id:base64,...` list.
    pub fn new(configured: &str) -> Result<Self, EnvelopeError> {
        let parsed = parse_keys(configured).map_err(EnvelopeError::Keys)?;
        let current = parsed[0].0.clone();
        let keys = parsed
            .into_iter()
            .map(|(id, bytes)| Ok((id, aead_key(&bytes)?)))
            .collect::<Result<HashMap<_, _>, EnvelopeError>>()?;
        Ok(Self { current, keys })
    }

    /// The id of the key new data keys are wrapped with.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// A new data key for `conversation`, and its wrapped form to store.
    pub fn new_data_key(&self, conversation: Uuid) -> Result<(DataKey, Vec<u8>), EnvelopeError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new().fill(&mut bytes).map_err(|_| EnvelopeError::Randomness)?;
        let wrapped = self.wrap(conversation.as_bytes(), &bytes)?;
        Ok((DataKey { key: aead_key(&bytes)?, conversation }, wrapped))
    }

    /// A new search key for `user`, and its wrapped form to store.
    pub fn new_search_key(&self, user: Uuid) -> Result<(SearchKey, Vec<u8>), EnvelopeError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new().fill(&mut bytes).map_err(|_| EnvelopeError::Randomness)?;
        let wrapped = self.wrap(&search_aad(user), &bytes)?;
        Ok((SearchKey::new(&bytes), wrapped))
    }

    /// The search key of `user` from its wrapped form, whichever configured key wrapped it.
    pub fn unwrap_search_key(&self, user: Uuid, wrapped: &[u8]) -> Result<SearchKey, EnvelopeError> {
        Ok(SearchKey::new(&self.unwrap_bytes(&search_aad(user), wrapped)?))
    }

    /// A search key wrapped again with the current key; `None` when the current key wrapped it already.
    pub fn rewrap_search_key(&self, user: Uuid, wrapped: &[u8]) -> Result<Option<Vec<u8>>, EnvelopeError> {
        self.rewrap_bytes(&search_aad(user), wrapped)
    }

    fn wrap(&self, aad: &[u8], bytes: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let kek = &self.keys[&self.current];
        let mut wrapped = vec![self.current.len() as u8];
        wrapped.extend_from_slice(self.current.as_bytes());
        wrapped.extend(seal(kek, aad, bytes)?);
        Ok(wrapped)
    }

    /// The id of the key that wrapped `wrapped`, and the sealed rest.
    fn split(wrapped: &[u8]) -> Result<(&str, &[u8]), EnvelopeError> {
        let (&length, rest) = wrapped.split_first().ok_or(EnvelopeError::Corrupt)?;
        let length = usize::from(length);
        if rest.len() < length {
            return Err(EnvelopeError::Corrupt);
        }
        let (id, sealed) = rest.split_at(length);
        Ok((std::str::from_utf8(id).map_err(|_| EnvelopeError::Corrupt)?, sealed))
    }

    fn unwrap_bytes(&self, aad: &[u8], wrapped: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let (id, sealed) = Self::split(wrapped)?;
        let kek = self.keys.get(id).ok_or_else(|| EnvelopeError::UnknownKey(id.to_owned()))?;
        open(kek, aad, sealed)
    }

    fn rewrap_bytes(&self, aad: &[u8], wrapped: &[u8]) -> Result<Option<Vec<u8>>, EnvelopeError> {
        if Self::split(wrapped)?.0 == self.current {
            return Ok(None);
        }
        let bytes = self.unwrap_bytes(aad, wrapped)?;
        Ok(Some(self.wrap(aad, &bytes)?))
    }

    /// The data key of `conversation` from its wrapped form, whichever configured key wrapped it.
    pub fn unwrap(&self, conversation: Uuid, wrapped: &[u8]) -> Result<DataKey, EnvelopeError> {
        Ok(DataKey { key: aead_key(&self.unwrap_bytes(conversation.as_bytes(), wrapped)?)?, conversation })
    }

    /// `wrapped` wrapped again with the current key; `None` when the current key wrapped it already.
    pub fn rewrap(&self, conversation: Uuid, wrapped: &[u8]) -> Result<Option<Vec<u8>>, EnvelopeError> {
        self.rewrap_bytes(conversation.as_bytes(), wrapped)
    }
}

/// A search key's associated data: the user, and what the key is for (so that no data key could ever
/// be unwrapped as one).
fn search_aad(user: Uuid) -> Vec<u8> {
    let mut aad = user.as_bytes().to_vec();
    aad.extend_from_slice(b"search");
    aad
}

/// One user's search key, unwrapped: it turns a word into the opaque term the index holds.
pub struct SearchKey {
    key: ring::hmac::Key,
}

impl SearchKey {
    fn new(bytes: &[u8]) -> Self {
        Self { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes) }
    }

    /// The indexed form of `word` (already normalised): 64 bits of its keyed hash, in hex. Equal words
    /// of one user give equal terms; nothing about the word can be read from it without the key.
    pub fn blind(&self, word: &str) -> String {
        let tag = ring::hmac::sign(&self.key, word.as_bytes());
        hex::encode(&tag.as_ref()[..8])
    }
}

/// One conversation's data key, unwrapped.
pub struct DataKey {
    key: LessSafeKey,
    conversation: Uuid,
}

impl DataKey {
    fn aad(&self, field: Field) -> Vec<u8> {
        let mut aad = self.conversation.as_bytes().to_vec();
        aad.extend_from_slice(field.tag());
        aad
    }

    /// `text` sealed for `field` of this conversation, as stored; an empty text stays empty.
    pub fn seal_text(&self, field: Field, text: &str) -> Result<String, EnvelopeError> {
        if text.is_empty() {
            return Ok(String::new());
        }
        let sealed = seal(&self.key, &self.aad(field), text.as_bytes())?;
        Ok(format!("{SEALED_PREFIX}{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(sealed)))
    }

    /// The text `stored` holds: opened when sealed, as it is when written before content was sealed.
    pub fn open_text(&self, field: Field, stored: &str) -> Result<String, EnvelopeError> {
        let Some(encoded) = stored.strip_prefix(SEALED_PREFIX) else {
            return Ok(stored.to_owned());
        };
        let sealed =
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded).map_err(|_| EnvelopeError::Corrupt)?;
        let plaintext = open(&self.key, &self.aad(field), &sealed)?;
        String::from_utf8(plaintext).map_err(|_| EnvelopeError::Corrupt)
    }
}

/// Whether `stored` is a sealed text.
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(SEALED_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "old:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const NEW: &str = "new:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

    #[test]
    fn texts_open_only_in_their_conversation_and_field() {
        let keyring = Keyring::new(OLD).unwrap();
        let (conversation, other) = (Uuid::now_v7(), Uuid::now_v7());
        let (key, wrapped) = keyring.new_data_key(conversation).unwrap();
        let sealed = key.seal_text(Field::Content, "hello, secret world").unwrap();
        assert!(is_sealed(&sealed) && !sealed.contains("secret"), "{sealed}");
        let reopened = keyring.unwrap(conversation, &wrapped).unwrap();
        assert_eq!(reopened.open_text(Field::Content, &sealed).unwrap(), "hello, secret world");
        assert!(reopened.open_text(Field::Title, &sealed).is_err(), "another field");
        assert!(keyring.unwrap(other, &wrapped).is_err(), "another conversation's key");
        // Written before content was sealed: read as it is. Empty stays empty.
        assert_eq!(reopened.open_text(Field::Content, "plain old text").unwrap(), "plain old text");
        assert_eq!(key.seal_text(Field::Title, "").unwrap(), "");
    }

    #[test]
    fn rotation_rewraps_data_keys_and_leaves_texts_alone() {
        let old = Keyring::new(OLD).unwrap();
        let conversation = Uuid::now_v7();
        let (key, wrapped) = old.new_data_key(conversation).unwrap();
        let sealed = key.seal_text(Field::Summary, "the gist").unwrap();
        // The new key first, the old one kept: old data keys still open; rewrapping moves them over.
        let both = Keyring::new(&format!("{NEW},{OLD}")).unwrap();
        assert_eq!(both.current(), "new");
        let rewrapped = both.rewrap(conversation, &wrapped).unwrap().expect("wrapped by the old key");
        assert_eq!(both.rewrap(conversation, &rewrapped).unwrap(), None, "already under the current key");
        // The old key dropped: the rewrapped data key still opens the text sealed before.
        let new_only = Keyring::new(NEW).unwrap();
        assert!(matches!(new_only.unwrap(conversation, &wrapped), Err(EnvelopeError::UnknownKey(_))));
        let key = new_only.unwrap(conversation, &rewrapped).unwrap();
        assert_eq!(key.open_text(Field::Summary, &sealed).unwrap(), "the gist");
    }

    #[test]
    fn search_keys_blind_words_per_user_and_survive_rotation() {
        let old = Keyring::new(OLD).unwrap();
        let (ada, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let (key, wrapped) = old.new_search_key(ada).unwrap();
        let (bobs, _) = old.new_search_key(bob).unwrap();
        let term = key.blind("paris");
        assert_eq!(term.len(), 16);
        assert_eq!(key.blind("paris"), term, "equal words, equal terms");
        assert_ne!(key.blind("london"), term);
        assert_ne!(bobs.blind("paris"), term, "another user's key gives other terms");
        assert!(old.unwrap(ada, &wrapped).is_err(), "a search key does not open as a data key");
        assert!(old.unwrap_search_key(bob, &wrapped).is_err(), "nor as another user's");
        let both = Keyring::new(&format!("{NEW},{OLD}")).unwrap();
        let rewrapped = both.rewrap_search_key(ada, &wrapped).unwrap().expect("wrapped by the old key");
        let reopened = Keyring::new(NEW).unwrap().unwrap_search_key(ada, &rewrapped).unwrap();
        assert_eq!(reopened.blind("paris"), term, "rotation keeps the index valid");
    }

    #[test]
    fn key_lists_are_checked() {
        assert!(parse_keys("").is_err());
        assert!(parse_keys("k1:c2hvcnQ=").unwrap_err().contains("32 bytes"));
        assert!(parse_keys("K1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap_err().contains("key id"));
        assert!(parse_keys(&format!("{OLD},{OLD}")).unwrap_err().contains("twice"));
        assert_eq!(parse_keys(&format!("{NEW}, {OLD}")).unwrap().len(), 2);
    }
}
