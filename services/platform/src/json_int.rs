//! Integers as JSON has them: `3` and `3.0` are one number (JSON Schema's `integer` admits both), so a
//! field that takes an integer takes either; `3.5`, a string, or a number out of the field's range is
//! refused with serde's usual error, which names the field.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Error, Unexpected, Visitor};
use serde::{Deserialize, Deserializer};

/// An integer of type `T`, read from any JSON number with no fractional part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Integer<T>(pub T);

impl<'de, T: TryFrom<i64>> Deserialize<'de> for Integer<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(IntegerVisitor(PhantomData)).map(Integer)
    }
}

struct IntegerVisitor<T>(PhantomData<T>);

impl<T: TryFrom<i64>> Visitor<'_> for IntegerVisitor<T> {
    type Value = T;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an integer")
    }

    fn visit_i64<E: Error>(self, value: i64) -> Result<T, E> {
        T::try_from(value).map_err(|_| E::invalid_value(Unexpected::Signed(value), &"an integer in range"))
    }

    fn visit_u64<E: Error>(self, value: u64) -> Result<T, E> {
        let value =
            i64::try_from(value).map_err(|_| E::invalid_value(Unexpected::Unsigned(value), &"an integer in range"))?;
        self.visit_i64(value)
    }

    fn visit_f64<E: Error>(self, value: f64) -> Result<T, E> {
        // Within 2^53 every whole number is exact; past it, a number written as 2^63 + 1 reads as 2^63,
        // and would be taken for one it is not.
        const EXACT: f64 = 9_007_199_254_740_992.0;
        let whole = value.fract() == 0.0 && value.abs() <= EXACT;
        if !whole {
            return Err(E::invalid_type(Unexpected::Float(value), &self));
        }
        self.visit_i64(value as i64)
    }
}

/// For `#[serde(deserialize_with)]` on a `T` field.
pub fn integer<'de, D: Deserializer<'de>, T: TryFrom<i64>>(deserializer: D) -> Result<T, D::Error> {
    Integer::deserialize(deserializer).map(|Integer(value)| value)
}

/// For `#[serde(default, deserialize_with)]` on an `Option<T>` field (null is `None`).
pub fn optional_integer<'de, D: Deserializer<'de>, T: TryFrom<i64>>(deserializer: D) -> Result<Option<T>, D::Error> {
    Option::<Integer<T>>::deserialize(deserializer).map(|value| value.map(|Integer(value)| value))
}

/// For `#[serde(default, deserialize_with)]` on an `Option<BTreeMap<String, T>>` field.
pub fn optional_integer_map<'de, D: Deserializer<'de>, T: TryFrom<i64>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, T>>, D::Error> {
    let map = Option::<BTreeMap<String, Integer<T>>>::deserialize(deserializer)?;
    Ok(map.map(|map| map.into_iter().map(|(key, Integer(value))| (key, value)).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Body {
        #[serde(default, deserialize_with = "optional_integer")]
        tokens: Option<u32>,
    }

    fn tokens(json: &str) -> Result<Option<u32>, String> {
        serde_json::from_str::<Body>(json).map(|body| body.tokens).map_err(|error| error.to_string())
    }

    #[test]
    fn whole_numbers_are_integers_however_written() {
        assert_eq!(tokens(r#"{"tokens": 7}"#), Ok(Some(7)));
        assert_eq!(tokens(r#"{"tokens": 7.0}"#), Ok(Some(7)));
        assert_eq!(tokens(r#"{"tokens": 7e2}"#), Ok(Some(700)));
        assert_eq!(tokens(r#"{"tokens": null}"#), Ok(None));
        assert_eq!(tokens("{}"), Ok(None));
        let refused = [r#"{"tokens": 7.5}"#, r#"{"tokens": -1}"#, r#"{"tokens": "7"}"#, r#"{"tokens": 1e30}"#];
        for refused in refused {
            assert!(tokens(refused).is_err(), "{refused}");
        }
    }
}
