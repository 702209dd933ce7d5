//! Validation through the database's catalog: watches naming what does not exist, or what
//! cannot serve as a key, fail `start()` with a typed error naming it, and install nothing.

use sqlnotify::{Error, Operation, Subscription, Watch};

use crate::common::backend::Backend;
use crate::common::Events;

/// Every way a watch can name something the database does not have fails with the error
/// that names it, next to a valid watch that is not installed either; a table without a
/// primary key works once the watch names its key columns.
pub async fn invalid_watches_fail_through_the_catalog_and_install_nothing(db: &impl Backend) {
    db.run(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(100)); \
         CREATE TABLE logs (msg VARCHAR(100), at DOUBLE PRECISION); \
         CREATE VIEW active AS SELECT * FROM users;",
    )
    .await;
    let ok = db
        .watch("users", Operation::Insert)
        .extra_columns(["email"]);
    let start = |bad: Watch| {
        let builder = db.builder().watch(ok.clone()).watch(bad);
        async move { builder.start().await.unwrap_err() }
    };
    let schema = db.schema();

    let e = start(db.watch("nope", Operation::Insert)).await;
    assert!(
        matches!(&e, Error::UnknownTable { schema: s, table } if s == &schema && table == "nope"),
        "{e:?}"
    );
    let e = start(db.watch("users", Operation::Update).extra_columns(["name"])).await;
    assert!(
        matches!(&e, Error::UnknownColumn { column, list: "extra_columns", .. } if column == "name"),
        "{e:?}"
    );
    let e = start(
        db.watch("users", Operation::Update)
            .trigger_columns(["name"]),
    )
    .await;
    assert!(
        matches!(&e, Error::UnknownColumn { column, list: "trigger_columns", .. } if column == "name"),
        "{e:?}"
    );
    let e = start(db.watch("users", Operation::Update).primary_keys(["name"])).await;
    assert!(
        matches!(&e, Error::UnknownColumn { column, list: "primary_keys", .. } if column == "name"),
        "{e:?}"
    );
    let e = start(db.watch("users", Operation::Update).primary_keys(["email"])).await;
    assert!(
        matches!(&e, Error::NotPrimaryKey { column, table, .. } if column == "email" && table == "users"),
        "{e:?}"
    );
    let e = start(db.watch("logs", Operation::Insert)).await;
    assert!(
        matches!(&e, Error::NoPrimaryKey { table, .. } if table == "logs"),
        "{e:?}"
    );
    let e = start(db.watch("active", Operation::Insert)).await;
    assert!(
        matches!(&e, Error::UnknownTable { table, .. } if table == "active"),
        "a view is not a table: {e:?}"
    );
    let e = start(db.watch("sqlnotify_no_such_schema.t", Operation::Insert)).await;
    assert!(
        matches!(&e, Error::UnknownSchema { schema } if schema == "sqlnotify_no_such_schema"),
        "{e:?}"
    );

    // nothing was installed by any failed start
    assert_eq!(db.installed_triggers().await, Vec::<String>::new());
    assert_eq!(
        db.sqlnotify_objects().await,
        0,
        "no sqlnotify table or function"
    );

    // a table without a primary key works when the watch names the key columns
    let notifier = db
        .builder()
        .watch(ok)
        .watch(db.watch("logs", Operation::Insert).primary_keys(["msg"]))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("logs", Operation::Insert)).await;
    db.run("INSERT INTO logs VALUES ('hello', 1.0)").await;
    assert_eq!(ev.next().await.id().as_str(), Some("hello"));
    ev.assert_empty();
    notifier.stop().await.unwrap();
}

/// Where trigger names ignore case (SQLite, MySQL), two watches whose channels differ only in
/// case would be one trigger: refused, whether both are labels or a label matches a plain
/// channel; nothing is installed.
pub async fn labels_differing_only_in_case_are_rejected(db: &impl Backend) {
    db.run("CREATE TABLE t (id INTEGER PRIMARY KEY)").await;
    let e = db
        .builder()
        .watch(db.watch("t", Operation::Insert).channel_label("Changes"))
        .watch(db.watch("t", Operation::Update).channel_label("changes"))
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::DuplicateWatch { channel, .. } if channel == "sqlnotify_changes"),
        "{e:?}"
    );
    assert!(db.installed_triggers().await.is_empty());
    let plain = db.channel_of("t", Operation::Insert);
    let shouting = plain["sqlnotify_".len()..].to_uppercase();
    let e = db
        .builder()
        .watch(db.watch("t", Operation::Insert))
        .watch(db.watch("t", Operation::Update).channel_label(shouting))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DuplicateWatch { .. }), "{e:?}");
    assert!(db.installed_triggers().await.is_empty());
    assert_eq!(db.sqlnotify_objects().await, 0);
}
