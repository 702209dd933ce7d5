//! Query parameters a client may narrow its stream with: an allow-list of names, each mapped
//! to one typed [`Filter`] ([`Param`]). A name not on the list, or a value that does not
//! parse as its type, is a 400; an allowed one adds its filter to every granted subscription
//! (AND), so it can only narrow what the grant selects.

use serde_json::Value;

use crate::filter::Filter;

/// How a query parameter's text becomes a JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// A whole number (`i64`).
    Integer,
    /// A number (`f64`; whole numbers stay integers).
    Number,
    /// Text, as given.
    Text,
    /// `true` or `false`.
    Bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comparison {
    Eq,
    Ne,
    In,
    Gt,
    Ge,
    Lt,
    Le,
}

/// One allowed query parameter: the column it filters on, the comparison and the value's
/// type. `?status=paid` with `Param::eq("status", ParamType::Text)` adds
/// `Filter::eq("status", "paid")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    column: String,
    comparison: Comparison,
    kind: ParamType,
}

impl Param {
    fn new(column: impl Into<String>, comparison: Comparison, kind: ParamType) -> Self {
        Param {
            column: column.into(),
            comparison,
            kind,
        }
    }
    /// The column equals the value.
    pub fn eq(column: impl Into<String>, kind: ParamType) -> Self {
        Self::new(column, Comparison::Eq, kind)
    }
    /// The column differs from the value.
    pub fn ne(column: impl Into<String>, kind: ParamType) -> Self {
        Self::new(column, Comparison::Ne, kind)
    }
    /// The column equals one of the comma-separated values (at most 1,000; more is a 400).
    pub fn is_in(column: impl Into<String>, kind: ParamType) -> Self {
        Self::new(column, Comparison::In, kind)
    }
    /// The column is greater than the value.
    pub fn gt(column: impl Into<String>, kind: ParamType) -> Self {
        Self::new(column, Comparison::Gt, kind)
    }
    /// The column is greater than or equal to the value.
    pub fn ge(column: impl Into<String>, kind: ParamType) -> Self {
        Self::new(column, Comparison::Ge, kind)
    }
    /// The column is less than the value.
    pub fn lt(column: impl Into<String>, kind: ParamType) -> Self {
        Self::new(column, Comparison::Lt, kind)
    }
    /// The column is less than or equal to the value.
    pub fn le(column: impl Into<String>, kind: ParamType) -> Self {
        Self::new(column, Comparison::Le, kind)
    }

    /// The filter for the parameter's text, or why the text does not fit.
    pub(crate) fn filter(&self, text: &str) -> Result<Filter, String> {
        let column = self.column.clone();
        if self.comparison == Comparison::In {
            let count = text.split(',').count();
            if count > MAX_IN_VALUES {
                return Err(format!("{count} values: at most {MAX_IN_VALUES} are taken"));
            }
            let values = text
                .split(',')
                .map(|t| self.value(t))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Filter::is_in(column, values));
        }
        let value = self.value(text)?;
        Ok(match self.comparison {
            Comparison::Eq | Comparison::In => Filter::eq(column, value),
            Comparison::Ne => Filter::ne(column, value),
            Comparison::Gt => Filter::gt(column, value),
            Comparison::Ge => Filter::ge(column, value),
            Comparison::Lt => Filter::lt(column, value),
            Comparison::Le => Filter::le(column, value),
        })
    }

    fn value(&self, text: &str) -> Result<Value, String> {
        let bad = |what: &str| format!("{text:?} is not {what}");
        match self.kind {
            ParamType::Integer => text
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| bad("a whole number")),
            ParamType::Number => match text.parse::<i64>() {
                Ok(n) => Ok(Value::from(n)),
                Err(_) => text
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .map(Value::from)
                    .ok_or_else(|| bad("a number")),
            },
            ParamType::Text => Ok(Value::from(text)),
            ParamType::Bool => match text {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                _ => Err(bad("true or false")),
            },
        }
    }
}

/// Most filter parameters one query string may give: each is checked against every event of
/// the client's channels in the registry, which all clients share.
pub(crate) const MAX_QUERY_FILTERS: usize = 32;

/// Most values one `is_in` parameter may list, for the same reason.
pub(crate) const MAX_IN_VALUES: usize = 1_000;

/// The filters `query` asks for under `allowed` (name → parameter), or the message of a 400.
pub(crate) fn filters(
    query: &[(String, String)],
    allowed: &[(String, Param)],
) -> Result<Vec<Filter>, String> {
    if query.len() > MAX_QUERY_FILTERS {
        return Err(format!(
            "{} query parameters: at most {MAX_QUERY_FILTERS} are taken",
            query.len()
        ));
    }
    query
        .iter()
        .map(|(name, text)| {
            let (_, param) = allowed
                .iter()
                .find(|(allowed, _)| allowed == name)
                .ok_or_else(|| {
                    let names: Vec<&str> = allowed.iter().map(|(n, _)| n.as_str()).collect();
                    format!("query parameter {name:?} is not allowed (allowed: {names:?})")
                })?;
            param
                .filter(text)
                .map_err(|reason| format!("query parameter {name:?}: {reason}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_query_too_long_to_check_per_event_is_refused() {
        let many: Vec<(String, String)> = (0..=MAX_QUERY_FILTERS)
            .map(|i| ("min".to_string(), i.to_string()))
            .collect();
        let e = filters(&many, &allowed()).unwrap_err();
        assert!(e.contains("33 query parameters"), "{e}");
        assert_eq!(
            filters(&many[..MAX_QUERY_FILTERS], &allowed())
                .unwrap()
                .len(),
            MAX_QUERY_FILTERS
        );
        let ids = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        let e = filters(&[("ids".into(), ids(MAX_IN_VALUES + 1))], &allowed()).unwrap_err();
        assert!(e.contains("\"ids\"") && e.contains("1001 values"), "{e}");
        assert!(filters(&[("ids".into(), ids(MAX_IN_VALUES))], &allowed()).is_ok());
    }

    fn allowed() -> Vec<(String, Param)> {
        vec![
            ("status".into(), Param::eq("status", ParamType::Text)),
            ("min".into(), Param::ge("total", ParamType::Number)),
            ("ids".into(), Param::is_in("id", ParamType::Integer)),
        ]
    }

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn allowed_parameters_become_typed_filters() {
        let got = filters(
            &q(&[("status", "paid"), ("min", "9.5"), ("ids", "1,2")]),
            &allowed(),
        )
        .unwrap();
        assert_eq!(
            got,
            [
                Filter::eq("status", "paid"),
                Filter::ge("total", 9.5),
                Filter::is_in("id", [json!(1), json!(2)]),
            ]
        );
    }

    #[test]
    fn unknown_names_and_ill_typed_values_are_refused() {
        let e = filters(&q(&[("owner_id", "7")]), &allowed()).unwrap_err();
        assert!(e.contains("\"owner_id\" is not allowed"), "{e}");
        let e = filters(&q(&[("ids", "1,x")]), &allowed()).unwrap_err();
        assert!(e.contains("not a whole number"), "{e}");
        assert!(filters(&q(&[("min", "NaN")]), &allowed()).is_err());
    }
}
