//! [`Operation`]: the kind of row change (INSERT, UPDATE, DELETE) a watch reacts to and an
//! event reports. A leaf: everything else names it, it names nothing (parsing one from text,
//! which fails with the crate's `Error`, is implemented in `error.rs`).

use std::fmt;

/// The kind of row change a watch reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// A row was inserted.
    Insert,
    /// A row was updated.
    Update,
    /// A row was deleted.
    Delete,
}

impl Operation {
    /// All operations, in a fixed order.
    pub const ALL: [Operation; 3] = [Operation::Insert, Operation::Update, Operation::Delete];

    /// Lower-case name used in channel names: `"insert"`, `"update"`, `"delete"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }

    /// The trigger row variable holding the changed row: `OLD` for DELETE, else `NEW`.
    pub(crate) fn row_variable(self) -> &'static str {
        match self {
            Operation::Delete => "OLD",
            Operation::Insert | Operation::Update => "NEW",
        }
    }

    /// The SQL keyword: `INSERT`, `UPDATE` or `DELETE`.
    pub fn sql_keyword(self) -> &'static str {
        match self {
            Operation::Insert => "INSERT",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.sql_keyword())
    }
}
