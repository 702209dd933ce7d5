//! The names of the metrics sqlnotify emits through the [`metrics`](https://docs.rs/metrics)
//! facade, and of their labels.
//!
//! sqlnotify never installs a recorder: install the exporter you like (Prometheus, StatsD,
//! OpenTelemetry …) **before** starting a notifier — a notifier registers its counters and
//! gauges once, when it starts (and each handler, each named consumer's backlog count when
//! they start), and handles registered while no recorder is installed stay no-ops. With no
//! recorder, emitting costs next to nothing.
//!
//! Counters end in `_total`. Labels are few and bounded: the channel (one per watch), the
//! named consumer (one per notifier), the handler's name, the dialect — never a row key or a
//! subscription. Counters that carry no label add up every notifier of the process; so do
//! the gauges `sqlnotify_events_in_flight` and `sqlnotify_events_queued` (they move by
//! increments). The same counts, per notifier, are in [`Stats`](crate::Stats).
//!
//! ```no_run
//! // Somewhere that reads them, e.g. a test with a recorder of its own:
//! assert_eq!(sqlnotify::metrics::EVENTS_DELIVERED, "sqlnotify_events_delivered_total");
//! ```

/// Label: the channel an event came on (see [`Channel::name`](crate::Channel::name)); `*`
/// for the subscriptions to every channel (the relay's feed).
pub const LABEL_CHANNEL: &str = "channel";
/// Label: a named consumer ([`consumer`](crate::NotifierBuilder::consumer)).
pub const LABEL_CONSUMER: &str = "consumer";
/// Label: a handler's name ([`Handling::new`](crate::Handling::new)).
pub const LABEL_HANDLER: &str = "handler";
/// Label: the database a listener reads, `PostgreSQL`, `SQLite` or `MySQL`.
pub const LABEL_DIALECT: &str = "dialect";

/// Counter: notifications read by listeners, a statement-capture journal row counting as the
/// rows it carries (as [`Stats::received`](crate::Stats::received)). No label.
pub const EVENTS_RECEIVED: &str = "sqlnotify_events_received_total";
/// Counter: notifications that could not be decoded, logged and dropped
/// ([`Stats::malformed`](crate::Stats::malformed)). No label.
pub const EVENTS_MALFORMED: &str = "sqlnotify_events_malformed_total";
/// Counter, by `channel`: events handed to a subscriber, one per subscriber per event
/// ([`Stats::delivered`](crate::Stats::delivered)).
pub const EVENTS_DELIVERED: &str = "sqlnotify_events_delivered_total";
/// Counter, by `channel`: events a subscription did not get because its filters rejected
/// them ([`Stats::filtered_out`](crate::Stats::filtered_out)).
pub const EVENTS_FILTERED: &str = "sqlnotify_events_filtered_total";
/// Counter, by `channel`: events a subscription selected but never got — dropped by its
/// overflow policy (a slow subscriber), or still waiting when its receiver went away, it was
/// unsubscribed or the notifier stopped ([`Stats::dropped`](crate::Stats::dropped)).
pub const EVENTS_DROPPED: &str = "sqlnotify_events_dropped_total";
/// Counter, by `channel`: [`Status::Lagged`](crate::Status::Lagged) notices published (each
/// reports one subscription's drops since its previous notice).
pub const LAGGED: &str = "sqlnotify_lagged_total";
/// Counter, by `dialect`: listener restarts after a lost connection (each is a reconnect;
/// [`Stats::restarts`](crate::Stats::restarts)).
pub const LISTENER_RESTARTS: &str = "sqlnotify_listener_restarts_total";
/// Gauge: events read by listeners that have not reached the subscriptions yet (being
/// decoded, or waiting for the registry; [`Stats::in_flight`](crate::Stats::in_flight)).
/// No label; 0 when every pipeline has caught up.
pub const EVENTS_IN_FLIGHT: &str = "sqlnotify_events_in_flight";
/// Gauge: events waiting in subscriber buffers ([`Stats::queued`](crate::Stats::queued)).
/// No label.
pub const EVENTS_QUEUED: &str = "sqlnotify_events_queued";
/// Gauge, by `consumer`: a running named consumer's backlog in journal rows — on its channels,
/// at or after its saved position ([`Stats::backlog`](crate::Stats::backlog)); counted in the
/// database every 2 s.
pub const CONSUMER_BACKLOG: &str = "sqlnotify_consumer_backlog_rows";
/// Gauge, by `consumer`: how long ago the oldest journal row of a running named consumer's
/// backlog was written, in seconds, by the database's clock (0 with no backlog); counted
/// with [`CONSUMER_BACKLOG`].
pub const CONSUMER_LAG: &str = "sqlnotify_consumer_lag_seconds";
/// Counter, by `handler`: events a handler ([`Notifier::handle`](crate::Notifier::handle))
/// handled successfully ([`Stats::handled`](crate::Stats::handled)).
pub const HANDLER_HANDLED: &str = "sqlnotify_handler_handled_total";
/// Counter, by `handler`: failed handler attempts, errors and panics
/// ([`Stats::handler_errors`](crate::Stats::handler_errors)).
pub const HANDLER_ERRORS: &str = "sqlnotify_handler_errors_total";
/// Counter, by `handler`: failed attempts scheduled to be tried again
/// ([`Stats::retries`](crate::Stats::retries)).
pub const HANDLER_RETRIES: &str = "sqlnotify_handler_retries_total";
/// Counter, by `handler`: events stored as dead letters after their last attempt failed
/// ([`Stats::dead_lettered`](crate::Stats::dead_lettered)).
pub const HANDLER_DEAD_LETTERED: &str = "sqlnotify_handler_dead_lettered_total";
/// Gauge: clients connected to the server-sent-events endpoint (`sqlnotify::web`, feature
/// `web`), over every endpoint of the process.
pub const SSE_CLIENTS: &str = "sqlnotify_sse_clients";

/// Every metric name above, for exporters that want to describe or allow-list them.
pub const ALL: [&str; 16] = [
    EVENTS_RECEIVED,
    EVENTS_MALFORMED,
    EVENTS_DELIVERED,
    EVENTS_FILTERED,
    EVENTS_DROPPED,
    LAGGED,
    LISTENER_RESTARTS,
    EVENTS_IN_FLIGHT,
    EVENTS_QUEUED,
    CONSUMER_BACKLOG,
    CONSUMER_LAG,
    HANDLER_HANDLED,
    HANDLER_ERRORS,
    HANDLER_RETRIES,
    HANDLER_DEAD_LETTERED,
    SSE_CLIENTS,
];
