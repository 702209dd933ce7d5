//! Handlers: subscriptions whose handler answers ok or error
//! ([`Notifier::handle`](crate::Notifier::handle),
//! [`Notifier::handle_actor`](crate::Notifier::handle_actor)). Built on acknowledged
//! subscriptions: an event is acknowledged — and a named consumer's position may move past it
//! — once its handler succeeded, or once it failed every allowed attempt and is stored as a
//! dead letter. Failures are retried with capped, jittered backoff; events of one key are
//! handled one at a time in commit order, several keys at once.

pub(crate) mod engine;
pub(crate) mod keys;

use std::time::Duration;

use actix::Message;

use crate::backoff::Backoff;
use crate::durations::capped;
use crate::error::{Error, Result};
use crate::event::ChangeEvent;

/// What a handler returns when it could not handle an event: anything that is an error
/// (`"text".into()` works too). Its text is stored with the dead letter (NUL characters
/// replaced with U+FFFD, cut at 64 KiB).
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One attempt to handle an event, the message an actor handler
/// ([`Notifier::handle_actor`](crate::Notifier::handle_actor)) receives. Answer `Ok(())` when
/// the event is handled, or an error to have it retried (and, after the last attempt, stored
/// as a dead letter).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Attempt {
    /// The event.
    pub event: ChangeEvent,
    /// Which attempt this is, from 1 (counted across restarts and consumer-group failovers on
    /// the journal tiers).
    pub attempt: u32,
}

impl Message for Attempt {
    type Result = std::result::Result<(), HandlerError>;
}

/// Longest handler name: it is stored with every dead letter.
pub const MAX_HANDLER_NAME: usize = 200;

/// How a handler is run: its name, how often and how patiently a failing event is retried,
/// and how many keys are handled at once.
///
/// ```
/// use std::time::Duration;
/// use sqlnotify::Handling;
///
/// let handling = Handling::new("welcome-mail")
///     .max_attempts(8)
///     .backoff(Duration::from_millis(200), Duration::from_secs(60))
///     .keys_in_flight(32);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handling {
    pub(crate) name: String,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) keys_in_flight: usize,
    pub(crate) max_waiting: usize,
    pub(crate) poll: Duration,
}

impl Handling {
    /// A handler named `name` — the name its dead letters are stored and retried under, so
    /// give each handler of a database its own, and keep it across restarts (at most
    /// [`MAX_HANDLER_NAME`] bytes, no control characters). Defaults: 5
    /// attempts, backoff from 100 ms doubling to 30 s (each delay jittered down by up to half),
    /// 16 keys in flight, 10,000 events waiting, requested retries looked for every second.
    pub fn new(name: impl Into<String>) -> Self {
        Handling {
            name: name.into(),
            max_attempts: 5,
            backoff: Backoff {
                base: Duration::from_millis(100),
                max: Duration::from_secs(30),
            },
            keys_in_flight: 16,
            max_waiting: 10_000,
            poll: Duration::from_secs(1),
        }
    }

    /// Attempts per event (at least 1) before it becomes a dead letter.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The delay before the first retry, doubling up to `max`; each delay is scaled by a
    /// random factor in `[0.5, 1.0]` so that many failing keys do not retry in lock-step.
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = Backoff {
            base: capped(first),
            max: capped(max),
        };
        self
    }

    /// How many handler calls run at once (at least 1), each on a different key.
    pub fn keys_in_flight(mut self, keys: usize) -> Self {
        self.keys_in_flight = keys;
        self
    }

    /// How many events the handler takes in before it stops reading (waiting for a key, a
    /// slot or a retry). Beyond it, events wait in the subscription's buffer, and then the
    /// listener waits: memory stays bounded when one key fails for a long time.
    pub fn max_waiting(mut self, events: usize) -> Self {
        self.max_waiting = events;
        self
    }

    /// How often the handler's active process looks for dead letters a retry was asked for
    /// ([`DeadLetters::retry`](crate::DeadLetters::retry)).
    pub fn redelivery_poll(mut self, every: Duration) -> Self {
        self.poll = capped(every);
        self
    }

    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn check(&self) -> Result<()> {
        let invalid = |reason: String| Error::InvalidOption {
            option: "Handling",
            reason,
        };
        if self.name.trim().is_empty() {
            return Err(invalid("a handler needs a name".into()));
        }
        if self.name.len() > MAX_HANDLER_NAME {
            return Err(invalid(format!(
                "handler name {:?}… is longer than {MAX_HANDLER_NAME} bytes",
                self.name.chars().take(40).collect::<String>()
            )));
        }
        if let Some(c) = self.name.chars().find(|c| c.is_control()) {
            return Err(invalid(format!(
                "handler name {:?} holds a control character ({c:?}): it is stored with every \
                 dead letter, and a NUL cannot be (PostgreSQL refuses it in text)",
                self.name
            )));
        }
        if self.max_attempts == 0 {
            return Err(invalid(format!(
                "handler {:?}: max_attempts must be at least 1",
                self.name
            )));
        }
        if self.backoff.base > self.backoff.max {
            return Err(invalid(format!(
                "handler {:?}: the first backoff delay ({:?}) is longer than the largest ({:?})",
                self.name, self.backoff.base, self.backoff.max
            )));
        }
        if self.keys_in_flight == 0 || self.max_waiting == 0 {
            return Err(invalid(format!(
                "handler {:?}: keys_in_flight and max_waiting must be at least 1",
                self.name
            )));
        }
        if self.poll.is_zero() {
            return Err(invalid(format!(
                "handler {:?}: redelivery_poll must be longer than zero",
                self.name
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_named_errors() {
        assert!(Handling::new("mail").check().is_ok());
        for (handling, needle) in [
            (Handling::new(" "), "needs a name"),
            (Handling::new("x".repeat(201)), "longer than 200"),
            (
                Handling::new("mail\0box"),
                "handler name \"mail\\0box\" holds a control character ('\\0')",
            ),
            (Handling::new("mail\n"), "holds a control character ('\\n')"),
            (Handling::new("mail").max_attempts(0), "max_attempts"),
            (
                Handling::new("mail").backoff(Duration::from_secs(2), Duration::from_secs(1)),
                "first backoff delay",
            ),
            (Handling::new("mail").keys_in_flight(0), "keys_in_flight"),
            (
                Handling::new("mail").redelivery_poll(Duration::ZERO),
                "redelivery_poll",
            ),
        ] {
            let e = handling.check().unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        }
    }
}
