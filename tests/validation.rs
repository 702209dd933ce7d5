//! start()-time validation and connection settings against a real PostgreSQL: every invalid
//! watch is a distinct, named error, a failed start installs nothing, URLs are checked, and the
//! listener connects with exactly the settings the user gave.

mod common;
mod scenarios;

use common::{Events, TestDb};
use serde_json::json;
use sqlnotify::{Error, Key, Notifier, NotifierBuilder, Operation, Subscription, Watch};

/// Starts `builder`, expecting it to fail, and returns the error.
async fn start_err(builder: &NotifierBuilder) -> Error {
    match builder.start().await {
        Ok(notifier) => {
            let channels: Vec<String> = notifier
                .channels()
                .iter()
                .map(|c| c.name().to_string())
                .collect();
            let _ = notifier.stop().await;
            panic!("start() should have failed, but it is listening on {channels:?}")
        }
        Err(e) => e,
    }
}

/// Asserts the message names every one of `parts`.
fn assert_names(e: &Error, parts: &[&str]) {
    let message = e.to_string();
    for part in parts {
        assert!(
            message.contains(part),
            "message {message:?} should name {part:?}"
        );
    }
}

/// Asserts the database holds no sqlnotify trigger, function or catalog row.
async fn assert_nothing_installed(db: &TestDb) {
    assert_eq!(
        db.count("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'sqlnotify%'")
            .await,
        0,
        "no sqlnotify trigger"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'sqlnotify'"
        )
        .await,
        0,
        "no sqlnotify function"
    );
    let catalog_rows = if db
        .count("SELECT (to_regclass('sqlnotify.catalog') IS NULL)::int::int8")
        .await
        == 1
    {
        0
    } else {
        db.count("SELECT count(*) FROM sqlnotify.catalog").await
    };
    assert_eq!(catalog_rows, 0, "no catalog row");
}

#[actix_rt::test]
async fn unknown_schema_is_named() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY)").await;
    let e =
        start_err(&Notifier::builder(&db.url).watch(Watch::new("nope.users", Operation::Insert)))
            .await;
    assert!(
        matches!(&e, Error::UnknownSchema { schema } if schema == "nope"),
        "{e:?}"
    );
    assert_names(&e, &["\"nope\""]);
    assert_nothing_installed(&db).await;
}

#[actix_rt::test]
async fn unknown_table_is_named() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE users (id int PRIMARY KEY); CREATE VIEW users_view AS SELECT * FROM users",
    )
    .await;
    for table in ["userz", "users_view"] {
        let e = start_err(
            &Notifier::builder(&db.url)
                .watch(Watch::new("users", Operation::Insert))
                .watch(Watch::new(table, Operation::Insert)),
        )
        .await;
        assert!(
            matches!(&e, Error::UnknownTable { schema, table: t } if schema == "public" && t == table),
            "{e:?}"
        );
        assert_names(&e, &["public", table]);
    }
    assert_nothing_installed(&db).await;
}

#[actix_rt::test]
async fn unknown_column_names_its_list() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, email text)")
        .await;
    let cases = [
        (
            Watch::new("users", Operation::Update).extra_columns(["email", "emial"]),
            "emial",
            "extra_columns",
        ),
        (
            Watch::new("users", Operation::Update).trigger_columns(["mail"]),
            "mail",
            "trigger_columns",
        ),
        (
            Watch::new("users", Operation::Update).primary_keys(["uid"]),
            "uid",
            "primary_keys",
        ),
    ];
    for (watch, missing, expected_list) in cases {
        let e = start_err(&Notifier::builder(&db.url).watch(watch)).await;
        match &e {
            Error::UnknownColumn {
                schema,
                table,
                column,
                list,
            } => {
                assert_eq!(
                    (schema.as_str(), table.as_str(), column.as_str(), *list),
                    ("public", "users", missing, expected_list)
                );
            }
            other => panic!("expected UnknownColumn for {missing}, got {other:?}"),
        }
        assert_names(&e, &[missing, expected_list, "users"]);
    }
    assert_nothing_installed(&db).await;
}

