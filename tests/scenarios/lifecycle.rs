//! Lifecycle of installed objects: unchanged watches are left alone, changed ones are drift
//! (an error, or a replacement when revoking), a trigger dropped by hand is reinstalled, and
//! cleanup on start, on demand and on stop removes what it should and nothing else.

use serde_json::json;
use sqlnotify::{Error, Operation, Subscription};

use crate::common::backend::{Backend, Kind};
use crate::common::{ids, Events};

/// Unchanged watches cause no DDL; a changed one is a drift error before any DDL (the whole
/// install is refused) or, revoking, a replacement carrying the new columns; a trigger
/// dropped by hand is reinstalled although its catalog entry is unchanged.
pub async fn unchanged_watches_are_not_reinstalled_and_drift_is_an_error_or_a_replacement(
    db: &impl Backend,
) {
    db.run("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, name TEXT)")
        .await;
    let channel = db.channel_of("users", Operation::Update);
    let v1 = db
        .watch("users", Operation::Update)
        .extra_columns(["email"]);
    let n = db.builder().watch(v1.clone()).start().await.unwrap();
    n.stop().await.unwrap();
    let (before, definition, at) = (
        db.fingerprint(&channel).await,
        db.definition(&channel).await,
        db.installed_at(&channel).await,
    );

    // unchanged: not touched at all
    let n = db
        .builder()
        .watch(v1.clone())
        .revoke_on_model_change(false)
        .start()
        .await
        .unwrap();
    assert_eq!(db.fingerprint(&channel).await, before, "no DDL ran");
    n.stop().await.unwrap();

    // changed extra columns, revoke off: drift error, nothing changed
    let v2 = db
        .watch("users", Operation::Update)
        .extra_columns(["email", "name"]);
    let e = db
        .builder()
        .watch(db.watch("users", Operation::Insert))
        .watch(v2.clone())
        .revoke_on_model_change(false)
        .start()
        .await
        .unwrap_err();
    let table = format!("{}.users", db.schema());
    assert!(
        matches!(&e, Error::DefinitionDrift { channel: c, table: t, .. } if c == &channel && t == &table),
        "{e:?}"
    );
    assert_eq!(db.fingerprint(&channel).await, before);
    assert_eq!(
        db.installed_triggers().await,
        [channel.as_str()],
        "a drift error comes before any DDL: the new watch was not installed either"
    );

    // revoke on: replaced, the new column is carried
    let n = db
        .builder()
        .watch(v2.clone())
        .revoke_on_model_change(true)
        .start()
        .await
        .unwrap();
    assert_ne!(db.fingerprint(&channel).await, before);
    assert_ne!(db.definition(&channel).await, definition);
    assert!(db.installed_at(&channel).await >= at);
    let mut ev = Events::subscribe(&n, Subscription::new("users", Operation::Update)).await;
    db.run("INSERT INTO users VALUES (1, 'a', 'Ann'); UPDATE users SET email = 'b';")
        .await;
    let e = ev.next().await;
    assert_eq!(e.get("email"), Some(&json!("b")));
    assert_eq!(e.get("name"), Some(&json!("Ann")));
    n.stop().await.unwrap();

    // a trigger dropped by hand is reinstalled even though its catalog entry is unchanged
    db.run(&match db.kind() {
        Kind::Mysql => format!("DROP TRIGGER `{channel}`"),
        Kind::Sqlite => format!("DROP TRIGGER \"{channel}\""),
        Kind::Postgres(_) => format!("DROP TRIGGER \"{channel}\" ON users"),
    })
    .await;
    let unchanged = db.builder().watch(v2).revoke_on_model_change(false);
    let n = unchanged.start().await.unwrap();
    assert_eq!(db.installed_triggers().await, [channel.as_str()]);
    n.stop().await.unwrap();

    if db.kind() == Kind::Mysql {
        // a column whose type changes (text -> blob) changes the trigger: drift
        db.run("ALTER TABLE users MODIFY name BLOB").await;
        let e = unchanged.start().await.unwrap_err();
        assert!(matches!(e, Error::DefinitionDrift { .. }), "{e:?}");
    }
}

