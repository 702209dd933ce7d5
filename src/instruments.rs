//! Handles on the metrics sqlnotify emits (named in `metrics.rs`), registered once — when a
//! pipeline, a channel's first subscription, a handler or a backlog count starts — so that
//! the hot path only bumps a handle (a no-op without a recorder), never looks a metric up
//! by name and labels per event.

use ::metrics::{counter, gauge, Counter, Gauge};

use crate::metrics::*;

/// A pipeline's metrics that carry no label.
pub(crate) struct PipelineMetrics {
    pub received: Counter,
    pub malformed: Counter,
    /// Moved by increments, so several notifiers add up.
    pub in_flight: Gauge,
    /// Moved by increments, so several notifiers add up.
    pub queued: Gauge,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        PipelineMetrics {
            received: counter!(EVENTS_RECEIVED),
            malformed: counter!(EVENTS_MALFORMED),
            in_flight: gauge!(EVENTS_IN_FLIGHT),
            queued: gauge!(EVENTS_QUEUED),
        }
    }
}

impl std::fmt::Debug for PipelineMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineMetrics").finish_non_exhaustive()
    }
}

/// One channel's routing counters (the registry keeps them with the channel's subscriptions).
#[derive(Clone)]
pub(crate) struct ChannelMetrics {
    pub delivered: Counter,
    pub filtered: Counter,
    pub dropped: Counter,
    pub lagged: Counter,
}

impl ChannelMetrics {
    pub fn new(channel: &str) -> Self {
        ChannelMetrics {
            delivered: counter!(EVENTS_DELIVERED, LABEL_CHANNEL => channel.to_string()),
            filtered: counter!(EVENTS_FILTERED, LABEL_CHANNEL => channel.to_string()),
            dropped: counter!(EVENTS_DROPPED, LABEL_CHANNEL => channel.to_string()),
            lagged: counter!(LAGGED, LABEL_CHANNEL => channel.to_string()),
        }
    }
}

/// A handler's outcome counters.
pub(crate) struct HandlerMetrics {
    pub handled: Counter,
    pub errors: Counter,
    pub retries: Counter,
    pub dead_lettered: Counter,
}

impl HandlerMetrics {
    pub fn new(handler: &str) -> Self {
        HandlerMetrics {
            handled: counter!(HANDLER_HANDLED, LABEL_HANDLER => handler.to_string()),
            errors: counter!(HANDLER_ERRORS, LABEL_HANDLER => handler.to_string()),
            retries: counter!(HANDLER_RETRIES, LABEL_HANDLER => handler.to_string()),
            dead_lettered: counter!(HANDLER_DEAD_LETTERED, LABEL_HANDLER => handler.to_string()),
        }
    }
}

/// A running named consumer's gauges.
pub(crate) struct ConsumerMetrics {
    pub backlog: Gauge,
    pub lag: Gauge,
}

impl ConsumerMetrics {
    pub fn new(consumer: &str) -> Self {
        ConsumerMetrics {
            backlog: gauge!(CONSUMER_BACKLOG, LABEL_CONSUMER => consumer.to_string()),
            lag: gauge!(CONSUMER_LAG, LABEL_CONSUMER => consumer.to_string()),
        }
    }
}

/// Counts a listener restart (rare: looked up by name each time).
pub(crate) fn listener_restarted(dialect: &'static str) {
    counter!(LISTENER_RESTARTS, LABEL_DIALECT => dialect).increment(1);
}