#[actix_rt::test]
async fn primary_keys_must_belong_to_a_composite_key() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE order_items (order_id int, item_id int, qty int, PRIMARY KEY (order_id, item_id))",
    )
    .await;
    let e = start_err(
        &Notifier::builder(&db.url)
            .watch(Watch::new("order_items", Operation::Insert).primary_keys(["order_id", "qty"])),
    )
    .await;
    assert!(
        matches!(&e, Error::NotPrimaryKey { schema, table, column }
            if schema == "public" && table == "order_items" && column == "qty"),
        "{e:?}"
    );
    assert_names(&e, &["qty", "order_items"]);
    assert_nothing_installed(&db).await;
}

#[actix_rt::test]
async fn a_table_without_primary_key_needs_primary_keys() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE log (source text, seq int, message text)")
        .await;
    let e =
        start_err(&Notifier::builder(&db.url).watch(Watch::new("log", Operation::Insert))).await;
    assert!(
        matches!(&e, Error::NoPrimaryKey { schema, table } if schema == "public" && table == "log"),
        "{e:?}"
    );
    assert_names(&e, &["log", "primary_keys"]);
    assert_nothing_installed(&db).await;

    // Any existing columns may serve as the key of a table without a primary key.
    let notifier = Notifier::builder(&db.url)
        .watch(
            Watch::new("log", Operation::Insert)
                .primary_keys(["source", "seq"])
                .extra_columns(["message"]),
        )
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("log", Operation::Insert)).await;
    db.exec("INSERT INTO log VALUES ('api', 7, 'hello')").await;
    let e = ev.next().await;
    assert_eq!(e.id(), &Key::Composite(vec![json!("api"), json!(7)]));
    assert_eq!(e.key_columns(), ["source", "seq"]);
    assert_eq!(e.get("message"), Some(&json!("hello")));
    ev.assert_empty();
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn trigger_columns_are_rejected_on_insert_and_delete() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, email text)")
        .await;
    for operation in [Operation::Insert, Operation::Delete] {
        let e = start_err(
            &Notifier::builder(&db.url)
                .watch(Watch::new("users", Operation::Update).trigger_columns(["email"]))
                .watch(Watch::new("users", operation).trigger_columns(["email"])),
        )
        .await;
        assert!(
            matches!(&e, Error::TriggerColumnsNotAllowed { table, operation: op }
                if table == "public.users" && *op == operation),
            "{e:?}"
        );
        assert_names(&e, &["trigger_columns", "users", operation.sql_keyword()]);
    }
    assert_nothing_installed(&db).await;
}

#[actix_rt::test]
async fn the_same_table_and_operation_twice_is_a_duplicate() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, email text)")
        .await;
    let e = start_err(
        &Notifier::builder(&db.url)
            .watch(Watch::new("users", Operation::Insert))
            .watch(Watch::new("public.users", Operation::Insert).extra_columns(["email"])),
    )
    .await;
    assert!(
        matches!(&e, Error::DuplicateWatch { channel, first, second }
            if channel == "sqlnotify_public_users_insert"
                && first == "public.users INSERT"
                && second == "public.users INSERT"),
        "{e:?}"
    );
    assert_names(
        &e,
        &["sqlnotify_public_users_insert", "public.users INSERT"],
    );
    // A label spelling another watch's default channel is a duplicate too.
    let e = start_err(
        &Notifier::builder(&db.url)
            .watch(Watch::new("users", Operation::Insert))
            .watch(Watch::new("users", Operation::Delete).channel_label("public_users_insert")),
    )
    .await;
    assert!(
        matches!(&e, Error::DuplicateWatch { channel, first, second }
            if channel == "sqlnotify_public_users_insert"
                && first == "public.users INSERT"
                && second == "public.users DELETE"),
        "{e:?}"
    );
    assert_nothing_installed(&db).await;
}

