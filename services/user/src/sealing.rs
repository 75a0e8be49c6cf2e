//! Secrets that must be read back (API keys' signing secrets), sealed with AES-256-GCM under the
//! configured secrets key. Stored form: 12-byte random nonce, then ciphertext and tag.

use base64::Engine;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::UserError;

pub struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    /// `secrets_key` is the configured base64 key (validated to be 32 bytes by the configuration).
    pub fn new(secrets_key: &str) -> Result<Self, UserError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(secrets_key.trim())
            .map_err(|error| UserError::SigningKey(format!("secrets key: {error}")))?;
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| UserError::SigningKey("secrets key must be 32 bytes".into()))?;
        Ok(Self { key: LessSafeKey::new(unbound) })
    }

    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, UserError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| UserError::SigningKey("no randomness".into()))?;
        let mut sealed = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut sealed)
            .map_err(|_| UserError::SigningKey("sealing failed".into()))?;
        let mut stored = nonce.to_vec();
        stored.extend_from_slice(&sealed);
        Ok(stored)
    }

    pub fn open(&self, stored: &[u8]) -> Result<Vec<u8>, UserError> {
        if stored.len() < NONCE_LEN {
            return Err(UserError::SigningKey("sealed secret too short".into()));
        }
        let (nonce, sealed) = stored.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| UserError::SigningKey("bad nonce".into()))?;
        let mut buffer = sealed.to_vec();
        let plaintext = self
            .key
            .open_in_place(nonce, Aad::empty(), &mut buffer)
            .map_err(|_| UserError::SigningKey("a sealed secret does not open: wrong PARLEY_SECRETS_KEY?".into()))?;
        Ok(plaintext.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_key() {
        let sealer = Sealer::new(parley_platform::config::DEVELOPMENT_SECRETS_KEY).unwrap();
        let sealed = sealer.seal(b"pss_secret").unwrap();
        assert_ne!(&sealed[12..], b"pss_secret");
        assert_eq!(sealer.open(&sealed).unwrap(), b"pss_secret");
        let other = Sealer::new("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap();
        assert!(other.open(&sealed).is_err());
    }
}
