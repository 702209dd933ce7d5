//! [`CustomEvent`]: an event the application sends itself on a watched channel
//! ([`Notifier::notify_with`](crate::Notifier::notify_with)), delivered like a trigger's.

use serde_json::Value;

use crate::operation::Operation;
use crate::subscription::Subscription;

/// A custom event for [`Notifier::notify_with`](crate::Notifier::notify_with): a JSON object sent on a watched channel and
/// delivered to subscribers exactly like a trigger's event.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomEvent {
    pub(crate) subscription: Subscription,
    pub(crate) payload: Value,
    pub(crate) allow_overflow: bool,
}

impl CustomEvent {
    /// An event for the watch of `operation` on `table` (no channel label). `payload` must be
    /// a JSON object carrying at least the channel's key columns.
    pub fn new(table: impl Into<String>, operation: Operation, payload: Value) -> Self {
        CustomEvent {
            subscription: Subscription::new(table, operation),
            payload,
            allow_overflow: true,
        }
    }

    /// Sends it on the watch with this channel label instead.
    pub fn channel_label(mut self, label: impl Into<String>) -> Self {
        self.subscription = self.subscription.channel_label(label);
        self
    }

    /// Whether a payload over the NOTIFY limit may go through the overflow table. When false,
    /// such a payload fails with [`Error::PayloadTooLarge`](crate::Error::PayloadTooLarge) and nothing is sent. Default: true.
    pub fn allow_overflow(mut self, yes: bool) -> Self {
        self.allow_overflow = yes;
        self
    }
}