#[actix_rt::test]
async fn a_label_names_one_table_and_operation() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE orders (id int PRIMARY KEY)")
        .await;
    // one label, two tables
    let e = start_err(
        &Notifier::builder(&db.url)
            .watch(Watch::new("users", Operation::Insert).channel_label("news"))
            .watch(Watch::new("orders", Operation::Insert).channel_label("news")),
    )
    .await;
    assert!(
        matches!(&e, Error::LabelReused { label, first, second }
            if label == "news" && first == "public.users INSERT" && second == "public.orders INSERT"),
        "{e:?}"
    );
    assert_names(&e, &["news", "public.users INSERT", "public.orders INSERT"]);
    // one label, two operations of one table
    let e = start_err(
        &Notifier::builder(&db.url)
            .watch(Watch::new("users", Operation::Insert).channel_label("news"))
            .watch(Watch::new("users", Operation::Delete).channel_label("news")),
    )
    .await;
    assert!(
        matches!(&e, Error::LabelReused { label, first, second }
            if label == "news" && first == "public.users INSERT" && second == "public.users DELETE"),
        "{e:?}"
    );
    assert_names(&e, &["news", "public.users INSERT", "public.users DELETE"]);
    assert_nothing_installed(&db).await;
}

/// Default channel names join schema, table and operation with `_`: `a_b.c` and `a.b_c` both
/// give `sqlnotify_a_b_c_insert`. A second notifier watching the other table is refused,
/// naming both; it used to replace the first one's trigger (that notifier then deaf to its
/// table) and feed it the other table's changes, signed and all, as its own.
#[actix_rt::test]
async fn a_default_channel_installed_for_another_table_is_refused() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE SCHEMA a_b; CREATE TABLE a_b.c (id int PRIMARY KEY); \
         CREATE SCHEMA a; CREATE TABLE a.b_c (id int PRIMARY KEY)",
    )
    .await;
    let first = Notifier::builder(&db.url)
        .watch(Watch::new("c", Operation::Insert).schema("a_b"))
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(
        &first,
        Subscription::new("c", Operation::Insert).schema("a_b"),
    )
    .await;
    let e = start_err(
        &Notifier::builder(&db.url).watch(Watch::new("b_c", Operation::Insert).schema("a")),
    )
    .await;
    assert!(
        matches!(&e, Error::ChannelTaken { channel, watch, installed_watch }
            if channel == "sqlnotify_a_b_c_insert"
                && watch == "a.b_c INSERT"
                && installed_watch == "a_b.c INSERT"),
        "{e:?}"
    );
    assert_names(
        &e,
        &[
            "sqlnotify_a_b_c_insert",
            "a.b_c INSERT",
            "a_b.c INSERT",
            "channel_label",
        ],
    );
    assert!(!e.to_string().contains("  "), "{e}");
    // The first notifier still hears its table, and only its table.
    db.exec("INSERT INTO a.b_c VALUES (2); INSERT INTO a_b.c VALUES (1)")
        .await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    // With a label, the other table has a channel of its own.
    let second = Notifier::builder(&db.url)
        .watch(
            Watch::new("b_c", Operation::Insert)
                .schema("a")
                .channel_label("a_bc"),
        )
        .start()
        .await
        .unwrap();
    db.exec("INSERT INTO a_b.c VALUES (3)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(3));
    events.assert_empty();
    second.stop().await.unwrap();
    first.stop().await.unwrap();

    // A stale entry is no collision: the table moved and renamed into the other name (its
    // trigger went with it), a watch under the new name installs.
    db.exec("DROP TABLE a.b_c; ALTER TABLE a_b.c SET SCHEMA a; ALTER TABLE a.c RENAME TO b_c")
        .await;
    let renamed = Notifier::builder(&db.url)
        .watch(Watch::new("b_c", Operation::Insert).schema("a"))
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(
        &renamed,
        Subscription::new("b_c", Operation::Insert).schema("a"),
    )
    .await;
    db.exec("INSERT INTO a.b_c VALUES (4)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(4));
    renamed.stop().await.unwrap();
}

#[actix_rt::test]
async fn channels_longer_than_63_bytes_are_rejected_and_63_bytes_work() {
    let db = TestDb::new().await;
    // "sqlnotify_public_" + table + "_insert" is 24 bytes + the table name.
    let table_ok = "t".repeat(39); // channel of 63 bytes
    let table_long = "u".repeat(40); // channel of 64 bytes
    db.exec(&format!(
        "CREATE TABLE {table_ok} (id int PRIMARY KEY); CREATE TABLE {table_long} (id int PRIMARY KEY)"
    ))
    .await;
    // "sqlnotify_" + label is 10 bytes + the label.
    let label_ok = "l".repeat(53);
    let label_long = "l".repeat(54);
    let label_long_multibyte = "é".repeat(27); // 27 characters, 54 bytes

    for (watch, channel) in [
        (
            Watch::new(table_ok.as_str(), Operation::Insert).channel_label(&label_long),
            format!("sqlnotify_{label_long}"),
        ),
        (
            Watch::new(table_ok.as_str(), Operation::Insert).channel_label(&label_long_multibyte),
            format!("sqlnotify_{label_long_multibyte}"),
        ),
        (
            Watch::new(table_long.as_str(), Operation::Insert),
            format!("sqlnotify_public_{table_long}_insert"),
        ),
    ] {
        assert_eq!(channel.len(), 64);
        let e = start_err(
            &Notifier::builder(&db.url)
                .watch(Watch::new(table_ok.as_str(), Operation::Update))
                .watch(watch),
        )
        .await;
        assert!(
            matches!(&e, Error::IdentifierTooLong { identifier, kind, max }
                if *identifier == channel && *kind == "channel" && *max == 63),
            "{e:?}"
        );
        assert_names(&e, &[&channel, "64 bytes", "63"]);
    }
    assert_nothing_installed(&db).await;

    // Exactly 63 bytes, through a label and through a table name, work end to end.
    let label_channel = format!("sqlnotify_{label_ok}");
    let table_channel = format!("sqlnotify_public_{table_ok}_insert");
    assert_eq!((label_channel.len(), table_channel.len()), (63, 63));
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new(table_ok.as_str(), Operation::Insert))
        .watch(Watch::new(table_ok.as_str(), Operation::Insert).channel_label(&label_ok))
        .start()
        .await
        .unwrap();
    let mut plain = Events::subscribe(
        &notifier,
        Subscription::new(table_ok.as_str(), Operation::Insert),
    )
    .await;
    let mut labelled = Events::subscribe(
        &notifier,
        Subscription::new(table_ok.as_str(), Operation::Insert).channel_label(&label_ok),
    )
    .await;
    db.exec(&format!("INSERT INTO {table_ok} VALUES (63)"))
        .await;
    let e = plain.next().await;
    assert_eq!(
        (e.channel(), e.id().as_i64()),
        (table_channel.as_str(), Some(63))
    );
    let e = labelled.next().await;
    assert_eq!(
        (e.channel(), e.id().as_i64()),
        (label_channel.as_str(), Some(63))
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_trigger WHERE tgname IN ('{label_channel}', '{table_channel}')"
        ))
        .await,
        2,
        "both triggers carry their full 63-byte names"
    );
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_failed_validation_installs_nothing() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, email text); CREATE TABLE log (msg text)")
        .await;
    let good = || {
        Notifier::builder(&db.url)
            .watch(Watch::new("users", Operation::Insert).extra_columns(["email"]))
    };
    // The invalid watch comes after a valid one, in each phase of validation.
    let failing = [
        good().watch(Watch::new("users", Operation::Update).extra_columns(["nope"])),
        good().watch(Watch::new("missing", Operation::Update)),
        good().watch(Watch::new("log", Operation::Update)),
        good().watch(Watch::new("users", Operation::Delete).trigger_columns(["email"])),
        good().watch(Watch::new("users", Operation::Insert)),
    ];
    for builder in &failing {
        let e = start_err(builder).await;
        assert!(
            matches!(
                e,
                Error::UnknownColumn { .. }
                    | Error::UnknownTable { .. }
                    | Error::NoPrimaryKey { .. }
                    | Error::TriggerColumnsNotAllowed { .. }
                    | Error::DuplicateWatch { .. }
            ),
            "{e:?}"
        );
        assert_nothing_installed(&db).await;
        assert_eq!(
            db.count("SELECT (to_regclass('sqlnotify.catalog') IS NULL)::int::int8")
                .await,
            1,
            "not even the catalog was created"
        );
    }
    // install_sql validates too and installs nothing
    assert!(matches!(
        failing[0].install_sql().await,
        Err(Error::UnknownColumn { .. })
    ));
    assert_nothing_installed(&db).await;
}