/// Watches dropped from the code stay installed until `cleanup_on_start`, which removes
/// them (they write nothing more); `cleanup()` removes everything and needs no watches;
/// `cleanup_on_stop` removes this notifier's triggers only, and the application's writes and
/// the other notifier keep working.
pub async fn cleanup_on_start_cleanup_and_cleanup_on_stop(db: &impl Backend) {
    db.run("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT); CREATE TABLE other (id INTEGER PRIMARY KEY);")
        .await;
    let insert = db.channel_of("users", Operation::Insert);
    let n = db
        .builder()
        .watch(db.watch("users", Operation::Insert))
        .watch(db.watch("users", Operation::Delete))
        .watch(
            db.watch("users", Operation::Update)
                .channel_label("changes"),
        )
        .start()
        .await
        .unwrap();
    n.stop().await.unwrap();
    let mut all = vec![
        "sqlnotify_changes".to_string(),
        db.channel_of("users", Operation::Delete),
        insert.clone(),
    ];
    all.sort();
    assert_eq!(db.installed_triggers().await, all);

    // without cleanup, watches no longer in the code stay installed
    let n = db
        .builder()
        .watch(db.watch("users", Operation::Insert))
        .start()
        .await
        .unwrap();
    n.stop().await.unwrap();
    assert_eq!(db.installed_triggers().await, all);

    let n = db
        .builder()
        .watch(db.watch("users", Operation::Insert))
        .cleanup_on_start(true)
        .start()
        .await
        .unwrap();
    assert_eq!(db.installed_triggers().await, [insert.as_str()]);
    assert_eq!(db.catalog_channels().await, [insert.as_str()]);
    let mut ev = Events::subscribe(&n, Subscription::new("users", Operation::Insert)).await;
    db.run(
        "INSERT INTO users VALUES (1, 'a'); DELETE FROM users; INSERT INTO users VALUES (2, 'b');",
    )
    .await;
    assert_eq!(ids(&ev.take(2).await), [1, 2]);
    ev.assert_empty();
    n.stop().await.unwrap();
    if db.journal() {
        assert_eq!(
            db.number(&format!(
                "SELECT count(*) FROM {} WHERE channel <> '{insert}'",
                db.journal_table()
            ))
            .await,
            0,
            "the removed triggers wrote nothing"
        );
    }

    // cleanup() removes everything, needs no watches
    assert_eq!(db.builder().cleanup().await.unwrap(), 1);
    assert!(db.installed_triggers().await.is_empty());
    assert!(db.catalog_channels().await.is_empty());
    assert_eq!(db.builder().cleanup().await.unwrap(), 0);

    // cleanup_on_stop removes this notifier's triggers only
    let keep = db
        .builder()
        .watch(db.watch("other", Operation::Insert))
        .start()
        .await
        .unwrap();
    let n = db
        .builder()
        .watch(db.watch("users", Operation::Insert))
        .watch(db.watch("users", Operation::Update))
        .cleanup_on_stop(true)
        .start()
        .await
        .unwrap();
    assert_eq!(db.installed_triggers().await.len(), 3);
    let mut ev = Events::subscribe(&n, Subscription::new("users", Operation::Insert)).await;
    db.run("INSERT INTO users VALUES (10, 'x')").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(10));
    n.stop().await.unwrap();
    let other = db.channel_of("other", Operation::Insert);
    assert_eq!(db.installed_triggers().await, [other.as_str()]);
    assert_eq!(db.catalog_channels().await, [other.as_str()]);
    // the application's writes still work, and the other notifier still delivers
    let mut ev = Events::subscribe(&keep, Subscription::new("other", Operation::Insert)).await;
    db.run("INSERT INTO users VALUES (5, 'x'); INSERT INTO other VALUES (3);")
        .await;
    assert_eq!(ev.next().await.id().as_i64(), Some(3));
    ev.assert_empty();
    keep.stop().await.unwrap();
    assert!(matches!(n.stop().await, Err(Error::NotRunning)));
}
