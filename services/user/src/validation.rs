//! Checks on what clients send, each naming the field at fault.

use parley_platform::ServiceError;

pub use parley_platform::limits::MIN_PASSWORD_CHARS;
use parley_platform::limits::{MAX_DISPLAY_NAME_CHARS, MAX_EMAIL_CHARS, MAX_PASSWORD_CHARS};

/// A normalised (trimmed, lowercased) email, or an error naming `email`.
pub fn email(raw: &str) -> Result<String, ServiceError> {
    let email = raw.trim().to_lowercase();
    let invalid = || ServiceError::invalid_field("email", "must be a valid email address");
    // White space (Unicode's, and the byte-order mark JavaScript counts as such) and control characters
    // have no place in an address.
    let unwanted = |c: char| c.is_whitespace() || c.is_control() || c == '\u{feff}';
    if email.is_empty() || email.chars().count() > MAX_EMAIL_CHARS || email.chars().any(unwanted) {
        return Err(invalid());
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err(invalid());
    };
    let domain_ok = domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && !domain.contains('@');
    if local.is_empty() || !domain_ok {
        return Err(invalid());
    }
    Ok(email)
}

pub fn password(raw: &str) -> Result<(), ServiceError> {
    let length = raw.chars().count();
    if length < MIN_PASSWORD_CHARS {
        return Err(ServiceError::invalid_field(
            "password",
            format!("must be at least {MIN_PASSWORD_CHARS} characters"),
        ));
    }
    if length > MAX_PASSWORD_CHARS {
        return Err(ServiceError::invalid_field(
            "password",
            format!("must be at most {MAX_PASSWORD_CHARS} characters"),
        ));
    }
    Ok(())
}

pub fn display_name(raw: Option<&str>) -> Result<Option<String>, ServiceError> {
    let Some(name) = raw.map(str::trim).filter(|name| !name.is_empty()) else {
        return Ok(None);
    };
    if name.chars().count() > MAX_DISPLAY_NAME_CHARS {
        return Err(ServiceError::invalid_field(
            "display_name",
            format!("must be at most {MAX_DISPLAY_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ServiceError::invalid_field("display_name", "must not contain control characters"));
    }
    Ok(Some(name.to_owned()))
}

pub const ROLES: [&str; 2] = ["user", "admin"];

pub fn role(raw: &str) -> Result<&'static str, ServiceError> {
    ROLES
        .into_iter()
        .find(|role| *role == raw)
        .ok_or_else(|| ServiceError::invalid_field("role", "must be \"user\" or \"admin\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(email("  Ada@Example.COM ").unwrap(), "ada@example.com");
        for bad in ["", "ada", "ada@", "@example.com", "ada@example", "a b@example.com", "ada@@example.com", "ada@.com"]
        {
            let error = email(bad).unwrap_err();
            assert_eq!(error.field.as_deref(), Some("email"), "{bad:?}");
        }
    }

    #[test]
    fn short_passwords_are_refused_by_name() {
        assert_eq!(password("123456789").unwrap_err().field.as_deref(), Some("password"));
        password("1234567890").unwrap();
        // Characters, not bytes: ten accented letters are long enough.
        password("éééééééééé").unwrap();
    }

    #[test]
    fn display_names_are_trimmed_and_bounded() {
        assert_eq!(display_name(Some("  Ada ")).unwrap().as_deref(), Some("Ada"));
        assert_eq!(display_name(Some("   ")).unwrap(), None);
        assert!(display_name(Some(&"x".repeat(101))).is_err());
    }
}