/// The installed state of the drift test's t1 watch: catalog rows, t1's recorded hash, t1's
/// function source hash and the number of sqlnotify triggers.
async fn drift_state(db: &TestDb) -> String {
    db.client()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM sqlnotify.catalog)
                 || ':' || (SELECT definition_hash FROM sqlnotify.catalog WHERE channel = 'sqlnotify_public_t1_insert')
                 || ':' || (SELECT string_agg(md5(prosrc), ',' ORDER BY oid) FROM pg_proc WHERE proname = 'sqlnotify_public_t1_insert')
                 || ':' || (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'sqlnotify%')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[actix_rt::test]
async fn definition_drift_rolls_back_the_whole_install() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t1 (id int PRIMARY KEY, a text, b text); CREATE TABLE t2 (id int PRIMARY KEY)",
    )
    .await;
    let original =
        Notifier::builder(&db.url).watch(Watch::new("t1", Operation::Insert).extra_columns(["a"]));
    original.start().await.unwrap().stop().await.unwrap();

    let before = drift_state(&db).await;
    assert!(
        before.starts_with("1:") && before.ends_with(":1"),
        "{before}"
    );

    // The new watch comes first, so it is installed inside the transaction before the drift of
    // t1 is found.
    let drifted = Notifier::builder(&db.url)
        .revoke_on_model_change(false)
        .watch(Watch::new("t2", Operation::Insert))
        .watch(Watch::new("t1", Operation::Insert).extra_columns(["a", "b"]));
    let e = start_err(&drifted).await;
    assert!(
        matches!(&e, Error::DefinitionDrift { channel, table, .. }
            if channel == "sqlnotify_public_t1_insert" && table == "public.t1"),
        "{e:?}"
    );
    assert_names(&e, &["sqlnotify_public_t1_insert", "public.t1"]);

    assert_eq!(drift_state(&db).await, before, "t1's watch is unchanged");
    assert_eq!(
        db.count(
            "SELECT count(*) FROM sqlnotify.catalog WHERE channel = 'sqlnotify_public_t2_insert'"
        )
        .await,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM pg_trigger WHERE tgrelid = 't2'::regclass")
            .await,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM pg_proc WHERE proname = 'sqlnotify_public_t2_insert'")
            .await,
        0
    );

    // The installed trigger still carries only "a": verify-only start, then a real row.
    let notifier = original
        .clone()
        .manage_triggers(false)
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t1", Operation::Insert)).await;
    db.exec("INSERT INTO t1 VALUES (1, 'x', 'y')").await;
    let e = ev.next().await;
    assert_eq!(e.get("a"), Some(&json!("x")));
    assert_eq!(e.get("b"), None);
    notifier.stop().await.unwrap();
}

