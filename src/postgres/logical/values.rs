//! A column's text form, as pgoutput sends it, turned into the JSON value the trigger tiers'
//! `json_build_object` would have written, so events look the same whichever tier carried
//! them. Pure: unit-tested below.
//!
//! By type: `bool` → true/false; integers, `oid`, `float4/8` and `numeric` → numbers (NaN and
//! ±Infinity → strings, as `to_json` writes them); `json`/`jsonb` → the document;
//! `timestamp`, `timestamptz` and `timetz` → ISO 8601 (`2024-05-01T12:00:00+00:00`);
//! one-dimensional or nested arrays of these → JSON arrays; every other type (text, uuid,
//! date, time, interval, bytea as `\x…`, enums, domains, composites, ranges …) → its text
//! form as a string. Domains and composites are where this differs from the trigger tiers
//! (which write a domain over a number as a number, a composite as an object).

use serde_json::Value;

const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const NUMERIC: u32 = 1700;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const TIMETZ: u32 = 1266;
const JSONB: u32 = 3802;

/// The element type of the array types this module converts element by element.
fn element_of(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => BOOL,
        1005 => INT2,
        1007 => INT4,
        1016 => INT8,
        1028 => OID,
        199 => JSON,
        1021 => FLOAT4,
        1022 => FLOAT8,
        1231 => NUMERIC,
        1115 => TIMESTAMP,
        1185 => TIMESTAMPTZ,
        1270 => TIMETZ,
        3807 => JSONB,
        // text[], varchar[], bpchar[], name[], uuid[], date[], time[], interval[], bytea[]:
        // elements stay strings.
        1009 | 1015 | 1014 | 1003 | 2951 | 1182 | 1183 | 1187 | 1001 => 25,
        _ => return None,
    })
}

/// The JSON value of `text`, a value of type `type_oid` in its text form.
pub(crate) fn to_json(type_oid: u32, text: &str) -> Value {
    if let Some(element) = element_of(type_oid) {
        if let Some(array) = parse_array(text, element) {
            return array;
        }
        return Value::String(text.to_string());
    }
    scalar(type_oid, text)
}

fn scalar(type_oid: u32, text: &str) -> Value {
    match type_oid {
        BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => Value::String(text.to_string()),
        },
        INT2 | INT4 | INT8 | OID => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_string())),
        FLOAT4 | FLOAT8 | NUMERIC => number(text),
        JSON | JSONB => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
        }
        TIMESTAMP | TIMESTAMPTZ | TIMETZ => Value::String(iso_8601(type_oid, text)),
        _ => Value::String(text.to_string()),
    }
}

/// A number as JSON reads it (what `to_json` writes), or the text when it is not one (NaN,
/// Infinity).
fn number(text: &str) -> Value {
    let plain = text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
    if plain {
        if let Ok(v @ Value::Number(_)) = serde_json::from_str::<Value>(text) {
            return v;
        }
    }
    Value::String(text.to_string())
}

/// `2024-05-01 12:00:00.5+02` → `2024-05-01T12:00:00.5+02:00` (`timestamp` and `timestamptz`);
/// `12:00:00+02` → `12:00:00+02:00` (`timetz`). Infinite and BC values are left as they are.
fn iso_8601(type_oid: u32, text: &str) -> String {
    if text.ends_with(" BC") || text.contains("infinity") {
        return text.to_string();
    }
    let mut s = if type_oid == TIMETZ {
        text.to_string()
    } else {
        text.replacen(' ', "T", 1)
    };
    if type_oid != TIMESTAMP {
        // The zone offset: the last '+' or '-' after the time; "+02" gains ":00".
        let time_at = s.find(':').unwrap_or(0);
        if let Some(sign) = s.rfind(['+', '-']).filter(|at| *at > time_at) {
            if s.len() - sign == 3 {
                s.push_str(":00");
            }
        }
    }
    s
}

/// Parses an array literal (`{1,2,NULL}`, `{{1,2},{3,4}}`, `{"a b","c\"d"}`) into a JSON
/// array whose elements are converted as `element` values; `None` when it is not one (a
/// lower bound such as `[0:1]={…}` included, and one nested deeper than PostgreSQL's
/// [`MAX_ARRAY_DIMENSIONS`], which only a server that is not PostgreSQL sends: the recursion
/// stays bounded).
fn parse_array(text: &str, element: u32) -> Option<Value> {
    let mut chars = text.chars().peekable();
    let value = parse_level(&mut chars, element, 1)?;
    chars.next().is_none().then_some(value)
}

