//! Column filters on subscriptions: typed comparisons of JSON values, combined with AND.
//!
//! Comparisons are typed, never textual: `Filter::eq("id", 42)` matches the number 42 (and
//! 42.0) but not the string `"42"`. Ordering comparisons (`gt`, `ge`, `lt`, `le`) are defined
//! for two numbers or two strings; any other pairing does not match. A column the event does
//! not carry (e.g. an extra column of a truncated event) matches nothing, `is_null` included.

use std::cmp::Ordering;

use serde_json::Value;

use crate::event::ChangeEvent;

/// One condition on one column of an event's payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    column: String,
    condition: Condition,
}

#[derive(Debug, Clone, PartialEq)]
enum Condition {
    Eq(Value),
    Ne(Value),
    In(Vec<Value>),
    IsNull,
    NotNull,
    Cmp(Ordering, bool, Value),
}

impl Filter {
    /// The column equals `value` (typed: `42` is not `"42"`).
    pub fn eq(column: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::new(column, Condition::Eq(value.into()))
    }
    /// The column does not equal `value` (a JSON null differs from every non-null value).
    pub fn ne(column: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::new(column, Condition::Ne(value.into()))
    }
    /// The column equals one of `values`.
    pub fn is_in<V: Into<Value>>(
        column: impl Into<String>,
        values: impl IntoIterator<Item = V>,
    ) -> Self {
        Self::new(
            column,
            Condition::In(values.into_iter().map(Into::into).collect()),
        )
    }
    /// The column is SQL NULL (JSON null).
    pub fn is_null(column: impl Into<String>) -> Self {
        Self::new(column, Condition::IsNull)
    }
    /// The column is not NULL.
    pub fn not_null(column: impl Into<String>) -> Self {
        Self::new(column, Condition::NotNull)
    }
    /// The column is greater than `value` (numbers with numbers, strings with strings).
    pub fn gt(column: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::new(
            column,
            Condition::Cmp(Ordering::Greater, false, value.into()),
        )
    }
    /// The column is greater than or equal to `value`.
    pub fn ge(column: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::new(
            column,
            Condition::Cmp(Ordering::Greater, true, value.into()),
        )
    }
    /// The column is less than `value`.
    pub fn lt(column: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::new(column, Condition::Cmp(Ordering::Less, false, value.into()))
    }
    /// The column is less than or equal to `value`.
    pub fn le(column: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::new(column, Condition::Cmp(Ordering::Less, true, value.into()))
    }

    fn new(column: impl Into<String>, condition: Condition) -> Self {
        Filter {
            column: column.into(),
            condition,
        }
    }

    /// The column this filter looks at.
    pub fn column(&self) -> &str {
        &self.column
    }

    /// The values this filter's column must equal one of, for `eq` and `is_in` (what the
    /// routing index keys on); `None` for every other condition.
    pub(crate) fn equals_one_of(&self) -> Option<&[Value]> {
        match &self.condition {
            Condition::Eq(value) => Some(std::slice::from_ref(value)),
            Condition::In(values) => Some(values),
            _ => None,
        }
    }

    /// Whether `event` satisfies this filter.
    pub fn matches(&self, event: &ChangeEvent) -> bool {
        event
            .get(&self.column)
            .is_some_and(|value| self.matches_value(value))
    }

    /// Whether a column value satisfies this filter.
    pub fn matches_value(&self, value: &Value) -> bool {
        match &self.condition {
            Condition::Eq(expected) => json_eq(value, expected),
            Condition::Ne(expected) => !json_eq(value, expected),
            Condition::In(options) => options.iter().any(|o| json_eq(value, o)),
            Condition::IsNull => value.is_null(),
            Condition::NotNull => !value.is_null(),
            Condition::Cmp(wanted, or_equal, bound) => match json_cmp(value, bound) {
                Some(Ordering::Equal) => *or_equal,
                Some(ord) => ord == *wanted,
                None => false,
            },
        }
    }
}

/// Typed equality: numbers compare by value (so `1` equals `1.0`), everything else structurally.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => json_cmp(a, b) == Some(Ordering::Equal),
        _ => a == b,
    }
}

