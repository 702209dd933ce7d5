//! Custom notifications (`Notifier::notify`) on journal dialects: they reach every notifier
//! like trigger events, invalid payloads are refused before anything is written, and there is
//! no size limit.

use serde_json::json;
use sqlnotify::{Error, Operation, Subscription};

use crate::common::backend::Backend;
use crate::common::Events;

/// Custom notifications reach every notifier; bad payloads and unwatched channels are
/// refused without a journal row; a 1 MB payload with quotes and backslashes goes through
/// whole.
pub async fn custom_notifications_reach_every_notifier_and_bad_payloads_are_rejected(
    db: &impl Backend,
) {
    db.run("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        .await;
    let builder = db.builder().watch(
        db.watch("users", Operation::Insert)
            .extra_columns(["email"]),
    );
    let (n1, n2) = (
        builder.start().await.unwrap(),
        builder.start().await.unwrap(),
    );
    let mut e1 = Events::subscribe(&n1, Subscription::new("users", Operation::Insert)).await;
    let mut e2 = Events::subscribe(&n2, Subscription::new("users", Operation::Insert)).await;

    n1.notify("users", Operation::Insert, json!({"id": 7, "email": "x@y"}))
        .await
        .unwrap();
    for events in [&mut e1, &mut e2] {
        let e = events.next().await;
        assert_eq!(e.channel(), db.channel_of("users", Operation::Insert));
        assert_eq!(e.id().as_i64(), Some(7));
        assert_eq!(e.get("email"), Some(&json!("x@y")));
        assert!(e.sequence().is_some());
    }

    // invalid payloads are rejected before anything is written
    let journal = db.journal_rows().await;
    for bad in [
        json!([1, 2]),
        json!("text"),
        json!({"email": "no key"}),
        json!({"id": 1, "__sqlnotify": {"overflow": 1}}),
    ] {
        let e = n1
            .notify("users", Operation::Insert, bad.clone())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidPayload { .. }), "{bad}: {e:?}");
    }
    let e = n1
        .notify("users", Operation::Delete, json!({"id": 1}))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotWatched { .. }), "{e:?}");
    assert_eq!(db.journal_rows().await, journal);

    // no size limit: a 1 MB payload with quotes and backslashes goes through whole (from the
    // second notifier)
    let big = "x'\\\"".repeat(256 * 1024);
    n2.notify_with(
        sqlnotify::CustomEvent::new(
            "users",
            Operation::Insert,
            json!({"id": 8, "email": big.clone()}),
        )
        .allow_overflow(false),
    )
    .await
    .unwrap();
    for events in [&mut e1, &mut e2] {
        let e = events.next().await;
        assert_eq!(
            e.id().as_i64(),
            Some(8),
            "the invalid payloads sent nothing"
        );
        assert!(!e.is_truncated());
        assert_eq!(e.get("email").and_then(|v| v.as_str()), Some(big.as_str()));
        events.assert_empty();
    }
    n1.stop().await.unwrap();
    n2.stop().await.unwrap();
}