#[actix_rt::test]
async fn urls_of_other_databases_are_unsupported() {
    for (url, scheme) in [
        // A build with the `mysql` feature supports it (tests/mysql.rs).
        #[cfg(not(feature = "mysql"))]
        ("mysql://x/y", "mysql"),
        ("oracle://x/y", "oracle"),
        ("redis://127.0.0.1:6379/0", "redis"),
        ("localhost:5432/app", ""),
    ] {
        let builder = Notifier::builder(url).watch(Watch::new("t", Operation::Insert));
        let e = start_err(&builder).await;
        assert!(
            matches!(&e, Error::UnsupportedDatabase { scheme: s, .. } if s == scheme),
            "{url}: {e:?}"
        );
        assert_names(&e, &[scheme]);
        assert!(
            matches!(
                builder.dialect_name(),
                Err(Error::UnsupportedDatabase { .. })
            ),
            "{url}"
        );
    }
}

#[actix_rt::test]
async fn postgres_and_postgresql_schemes_select_postgresql() {
    for url in [
        "postgres://postgres@127.0.0.1:5432/app",
        "postgresql://postgres@127.0.0.1:5432/app",
        "postgresql:///app?host=/var/run/postgresql&user=postgres",
    ] {
        assert_eq!(
            Notifier::builder(url).dialect_name().unwrap(),
            "postgresql",
            "{url}"
        );
    }
    // Both schemes start for real too.
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let other_scheme = match db.url.strip_prefix("postgres://") {
        Some(rest) => format!("postgresql://{rest}"),
        None => db.url.replacen("postgresql://", "postgres://", 1),
    };
    for url in [db.url.clone(), other_scheme] {
        let notifier = Notifier::builder(&url)
            .watch(Watch::new("t", Operation::Insert))
            .start()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(notifier.dialect_name(), "postgresql");
        notifier.stop().await.unwrap();
    }
}

