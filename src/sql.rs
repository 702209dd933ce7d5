//! Quoting of identifiers and literals for generated SQL.
//!
//! Every name and string that reaches generated DDL goes through these two functions; nothing a
//! user passes (table, column, label) is ever spliced into SQL unquoted. They follow the rules
//! PostgreSQL's own `quote_ident` / `quote_literal` use, which SQLite accepts too.

/// `text` made safe to show in a `--` comment line of a generated script: a line break
/// would end the comment and make the rest of a name a statement, and a backslash could start
/// a command-line client's own command (`\!`, `\c`); both become `?`. For names shown to
/// a reader, never for SQL.
pub(crate) fn comment(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\\' || c.is_control() { '?' } else { c })
        .collect()
}

/// Quotes an identifier: wraps it in double quotes and doubles embedded double quotes.
///
/// Always quotes (even `users`), so case is preserved and keywords like `select` work.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
pub(crate) fn quote_ident(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes a string literal: wraps it in single quotes and doubles embedded single quotes.
///
/// A string containing a backslash is written as an escape string (`E'…'`) with doubled
/// backslashes, so it means the same whatever `standard_conforming_strings` is set to.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn quote_literal(value: &str) -> String {
    let has_backslash = value.contains('\\');
    let mut out = String::with_capacity(value.len() + 3);
    if has_backslash {
        out.push('E');
    }
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Quotes a string literal for SQLite, where a backslash is an ordinary character (no escape
/// strings): only single quotes are doubled.
#[cfg(feature = "sqlite")]
pub(crate) fn quote_sqlite_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Splits a table name as watches, subscriptions and snapshots take it: `"schema.table"` at
/// its first dot, a name without one in the database's default schema (`None`).
pub(crate) fn split_table(table: String) -> (Option<String>, String) {
    match table.split_once('.') {
        Some((schema, table)) => (Some(schema.to_string()), table.to_string()),
        None => (None, table),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comment_line_keeps_no_line_break_and_no_backslash() {
        assert_eq!(
            comment("sqlnotify_main_t_insert"),
            "sqlnotify_main_t_insert"
        );
        assert_eq!(comment("x\nDROP TABLE t; --"), "x?DROP TABLE t; --");
        assert_eq!(comment("a\r\u{85}b\\! rm"), "a??b?! rm");
    }

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident("users"), "\"users\"");
        assert_eq!(quote_ident("CamelCase"), "\"CamelCase\"");
        assert_eq!(quote_ident("select"), "\"select\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(
            quote_ident("x\"; DROP TABLE t; --"),
            "\"x\"\"; DROP TABLE t; --\""
        );
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(quote_literal("abc"), "'abc'");
        assert_eq!(quote_literal("o'brien"), "'o''brien'");
        assert_eq!(quote_literal("a\\b'c"), "E'a\\\\b''c'");
        assert_eq!(
            quote_literal("'; DROP TABLE t; --"),
            "'''; DROP TABLE t; --'"
        );
    }
}
