//! Ed25519 signing keys for access tokens. The private keys live in `identity.signing_keys`; the newest
//! unretired key signs, and every unretired key is published so the tokens it signed keep verifying.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parley_platform::access_token::{ALGORITHM, AccessClaims};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::UserError;

/// A freshly generated key: PKCS#8 private key and raw 32-byte public key.
pub struct NewKey {
    pub kid: String,
    pub private_pkcs8: Vec<u8>,
    pub public_key: Vec<u8>,
}

pub fn generate() -> Result<NewKey, UserError> {
    let rng = SystemRandom::new();
    let document =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| UserError::SigningKey("generation failed".into()))?;
    let pair = Ed25519KeyPair::from_pkcs8(document.as_ref()).map_err(|e| UserError::SigningKey(e.to_string()))?;
    let public_key = pair.public_key().as_ref().to_vec();
    // The kid is derived from the public key, so it names the key without revealing anything.
    let digest = ring::digest::digest(&ring::digest::SHA256, &public_key);
    let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12]);
    Ok(NewKey { kid, private_pkcs8: document.as_ref().to_vec(), public_key })
}

/// The key that signs new access tokens.
pub struct ActiveKey {
    kid: String,
    encoding_key: EncodingKey,
}

impl ActiveKey {
    pub fn from_pkcs8(kid: String, private_pkcs8: &[u8]) -> Result<Self, UserError> {
        // Validate now rather than at the first login.
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(private_pkcs8).map_err(|e| UserError::SigningKey(e.to_string()))?;
        Ok(Self { kid, encoding_key: EncodingKey::from_ed_der(private_pkcs8) })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn sign(&self, claims: &AccessClaims) -> Result<String, UserError> {
        debug_assert_eq!(ALGORITHM, "EdDSA");
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding_key)?)
    }
}

/// The JWK `x` member for a raw Ed25519 public key.
pub fn public_key_x(public_key: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(public_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn claims() -> AccessClaims {
        AccessClaims {
            sub: "user-1".into(),
            iss: "parley".into(),
            aud: "parley-api".into(),
            iat: 1,
            exp: i64::MAX / 2,
            jti: "j".into(),
            role: "user".into(),
            tier: "free".into(),
        }
    }

    #[test]
    fn tokens_verify_with_the_published_public_key_only() {
        let key = generate().unwrap();
        let active = ActiveKey::from_pkcs8(key.kid.clone(), &key.private_pkcs8).unwrap();
        let token = active.sign(&claims()).unwrap();
        assert_eq!(jsonwebtoken::decode_header(&token).unwrap().kid.as_deref(), Some(key.kid.as_str()));

        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&["parley-api"]);
        validation.set_issuer(&["parley"]);
        let decoding = DecodingKey::from_ed_components(&public_key_x(&key.public_key)).unwrap();
        assert_eq!(jsonwebtoken::decode::<AccessClaims>(&token, &decoding, &validation).unwrap().claims, claims());

        let other = generate().unwrap();
        let wrong = DecodingKey::from_ed_components(&public_key_x(&other.public_key)).unwrap();
        assert!(jsonwebtoken::decode::<AccessClaims>(&token, &wrong, &validation).is_err());
    }
}
