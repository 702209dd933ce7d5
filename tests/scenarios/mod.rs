//! Scenarios written once and run against every dialect and tier they apply to (issue 12 §5):
//! each is an async function taking a [`Backend`](crate::common::backend::Backend), and each
//! dialect's test file runs it with [`scenarios!`], one `#[actix_rt::test]` per scenario.
//!
//! By topic: [`delivery`] (operations, keys, filters, trigger columns, several notifiers),
//! [`custom`] (custom notifications), [`lifecycle`] (drift, revoke, cleanup) and [`resume`]
//! (named consumers resuming after a restart) and [`validation`] (watches the catalog refutes). Named-consumer retention scenarios are in
//! `common/consumers.rs`.
#![allow(dead_code)]

pub mod custom;
pub mod delivery;
pub mod lifecycle;
pub mod resume;
pub mod validation;

/// `#[actix_rt::test]` functions running scenarios on the backend `$backend` (an expression
/// evaluated afresh in every test, e.g. `TempDb::new()` or `Pg::new(Tier::Durable).await`):
/// `scenarios!(backend => delivery::a_scenario, lifecycle::another);`
#[macro_export]
macro_rules! scenarios {
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
