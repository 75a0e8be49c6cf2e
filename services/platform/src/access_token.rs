//! The access-token claims: the contract between the user service, which signs them, and gateways,
//! which verify them locally against the published keys.

use serde::{Deserialize, Serialize};

/// The only signature algorithm Parley issues and accepts.
pub const ALGORITHM: &str = "EdDSA";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessClaims {
    /// The user id.
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    /// Unique token id.
    pub jti: String,
    pub role: String,
    pub tier: String,
}