#[actix_rt::test]
async fn an_unparsable_postgres_url_is_invalid() {
    for url in [
        "postgres://u@h:notaport/db",
        "postgresql://u@h/db?sslmode=sometimes",
    ] {
        let builder = Notifier::builder(url).watch(Watch::new("t", Operation::Insert));
        let e = start_err(&builder).await;
        assert!(matches!(e, Error::InvalidUrl { .. }), "{url}: {e:?}");
        assert!(e.to_string().starts_with("invalid database URL"), "{e}");
        assert!(
            matches!(builder.dialect_name(), Err(Error::InvalidUrl { .. })),
            "{url}"
        );
    }
}

/// The error module promises that a failed start can be fixed from the message alone, and
/// `InvalidUrl::reason` is documented as "what the driver said". The driver says which option
/// is wrong (in its error's source); the message must carry it.
#[actix_rt::test]
async fn an_invalid_url_message_names_the_offending_option() {
    for (url, option) in [
        ("postgres://u@h:notaport/db", "port"),
        ("postgresql://u@h/db?sslmode=sometimes", "sslmode"),
        ("postgresql://u@h/db?no_such_option=1", "no_such_option"),
    ] {
        let e = Notifier::builder(url).dialect_name().unwrap_err();
        assert!(matches!(e, Error::InvalidUrl { .. }), "{url}: {e:?}");
        assert_names(&e, &[option]);
    }
}

#[actix_rt::test]
async fn an_unreachable_server_is_a_database_error() {
    let e = start_err(
        &Notifier::builder("postgres://postgres@127.0.0.1:1/postgres?connect_timeout=5")
            .watch(Watch::new("t", Operation::Insert)),
    )
    .await;
    assert!(matches!(e, Error::Database { .. }), "{e:?}");
    assert!(
        std::error::Error::source(&e).is_some(),
        "the driver error is kept"
    );
}

#[actix_rt::test]
async fn the_listener_uses_the_users_connection_settings() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let url = format!(
        "{}?application_name=sqlnotify_appname_test&options=-c%20statement_timeout%3D4321&sslmode=disable",
        db.url
    );
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;

    // start() returned, so the listener has run LISTEN on its own connection.
    let listening = |app: &str| {
        format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND application_name = '{app}' \
             AND query LIKE 'LISTEN %'",
            db.name
        )
    };
    assert_eq!(db.count(&listening("sqlnotify_appname_test")).await, 1);
    // The control connection (catalog reads) uses the same settings.
    assert!(
        db.count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
             AND application_name = 'sqlnotify_appname_test' AND query NOT LIKE 'LISTEN %'",
            db.name
        ))
        .await
            >= 1
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = '{}' AND a.application_name = 'sqlnotify_appname_test' AND s.ssl",
            db.name
        ))
        .await,
        0,
        "sslmode=disable: no TLS"
    );
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(1));

    // `options` reaches the listener's session: an application_name set only through
    // `-c application_name=…` shows up on the LISTENing backend.
    let by_options = Notifier::builder(format!(
        "{}?options=-c%20application_name%3Dsqlnotify_options_test%20-c%20statement_timeout%3D4321",
        db.url
    ))
    .watch(Watch::new("t", Operation::Insert))
    .start()
    .await
    .unwrap();
    let mut ev2 = Events::subscribe(&by_options, Subscription::new("t", Operation::Insert)).await;
    assert_eq!(db.count(&listening("sqlnotify_options_test")).await, 1);
    db.exec("INSERT INTO t VALUES (2)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(2));
    assert_eq!(ev2.next().await.id().as_i64(), Some(2));

    // sslmode=require is honoured, not silently downgraded to a plaintext connection: without
    // the `tls` feature it is refused by name (tests/tls.rs has the feature's own server).
    #[cfg(not(feature = "tls"))]
    {
        let e = start_err(
            &Notifier::builder(format!("{}?sslmode=require", db.url))
                .watch(Watch::new("t", Operation::Insert)),
        )
        .await;
        assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
        assert_names(&e, &["sslmode=require", "`tls`"]);
    }

    by_options.stop().await.unwrap();
    notifier.stop().await.unwrap();
    // The backend ends asynchronously after the client disconnects: bounded poll.
    let gone = listening("sqlnotify_appname_test");
    assert!(
        common::wait_until(common::ARRIVES_WITHIN, || async {
            db.count(&gone).await == 0
        })
        .await,
        "stop() closes the listener's connection"
    );
}

