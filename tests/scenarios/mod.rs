//! Scenarios written once and run against every dialect and tier they apply to (issue 12 §5):
//! each is an async function taking a [`Backend`](crate::common::backend::Backend), and each
//! dialect's test file runs it with [`scenarios!`], one `#[actix_rt::test]` per scenario.
//!
//! By topic: [`delivery`] (operations, keys, filters, trigger columns, several notifiers),
//! [`custom`] (custom notifications), [`lifecycle`] (drift, revoke, cleanup) and [`resume`]
//! (named consumers resuming after a restart), [`handling`] (handlers: retries, dead letters, per-key order), [`old_values`] (old values and changed columns), [`context`] (who: the writer's session values), [`retention`] (journal purge) and [`validation`] (watches the catalog refutes). Named-consumer retention scenarios are in
//! `common/consumers.rs`.
#![allow(dead_code)]

pub mod context;
pub mod custom;
pub mod delivery;
pub mod handling;
pub mod lifecycle;
pub mod old_values;
pub mod resume;
pub mod retention;
pub mod validation;

/// Every scenario, as `#[actix_rt::test]` functions for a journal dialect (SQLite, MySQL)
/// whose test database `$backend` implements both `Backend` and `ConsumerDb`.
#[macro_export]
macro_rules! journal_dialect_scenarios {
    ($backend:expr) => {
        $crate::scenarios!($backend =>
            delivery::insert_update_delete_carry_key_and_extra_columns_in_commit_order,
            delivery::composite_keys_come_in_key_order_unless_declared,
            delivery::trigger_columns_fire_only_on_a_real_change,
            delivery::filters_match_typed_values,
            delivery::two_notifiers_each_receive_every_event,
            delivery::notifiers_starting_together_on_a_fresh_database_all_start,
            custom::custom_notifications_reach_every_notifier_and_bad_payloads_are_rejected,
            lifecycle::unchanged_watches_are_not_reinstalled_and_drift_is_an_error_or_a_replacement,
            lifecycle::cleanup_on_start_cleanup_and_cleanup_on_stop,
            validation::invalid_watches_fail_through_the_catalog_and_install_nothing,
            validation::labels_differing_only_in_case_are_rejected,
            resume::a_named_consumer_resumes_where_it_stopped,
            resume::an_unacknowledged_event_is_delivered_again_after_a_restart,
            resume::a_new_consumer_and_an_unnamed_notifier_start_at_the_head,
            resume::a_running_consumer_saves_its_cursor_while_the_database_is_idle,
            retention::retention_trims_the_journal_but_keeps_what_an_active_consumer_has_not_read,
            handling::a_flaky_handler_handles_every_event_once_in_key_order,
            handling::a_poison_event_becomes_a_dead_letter_and_a_cli_retry_delivers_it_again,
            handling::a_retried_dead_letter_that_fails_again_is_not_stranded_by_a_stop,
            handling::a_restart_in_the_middle_of_a_retry_continues_it,
            handling::a_failover_continues_retries_and_key_order,
            handling::a_handler_gone_during_a_dead_letter_retry_keeps_the_position_before_later_events,
            handling::unsubscribing_a_handler_lets_go_of_the_events_it_had_not_handled,
        );
    };
}

/// `#[actix_rt::test]` functions running scenarios on the backend `$backend` (an expression
/// evaluated afresh in every test, e.g. `TempDb::new()` or `Pg::new(Tier::Durable).await`):
/// `scenarios!(backend => delivery::a_scenario, lifecycle::another);`
#[macro_export]
macro_rules! scenarios {
    ($backend:expr => { $($topic:ident :: $scenario:ident),* $(,)? }) => {
        $crate::scenarios!($backend => $($topic::$scenario),*);
    };
    ($backend:expr => $($topic:ident :: $scenario:ident),* $(,)?) => {
        $(
            #[actix_rt::test]
            async fn $scenario() {
                let db = $backend;
                $crate::scenarios::$topic::$scenario(&db).await;
            }
        )*
    };
}

/// The scenarios in braces on each PostgreSQL tier listed, in a module per tier:
/// `pg_tier_scenarios!([notify_tier: Notify, durable_tier: Durable] { delivery::a_scenario });`
#[macro_export]
macro_rules! pg_tier_scenarios {
    ([$($module:ident: $tier:ident),* $(,)?] $list:tt) => {
        $(
            mod $module {
                $crate::scenarios!(
                    $crate::common::backend::Pg::new(sqlnotify::Tier::$tier).await => $list
                );
            }
        )*
    };
}