/// Ordering of two numbers or two strings; `None` for any other pairing.
fn json_cmp(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                Some(x.cmp(&y))
            } else if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
                Some(x.cmp(&y))
            } else {
                x.as_f64()?.partial_cmp(&y.as_f64()?)
            }
        }
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Refuses a filter on a column `channel` does not carry, with
/// [`Error::UnknownFilterColumn`](crate::Error::UnknownFilterColumn) naming the channel, the
/// column and the columns it carries.
pub(crate) fn check_columns(
    channel: &crate::event::Channel,
    filters: &[Filter],
) -> crate::Result<()> {
    match filters.iter().find(|f| !channel.carries(f.column())) {
        None => Ok(()),
        Some(f) => Err(crate::Error::UnknownFilterColumn {
            channel: channel.name().to_string(),
            column: f.column().to_string(),
            available: channel
                .key_columns()
                .iter()
                .chain(channel.extra_columns())
                .cloned()
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn equality_is_typed() {
        assert!(Filter::eq("id", 42).matches_value(&json!(42)));
        assert!(Filter::eq("id", 42).matches_value(&json!(42.0)));
        assert!(!Filter::eq("id", 42).matches_value(&json!("42")));
        assert!(!Filter::eq("id", "42").matches_value(&json!(42)));
        assert!(Filter::eq("flag", true).matches_value(&json!(true)));
        assert!(Filter::ne("id", 42).matches_value(&json!(43)));
        assert!(Filter::ne("id", 42).matches_value(&json!(null)));
        assert!(!Filter::ne("id", 42).matches_value(&json!(42)));
        assert!(Filter::eq("big", u64::MAX).matches_value(&json!(u64::MAX)));
        assert!(!Filter::eq("big", u64::MAX).matches_value(&json!(u64::MAX - 1)));
    }

    #[test]
    fn in_and_null() {
        let f = Filter::is_in("s", ["a", "b"]);
        assert!(f.matches_value(&json!("b")));
        assert!(!f.matches_value(&json!("c")));
        assert!(Filter::is_null("x").matches_value(&json!(null)));
        assert!(!Filter::is_null("x").matches_value(&json!(0)));
        assert!(Filter::not_null("x").matches_value(&json!(0)));
    }

    #[test]
    fn ordering_numbers_and_strings_only() {
        assert!(Filter::gt("n", 10).matches_value(&json!(11)));
        assert!(!Filter::gt("n", 10).matches_value(&json!(10)));
        assert!(Filter::ge("n", 10).matches_value(&json!(10)));
        assert!(Filter::lt("n", 10).matches_value(&json!(9.5)));
        assert!(Filter::le("n", 10.5).matches_value(&json!(10)));
        assert!(!Filter::lt("n", -1).matches_value(&json!(u64::MAX)));
        assert!(Filter::gt("s", "b").matches_value(&json!("c")));
        assert!(!Filter::gt("s", "b").matches_value(&json!("a")));
        assert!(!Filter::gt("n", 1).matches_value(&json!("2")));
        assert!(!Filter::gt("n", 1).matches_value(&json!(null)));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-c]{0,3}".prop_map(Value::String),
        ]
    }

    proptest! {
        /// eq and ne are exact opposites, and eq is reflexive.
        #[test]
        fn eq_and_ne_are_complements(a in scalar(), b in scalar()) {
            prop_assert_ne!(Filter::eq("c", a.clone()).matches_value(&b), Filter::ne("c", a.clone()).matches_value(&b));
            prop_assert!(Filter::eq("c", a.clone()).matches_value(&a));
        }

        /// For comparable values exactly one of lt / eq / gt holds; le = lt or eq; ge = gt or eq.
        #[test]
        fn orderings_are_consistent(a in scalar(), b in scalar()) {
            let (lt, gt) = (Filter::lt("c", b.clone()).matches_value(&a), Filter::gt("c", b.clone()).matches_value(&a));
            let (le, ge) = (Filter::le("c", b.clone()).matches_value(&a), Filter::ge("c", b.clone()).matches_value(&a));
            let eq = Filter::eq("c", b.clone()).matches_value(&a);
            let comparable = matches!((&a, &b), (Value::Number(_), Value::Number(_)) | (Value::String(_), Value::String(_)));
            if comparable {
                prop_assert_eq!(lt as u8 + gt as u8 + eq as u8, 1);
                prop_assert_eq!(le, lt || eq);
                prop_assert_eq!(ge, gt || eq);
            } else {
                prop_assert!(!lt && !gt && !le && !ge);
            }
        }

        /// `is_in` matches exactly when one of the options is equal.
        #[test]
        fn is_in_is_any_eq(a in scalar(), options in prop::collection::vec(scalar(), 0..5)) {
            let any_eq = options.iter().any(|o| Filter::eq("c", o.clone()).matches_value(&a));
            prop_assert_eq!(Filter::is_in("c", options).matches_value(&a), any_eq);
        }
    }
}