#[actix_rt::test]
async fn a_unix_socket_url_works() {
    // The test server's socket when it is known, else a cluster of the test's own.
    let (cluster, (socket_dir, port)) = match common::socket() {
        Some(socket) => (None, socket),
        None => match common::Cluster::start() {
            Some(cluster) => {
                let socket = cluster.socket();
                (Some(cluster), socket)
            }
            None => {
                common::prerequisite_missing(
                    "a_unix_socket_url_works",
                    "the test server's socket is unknown (set SQLNOTIFY_TEST_PG_SOCKET=dir:port) \
                     and no PostgreSQL cluster of its own could be started",
                );
                return;
            }
        },
    };
    let db = match &cluster {
        Some(cluster) => TestDb::on(&cluster.url()).await,
        None => TestDb::new().await,
    };
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let url = format!(
        "postgresql:///{}?host={socket_dir}&port={port}&user=postgres&application_name=sqlnotify_socket_test",
        db.name
    );
    let notifier = Notifier::builder(&url)
        .watch(Watch::new("t", Operation::Insert))
        .start()
        .await
        .unwrap();
    let mut ev = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
             AND application_name = 'sqlnotify_socket_test' AND query LIKE 'LISTEN %' \
             AND client_addr IS NULL AND client_port = -1",
            db.name
        ))
        .await,
        1,
        "the listener is connected through the socket"
    );
    db.exec("INSERT INTO t VALUES (5)").await;
    assert_eq!(ev.next().await.id().as_i64(), Some(5));
    notifier.stop().await.unwrap();
}

// The shared validation scenario (tests/scenarios/validation.rs).

pg_tier_scenarios!([notify_tier: Notify] {
    validation::invalid_watches_fail_through_the_catalog_and_install_nothing,
});

/// Every duration setting at `Duration::MAX` (someone's "never"): the notifier starts,
/// delivers, and keeps going while a subscriber drops events again and again (each drop after
/// the first is timed against the lag interval). Such settings used
/// to overflow: an `Instant` plus the lag interval panicked in the registry (routing then
/// stopped for good), a doubling of the listener's pace panicked in its session, and a TCP
/// keepalive that long is refused by the kernel.
#[actix_rt::test]
async fn durations_of_any_length_are_taken() {
    use std::time::Duration;
    common::init_logging();
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("t", Operation::Insert).tier(sqlnotify::Tier::Durable))
        .consumer("forever")
        .consumer_expiry(Duration::MAX)
        .retention(Duration::MAX)
        .purge_interval(Duration::MAX)
        .health_check_interval(Duration::MAX)
        .install_timeout(Duration::MAX)
        .lag_report_interval(Duration::MAX)
        .gap_timeout(Duration::MAX)
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    // Read only at the end: it drops, and its drops are reported.
    let (_, unread) = notifier
        .subscribe_channel(
            Subscription::new("t", Operation::Insert)
                .buffer(1)
                .policy(sqlnotify::OverflowPolicy::DropOldest),
        )
        .await
        .unwrap();
    for round in 0..3 {
        for id in round * 5 + 1..=round * 5 + 5 {
            db.exec(&format!("INSERT INTO t VALUES ({id})")).await;
        }
        let got = events.take(5).await;
        assert_eq!(
            common::ids(&got),
            (round * 5 + 1..=round * 5 + 5).collect::<Vec<i64>>()
        );
    }
    let stats = notifier.stats().await.unwrap();
    assert!(stats.dropped >= 10 && !stats.failed, "{stats:?}");
    assert!(unread.try_recv().is_ok());
    drop(unread);
    notifier.stop().await.unwrap();
}
