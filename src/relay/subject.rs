//! What a relayed event is called in the broker: its subject
//! (`PREFIX.schema.table.operation[.P]`), its partition, its stable message id, and whether a
//! stream's subject filters cover a subject.

use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Channel};

/// How events are named in the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Naming {
    /// The first subject token(s), e.g. `sqlnotify` or `app.cdc`.
    pub prefix: String,
    /// Subjects end in a partition number `0..partitions` when set.
    pub partitions: Option<u32>,
    /// What makes message ids unique to this database (see `Relay::source`).
    pub source: String,
}

impl Naming {
    /// The subject of `channel`'s events without the partition token; an error names the
    /// table whose schema or name cannot be a subject token.
    pub fn base(&self, channel: &Channel) -> Result<String> {
        for (what, token) in [("schema", channel.schema()), ("table", channel.table())] {
            if let Some(reason) = bad_token(token) {
                return Err(Error::InvalidOption {
                    option: "relay",
                    reason: format!(
                        "the {what} of {}.{} cannot be a NATS subject token: {reason}",
                        channel.schema(),
                        channel.table()
                    ),
                });
            }
        }
        Ok(format!(
            "{}.{}.{}.{}",
            self.prefix,
            channel.schema(),
            channel.table(),
            channel.operation().as_str()
        ))
    }

    /// Every subject `channel`'s events can be published to.
    pub fn subjects(&self, channel: &Channel) -> Result<Vec<String>> {
        let base = self.base(channel)?;
        Ok(match self.partitions {
            None => vec![base],
            Some(n) => (0..n).map(|p| format!("{base}.{p}")).collect(),
        })
    }

    /// The subject `event` goes to, given its channel's `base` subject.
    pub fn subject(&self, base: &str, event: &ChangeEvent) -> String {
        match self.partitions {
            None => base.to_string(),
            Some(n) => format!("{base}.{}", partition(&key_text(event), n)),
        }
    }

    /// The event's message id: the same whichever process relays it, after any restart.
    /// `None` for an event without a journal position (PostgreSQL's notify tier).
    pub fn message_id(&self, event: &ChangeEvent) -> Option<String> {
        let sequence = event.sequence()?;
        Some(format!("{}:{sequence}:{}", self.source, event.part()))
    }
}

/// The prefix given by the user, checked token by token.
pub(crate) fn check_prefix(prefix: &str) -> Result<()> {
    for token in prefix.split('.') {
        if let Some(reason) = bad_token(token) {
            return Err(Error::InvalidOption {
                option: "subject_prefix",
                reason: format!("{prefix:?} is not a NATS subject prefix: {reason}"),
            });
        }
    }
    Ok(())
}

/// Why `token` cannot be one token of a NATS subject, if it cannot.
fn bad_token(token: &str) -> Option<&'static str> {
    if token.is_empty() {
        Some("it is empty")
    } else if token.contains('.') {
        Some("it contains '.'")
    } else if token.contains(['*', '>']) {
        Some("it contains a wildcard ('*' or '>')")
    } else if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("it contains whitespace or a control character")
    } else {
        None
    }
}

/// The key as compact JSON: one value, or an array for a composite key.
pub(crate) fn key_text(event: &ChangeEvent) -> String {
    let values = event.id().values();
    let text = if values.len() == 1 {
        serde_json::to_string(&values[0])
    } else {
        serde_json::to_string(values)
    };
    text.expect("JSON values serialize")
}

/// The partition of a key (its compact JSON): FNV-1a, so every process and language that
/// hashes the same way agrees.
pub(crate) fn partition(key: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
}

/// Whether the subject filter `filter` (with `*` and `>` wildcards) matches `subject`.
pub(crate) fn covers(filter: &str, subject: &str) -> bool {
    let mut filter = filter.split('.');
    let mut subject = subject.split('.');
    loop {
        match (filter.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(f), Some(s)) if f == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_subjects_token_by_token() {
        assert!(covers("sqlnotify.>", "sqlnotify.public.t.insert"));
        assert!(covers(">", "a.b"));
        assert!(covers("sqlnotify.*.t.*", "sqlnotify.public.t.delete"));
        assert!(covers("a.b", "a.b"));
        assert!(
            !covers("sqlnotify.>", "sqlnotify"),
            "> needs one token at least"
        );
        assert!(!covers("sqlnotify.*", "sqlnotify.public.t"));
        assert!(!covers("other.>", "sqlnotify.public.t.insert"));
        assert!(!covers("a.b.c", "a.b"));
    }

    #[test]
    fn a_key_always_lands_in_the_same_partition_and_keys_spread() {
        assert_eq!(partition("42", 8), partition("42", 8));
        let used: std::collections::HashSet<u32> =
            (0..1000).map(|k| partition(&k.to_string(), 8)).collect();
        assert_eq!(used.len(), 8, "1000 keys use every one of 8 partitions");
        assert!((0..1000).all(|k| partition(&k.to_string(), 3) < 3));
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(
            partition("a", u32::MAX),
            (0xaf63_dc4c_8601_ec8c_u64 % u64::from(u32::MAX)) as u32
        );
    }

    #[test]
    fn subject_tokens_are_checked() {
        assert_eq!(bad_token("users"), None);
        assert!(bad_token("a.b").is_some());
        assert!(bad_token("a b").is_some());
        assert!(bad_token("*").is_some());
        assert!(bad_token("").is_some());
        assert!(check_prefix("app.cdc").is_ok());
        let err = check_prefix("app..cdc").unwrap_err().to_string();
        assert!(err.contains("app..cdc"), "{err}");
    }
}
