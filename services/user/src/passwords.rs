//! Password hashing with Argon2id (the argon2 crate's defaults: 19 MiB, 2 passes, 1 lane, as OWASP
//! recommends). Hashing runs on the blocking pool so it never stalls the async workers.

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::UserError;

pub async fn hash(password: String) -> Result<String, UserError> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|error| UserError::PasswordHash(error.to_string()))
    })
    .await
    .map_err(|error| UserError::PasswordHash(error.to_string()))?
}

/// Whether `password` matches `stored`. With no stored hash (unknown email) it still does the work of a
/// verification, so the answer takes as long whether the account exists or not.
pub async fn verify(password: String, stored: Option<String>) -> Result<bool, UserError> {
    tokio::task::spawn_blocking(move || {
        let reference = stored.unwrap_or_else(|| DUMMY_HASH.to_owned());
        let parsed = PasswordHash::new(&reference).map_err(|error| UserError::PasswordHash(error.to_string()))?;
        let matches = Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok();
        Ok(matches && reference != DUMMY_HASH)
    })
    .await
    .map_err(|error| UserError::PasswordHash(error.to_string()))?
}

/// An Argon2id hash of a random string nobody knows, with the same parameters as real hashes.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0YJ4Bd1JGOqtPUe7hVnEqkf9nlZ3W6pQ8dDuMf9Nf3o";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_only_its_password() {
        let stored = hash("correct horse battery".to_owned()).await.unwrap();
        assert!(stored.starts_with("$argon2id$"));
        assert!(verify("correct horse battery".to_owned(), Some(stored.clone())).await.unwrap());
        assert!(!verify("wrong horse battery".to_owned(), Some(stored)).await.unwrap());
        assert!(!verify("anything at all".to_owned(), None).await.unwrap());
    }
}