/// PostgreSQL's `MAXDIM`: no array has more dimensions.
const MAX_ARRAY_DIMENSIONS: usize = 6;

fn parse_level(
    chars: &mut std::iter::Peekable<std::str::Chars>,
    element: u32,
    depth: usize,
) -> Option<Value> {
    if depth > MAX_ARRAY_DIMENSIONS || chars.next()? != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
        return Some(Value::Array(items));
    }
    loop {
        match chars.peek()? {
            '{' => items.push(parse_level(chars, element, depth + 1)?),
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next()? {
                        '\\' => s.push(chars.next()?),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                items.push(scalar(element, &s));
            }
            _ => {
                let mut s = String::new();
                while let Some(c) = chars.peek() {
                    if *c == ',' || *c == '}' {
                        break;
                    }
                    s.push(*c);
                    chars.next();
                }
                let s = s.trim();
                items.push(if s == "NULL" {
                    Value::Null
                } else {
                    scalar(element, s)
                });
            }
        }
        match chars.next()? {
            ',' => continue,
            '}' => return Some(Value::Array(items)),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn scalars_look_as_the_triggers_write_them() {
        assert_eq!(to_json(BOOL, "t"), json!(true));
        assert_eq!(to_json(INT8, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(to_json(INT4, "x"), json!("x"));
        assert_eq!(to_json(FLOAT8, "1.5"), json!(1.5));
        assert_eq!(to_json(FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(to_json(FLOAT4, "-Infinity"), json!("-Infinity"));
        assert_eq!(to_json(NUMERIC, "12.340"), json!(12.34));
        assert_eq!(
            to_json(JSONB, r#"{"a": [1, null]}"#),
            json!({"a": [1, null]})
        );
        assert_eq!(to_json(JSON, "not json"), json!("not json"));
        assert_eq!(to_json(25, "hello"), json!("hello"));
        assert_eq!(
            to_json(TIMESTAMPTZ, "2024-05-01 12:00:00.5+02"),
            json!("2024-05-01T12:00:00.5+02:00")
        );
        assert_eq!(
            to_json(TIMESTAMPTZ, "2024-05-01 12:00:00-03:30"),
            json!("2024-05-01T12:00:00-03:30")
        );
        assert_eq!(
            to_json(TIMESTAMP, "2024-05-01 12:00:00"),
            json!("2024-05-01T12:00:00")
        );
        assert_eq!(to_json(TIMESTAMP, "infinity"), json!("infinity"));
        assert_eq!(to_json(TIMETZ, "12:00:00+00"), json!("12:00:00+00:00"));
        assert_eq!(to_json(1082, "2024-05-01"), json!("2024-05-01"));
    }

    #[test]
    fn arrays_become_json_arrays() {
        assert_eq!(to_json(1007, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(to_json(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(
            to_json(1009, r#"{"a b","c\"d",NULL,"NULL",e}"#),
            json!(["a b", "c\"d", null, "NULL", "e"])
        );
        assert_eq!(to_json(1009, "{}"), json!([]));
        assert_eq!(to_json(1000, "{t,f}"), json!([true, false]));
        assert_eq!(to_json(3807, r#"{"{\"a\": 1}"}"#), json!([{"a": 1}]));
        // Not an array literal: the text as it came.
        assert_eq!(to_json(1007, "[0:1]={1,2}"), json!("[0:1]={1,2}"));
        for bad in ["{", "{1", "{1,", "{\"a", "{1}x", "{{1}", ""] {
            assert_eq!(to_json(1007, bad), json!(bad), "{bad:?}");
        } // Six dimensions, PostgreSQL's most, parse; deeper (a hostile server's, 100,000
          // levels here) is the text as it came, without a stack overflow on the way.
        assert_eq!(to_json(1007, "{{{{{{7}}}}}}"), json!([[[[[[7]]]]]]));
        assert_eq!(to_json(1007, "{{{{{{{7}}}}}}}"), json!("{{{{{{{7}}}}}}}"));
        let deep = format!("{}{}", "{".repeat(100_000), "}".repeat(100_000));
        assert_eq!(to_json(1007, &deep), Value::String(deep.clone()));
    }
}
