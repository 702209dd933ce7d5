//! PostgreSQL security with real roles: what a role that can connect but holds no privilege
//! can do to the event stream (forge, walk overflow references, read sqlnotify's tables), and
//! what the roles that do the work need (a writer: only its own table; a notifier run against
//! an administrator's install: exactly the grants `install_sql_granting` prints).

mod common;

use std::time::Duration;

use common::{connect, Events, TestDb, ARRIVES_WITHIN};
use futures_util::StreamExt;
use serde_json::json;
use sqlnotify::{Capture, Error, Notifier, Operation, Subscription, Tier, Watch};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

const BIG: usize = 9_000;

/// A connection as `url` that LISTENs on `channel` and hands every payload it hears over.
async fn eavesdrop(
    url: &str,
    channel: &str,
) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect as the eavesdropper: {e}"));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .expect("any role may LISTEN");
    (client, rx)
}

/// A notifier with a notify-tier watch and a durable-tier one, both carrying column `v`.
async fn two_tiers(
    db: &TestDb,
    (notify, notify_op): (&str, Operation),
    (durable, durable_op): (&str, Operation),
) -> Notifier {
    Notifier::builder(&db.url)
        .watch(Watch::new(notify, notify_op).extra_columns(["v"]))
        .watch(
            Watch::new(durable, durable_op)
                .extra_columns(["v"])
                .tier(Tier::Durable),
        )
        .start()
        .await
        .unwrap()
}

/// The attack of the issue, on signed and on unsigned channels: a role with no privilege on
/// `secret` hears the reference to secret's large row (any role may LISTEN) and sends every
/// payload shape the decoder accepts on `pub`'s channel. Nothing of `secret` ever reaches a
/// subscriber of `pub`; with signing (the default) nothing forged reaches it at all.
#[actix_rt::test]
async fn forged_notifications_never_read_another_tables_rows() {
    for signed in [true, false] {
        forged_notifications(signed).await;
    }
}

async fn forged_notifications(signed: bool) {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE pub (id int PRIMARY KEY, v text); CREATE TABLE secret (id int PRIMARY KEY, body text)")
        .await;
    let (_, mallory) = db.role("mallory").await;
    let builder = Notifier::builder(&db.url).sign_notifications(signed);
    // The application owning `secret` …
    let owner = builder
        .clone()
        .watch(Watch::new("secret", Operation::Insert).extra_columns(["body"]))
        .start()
        .await
        .unwrap();
    // … and a browser-facing one that serves `pub`.
    let victim = builder
        .watch(Watch::new("pub", Operation::Insert).extra_columns(["v"]))
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(&victim, Subscription::new("pub", Operation::Insert)).await;

    let (attacker, mut heard) = eavesdrop(&mallory, "sqlnotify_public_secret_insert").await;
    db.exec(&format!(
        "INSERT INTO secret VALUES (1, 'TOP-SECRET' || repeat('s', {BIG}))"
    ))
    .await;
    let observed = tokio::time::timeout(ARRIVES_WITHIN, heard.recv())
        .await
        .expect("the reference is visible to any listener")
        .unwrap();
    assert!(!observed.contains("TOP-SECRET"), "a reference, not the row");
    let start = observed.find('{').expect("a JSON payload");
    let (signature, reference) = observed.split_at(start);
    assert_eq!(signature.len(), if signed { 44 } else { 0 }, "{observed}");
    let token = serde_json::from_str::<serde_json::Value>(reference).unwrap()["__sqlnotify"]
        ["overflow"]
        .as_str()
        .expect("a token")
        .to_string();
    assert_eq!(token.len(), 36, "a UUID, not a sequence: {token}");

    let stolen = format!(r#"{{"__sqlnotify":{{"overflow":"{token}"}},"id":1000}}"#);
    let forged = [
        observed.clone(),               // the real, signed reference, moved to our channel
        reference.to_string(),          // the same without its signature
        stolen.clone(),                 // the stolen token with the attacker's key
        format!("{signature}{stolen}"), // … under secret's signature
        r#"{"__sqlnotify":{"overflow":1},"id":1000}"#.into(), // walking ids (old format)
        r#"{"__sqlnotify":{"overflow":"00000000-0000-4000-8000-000000000001"},"id":1000}"#.into(),
        r#"{"__sqlnotify":{"truncated":true},"id":1000}"#.into(),
        r#"{"id":1000,"v":"forged"}"#.into(),
        r#"[{"id":1000,"v":"forged"}]"#.into(),
        format!("{}{{\"id\":1000,\"v\":\"forged\"}}", "A".repeat(43) + "="),
    ];
    for payload in &forged {
        attacker
            .execute(
                "SELECT pg_notify('sqlnotify_public_pub_insert', $1)",
                &[payload],
            )
            .await
            .expect("any role may NOTIFY");
    }
    db.exec("INSERT INTO pub VALUES (1, 'sentinel')").await;

    let mut arrived = Vec::new();
    loop {
        let e = events.next().await;
        let sentinel = e.get("v") == Some(&json!("sentinel"));
        arrived.push(e);
        if sentinel {
            break;
        }
    }
    for e in &arrived {
        assert!(
            !e.to_json().to_string().contains("TOP-SECRET"),
            "secret's row reached pub's subscriber (signed: {signed}): {}",
            e.to_json()
        );
    }
    let stats = victim.stats().await.unwrap();
    assert_eq!(stats.overflow_resolved, 0, "{stats:?}");
    if signed {
        assert_eq!(arrived.len(), 1, "only the real row: {arrived:?}");
        assert_eq!(stats.forged, forged.len() as u64, "{stats:?}");
        assert_eq!((stats.received, stats.malformed), (1, 0), "{stats:?}");
    } else {
        // Unsigned, forged events do arrive (that is what signing is for) — but a reference
        // resolves only rows written for the channel it arrived on, so the stolen token finds
        // nothing and its event carries the key alone.
        assert_eq!(stats.forged, 0);
        // Truncated: the 2 distinct references (neither resolves) and the forged "truncated"
        // one; the stolen token's 3 other copies on pub's channel are repeats, dropped
        // unfetched; malformed: the walked id (not a token), the array, the bogus signature
        // prefix.
        let truncated = arrived.iter().filter(|e| e.is_truncated()).count();
        assert_eq!(truncated, 3, "{arrived:?}");
        assert_eq!(
            (stats.overflow_missing, stats.replayed, stats.malformed),
            (2, 3, 3),
            "{stats:?}"
        );
    }
    // The owner's own subscriber still resolves its row.
    let mut own = Events::subscribe(&owner, Subscription::new("secret", Operation::Insert)).await;
    db.exec("INSERT INTO secret VALUES (2, repeat('t', 9000))")
        .await;
    assert_eq!(
        own.next()
            .await
            .get("body")
            .unwrap()
            .as_str()
            .unwrap()
            .len(),
        9000
    );
    victim.stop().await.unwrap();
    owner.stop().await.unwrap();
}

/// A role with no privilege hears the signed reference to a large row and sends it again 20
/// times on the same channel (its signature verifies there): the subscriber gets the row once,
/// and the copies are dropped unfetched — each once fetched the whole row again and held it
/// for one unit of in-flight budget — and counted.
#[actix_rt::test]
async fn a_replayed_overflow_reference_is_delivered_and_fetched_once() {
    const REPEATS: usize = 20;
    let db = TestDb::new().await;
    db.exec("CREATE TABLE big (id int PRIMARY KEY, body text)")
        .await;
    let (_, mallory) = db.role("mallory").await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("big", Operation::Insert).extra_columns(["body"]))
        .start()
        .await
        .unwrap();
    let mut events =
        Events::subscribe(&notifier, Subscription::new("big", Operation::Insert)).await;
    let channel = "sqlnotify_public_big_insert";
    let (attacker, mut heard) = eavesdrop(&mallory, channel).await;
    db.exec(&format!("INSERT INTO big VALUES (1, repeat('b', {BIG}))"))
        .await;
    let observed = tokio::time::timeout(ARRIVES_WITHIN, heard.recv())
        .await
        .expect("the reference is visible to any listener")
        .unwrap();
    assert!(observed.contains("\"overflow\""), "a reference: {observed}");
    assert_eq!(observed.find('{'), Some(44), "signed: {observed}");
    for _ in 0..REPEATS {
        attacker
            .execute("SELECT pg_notify($1, $2)", &[&channel, &observed])
            .await
            .expect("any role may NOTIFY");
    }
    db.exec("INSERT INTO big VALUES (2, 'sentinel')").await;

    let mut arrived = Vec::new();
    loop {
        let e = events.next().await;
        let sentinel = e.get("body") == Some(&json!("sentinel"));
        arrived.push(e);
        if sentinel {
            break;
        }
    }
    let ids: Vec<_> = arrived.iter().map(|e| e.id().as_i64().unwrap()).collect();
    assert_eq!(ids, [1, 2], "the large row once, then the sentinel");
    assert_eq!(arrived[0].get("body").unwrap().as_str().unwrap().len(), BIG);
    let stats = notifier.stats().await.unwrap();
    assert_eq!(
        (stats.replayed, stats.overflow_resolved, stats.forged),
        (REPEATS as u64, 1, 0),
        "{stats:?}"
    );
    assert_eq!(
        (stats.malformed, stats.overflow_missing),
        (0, 0),
        "{stats:?}"
    );
    notifier.stop().await.unwrap();
}

/// The journal tiers never read a NOTIFY's payload: a forged one only wakes the listener.
#[actix_rt::test]
async fn journal_tiers_ignore_notify_payloads() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let (_, mallory) = db.role("mallory").await;
    let notifier = Notifier::builder(&db.url)
        .watch(
            Watch::new("t", Operation::Insert)
                .extra_columns(["v"])
                .tier(Tier::Durable),
        )
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let attacker = connect(&mallory).await;
    for payload in [
        r#"{"id":1000,"v":"forged"}"#,
        r#"[{"id":1000,"v":"forged"}]"#,
        r#"{"__sqlnotify":{"overflow":"00000000-0000-4000-8000-000000000001"},"id":1000}"#,
        "garbage",
    ] {
        attacker
            .execute(
                "SELECT pg_notify('sqlnotify_public_t_insert', $1)",
                &[&payload],
            )
            .await
            .unwrap();
    }
    db.exec("INSERT INTO t VALUES (1, 'real')").await;
    let e = events.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("v")),
        (Some(1), Some(&json!("real")))
    );
    events.assert_none_within(Duration::from_millis(300)).await;
    let stats = notifier.stats().await.unwrap();
    assert_eq!(
        (stats.received, stats.malformed, stats.forged),
        (1, 0, 0),
        "{stats:?}"
    );
    notifier.stop().await.unwrap();
}

/// Forgeries interleaved with wake-ups in one read: the listener tells each notification's
/// channel apart however they alternate (it caches the last channel's kind), so each forged
/// payload on the signed channel is refused and each one on the durable channel only wakes it.
#[actix_rt::test]
async fn interleaved_channels_each_keep_their_kind() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let (_, mallory) = db.role("mallory").await;
    let notifier = two_tiers(&db, ("t", Operation::Insert), ("t", Operation::Update)).await;
    let mut inserts = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let mut updates = Events::subscribe(&notifier, Subscription::new("t", Operation::Update)).await;
    let attacker = connect(&mallory).await;
    // One transaction: delivered together, alternating channels.
    attacker
        .batch_execute(
            r#"SELECT pg_notify('sqlnotify_public_t_update', '{"id":1000,"v":"forged"}'),
                      pg_notify('sqlnotify_public_t_insert', '{"id":1001,"v":"forged"}'),
                      pg_notify('sqlnotify_public_t_insert', '{"id":1002,"v":"forged"}'),
                      pg_notify('sqlnotify_public_t_update', '{"id":1003,"v":"forged"}'),
                      pg_notify('sqlnotify_public_t_insert', '{"id":1004,"v":"forged"}')"#,
        )
        .await
        .unwrap();
    db.exec("INSERT INTO t VALUES (1, 'real'); UPDATE t SET v = 'updated' WHERE id = 1")
        .await;
    let e = inserts.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("v")),
        (Some(1), Some(&json!("real")))
    );
    let e = updates.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("v")),
        (Some(1), Some(&json!("updated")))
    );
    inserts.assert_none_within(Duration::from_millis(300)).await;
    updates.assert_none_within(Duration::from_millis(1)).await;
    let stats = notifier.stats().await.unwrap();
    assert_eq!(
        (stats.received, stats.malformed, stats.forged),
        (2, 0, 3),
        "{stats:?}"
    );
    notifier.stop().await.unwrap();
}

/// A role that was granted nothing can read, write and run nothing of sqlnotify's — even when
/// default privileges would have handed PUBLIC everything created afterwards.
#[actix_rt::test]
async fn nothing_in_the_sqlnotify_schema_is_open_to_other_roles() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         ALTER DEFAULT PRIVILEGES GRANT ALL ON TABLES TO PUBLIC;
         ALTER DEFAULT PRIVILEGES GRANT ALL ON SEQUENCES TO PUBLIC;
         ALTER DEFAULT PRIVILEGES GRANT ALL ON SCHEMAS TO PUBLIC;",
    )
    .await;
    let (role, mallory) = db.role("mallory").await;
    let notifier = two_tiers(&db, ("t", Operation::Insert), ("t", Operation::Update)).await;
    db.exec(&format!("INSERT INTO t VALUES (1, repeat('x', {BIG}))"))
        .await;
    let attacker = connect(&mallory).await;
    for sql in [
        "SELECT * FROM sqlnotify.overflow",
        "SELECT * FROM sqlnotify.journal",
        "SELECT * FROM sqlnotify.signing",
        "SELECT * FROM sqlnotify.catalog",
        "SELECT * FROM sqlnotify.consumers",
        "INSERT INTO sqlnotify.journal (channel, payload) VALUES ('sqlnotify_public_t_update', '{\"id\":1}')",
        "UPDATE sqlnotify.consumers SET horizon = '0'",
        "DELETE FROM sqlnotify.overflow",
        "SELECT nextval('sqlnotify.journal_id_seq')",
    ] {
        let err = attacker
            .batch_execute(sql)
            .await
            .expect_err(&format!("{role} must not be allowed: {sql}"));
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err:?}"
        );
    }
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT p.prorettype = 'trigger'::regtype AS trigger_function,
                    bool_or(has_function_privilege($1, p.oid, 'EXECUTE')),
                    bool_and(p.prosecdef),
                    bool_and(coalesce(p.proconfig = ARRAY['search_path=pg_catalog, pg_temp'], false)),
                    count(*)
               FROM pg_proc p WHERE p.pronamespace = 'sqlnotify'::regnamespace
              GROUP BY 1 ORDER BY 1",
            &[&role],
        )
        .await
        .unwrap();
    let functions: Vec<(bool, bool, bool, bool, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        functions,
        [
            // helpers: callable by anyone (they check the caller), run as their owner with a
            // pinned search path, and take text only
            (false, true, true, true, 2),
            // trigger functions: nobody else may call them; they run as the writer
            (true, false, false, false, 2),
        ]
    );
    notifier.stop().await.unwrap();
}

/// A writer needs INSERT/UPDATE/DELETE on its own table and nothing else, on every tier and
/// capture (the trigger functions run as their owner).
#[actix_rt::test]
async fn a_writer_with_only_table_privileges_writes_on_every_tier() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE n (id int PRIMARY KEY, body text);
         CREATE TABLE d (id int PRIMARY KEY, body text);
         CREATE TABLE p (id int PRIMARY KEY, body text);
         CREATE TABLE s (id int PRIMARY KEY, body text);",
    )
    .await;
    let (role, writer_url) = db.role("writer").await;
    db.exec(&format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON n, d, p, s TO \"{role}\""
    ))
    .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("n", Operation::Insert).extra_columns(["body"]))
        .watch(
            Watch::new("d", Operation::Insert)
                .extra_columns(["body"])
                .tier(Tier::Durable),
        )
        .watch(
            Watch::new("p", Operation::Insert)
                .extra_columns(["body"])
                .tier(Tier::Poll),
        )
        .watch(
            Watch::new("s", Operation::Insert)
                .extra_columns(["body"])
                .tier(Tier::Durable)
                .capture(Capture::Statement),
        )
        .start()
        .await
        .unwrap();
    let mut all = Vec::new();
    for table in ["n", "d", "p", "s"] {
        all.push(Events::subscribe(&notifier, Subscription::new(table, Operation::Insert)).await);
    }
    let writer = connect(&writer_url).await;
    for table in ["n", "d", "p", "s"] {
        // a small row, and one that takes the overflow path on the notify tier
        writer
            .batch_execute(&format!(
                "INSERT INTO {table} VALUES (1, 'small'), (2, repeat('b', {BIG}))"
            ))
            .await
            .unwrap_or_else(|e| panic!("the writer's INSERT into {table} failed: {e:?}"));
    }
    for (events, table) in all.iter_mut().zip(["n", "d", "p", "s"]) {
        let small = events.next().await;
        let big = events.next().await;
        assert_eq!(small.get("body"), Some(&json!("small")), "{table}");
        assert_eq!(
            big.get("body").and_then(|b| b.as_str()).map(str::len),
            Some(BIG),
            "{table}: {}",
            big.to_json()
        );
    }
    notifier.stop().await.unwrap();
}

/// An administrator applies `install_sql_granting(app)`; the application runs as `app` with
/// `manage_triggers(false)` — verification, listening on every tier, signed notifications,
/// custom events with overflow, a named consumer — and a writer role writes. A role that was
/// not granted the script's privileges gets a clear error at start.
#[actix_rt::test]
async fn an_application_role_runs_against_an_administrators_install() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE users (id int PRIMARY KEY, email text);
         CREATE TABLE orders (id int PRIMARY KEY, total int);",
    )
    .await;
    let (app, app_url) = db.role("app").await;
    let (stranger, stranger_url) = db.role("stranger").await;
    let (writer, writer_url) = db.role("writer").await;
    db.exec(&format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON users, orders TO \"{writer}\""
    ))
    .await;
    let watches = |url: &str| {
        Notifier::builder(url)
            .watch(Watch::new("users", Operation::Insert).extra_columns(["email"]))
            .watch(
                Watch::new("orders", Operation::Insert)
                    .extra_columns(["total"])
                    .tier(Tier::Durable),
            )
            .watch(Watch::new("orders", Operation::Delete).tier(Tier::Poll))
    };
    let script = watches(&db.url).install_sql_granting(&app).await.unwrap();
    assert!(script.contains(&format!("GRANT USAGE ON SCHEMA \"sqlnotify\" TO \"{app}\"")));
    db.exec(&script).await;

    let err = watches(&stranger_url)
        .manage_triggers(false)
        .start()
        .await
        .expect_err(&format!("{stranger} was granted nothing"));
    assert!(
        matches!(err, Error::Database { .. }) && err.to_string().contains("permission denied"),
        "{err}"
    );

    let notifier = watches(&app_url)
        .manage_triggers(false)
        .consumer("app")
        .start()
        .await
        .unwrap_or_else(|e| panic!("{app} with the script's grants: {e}"));
    let mut users =
        Events::subscribe(&notifier, Subscription::new("users", Operation::Insert)).await;
    let mut orders =
        Events::subscribe(&notifier, Subscription::new("orders", Operation::Insert)).await;
    let mut deletes =
        Events::subscribe(&notifier, Subscription::new("orders", Operation::Delete)).await;
    let w = connect(&writer_url).await;
    w.batch_execute(&format!(
        "INSERT INTO users VALUES (1, 'a@b.c'), (2, repeat('e', {BIG}));
         INSERT INTO orders VALUES (10, 99);
         DELETE FROM orders WHERE id = 10;"
    ))
    .await
    .unwrap();
    assert_eq!(users.next().await.get("email"), Some(&json!("a@b.c")));
    assert_eq!(
        users
            .next()
            .await
            .get("email")
            .unwrap()
            .as_str()
            .unwrap()
            .len(),
        BIG
    );
    assert_eq!(orders.next().await.get("total"), Some(&json!(99)));
    assert_eq!(deletes.next().await.id().as_i64(), Some(10));
    // custom events from the application role: signed by the server, and through overflow
    notifier
        .notify(
            "users",
            Operation::Insert,
            json!({"id": 3, "email": "c@d.e"}),
        )
        .await
        .unwrap();
    assert_eq!(users.next().await.get("email"), Some(&json!("c@d.e")));
    notifier
        .notify(
            "users",
            Operation::Insert,
            json!({"id": 4, "email": "f".repeat(BIG)}),
        )
        .await
        .unwrap();
    assert_eq!(
        users
            .next()
            .await
            .get("email")
            .unwrap()
            .as_str()
            .unwrap()
            .len(),
        BIG
    );
    notifier
        .notify("orders", Operation::Insert, json!({"id": 11, "total": 5}))
        .await
        .unwrap();
    assert_eq!(orders.next().await.get("total"), Some(&json!(5)));
    let stats = notifier.stats().await.unwrap();
    assert_eq!((stats.forged, stats.malformed), (0, 0), "{stats:?}");
    notifier.stop().await.unwrap();
    assert_eq!(
        db.count("SELECT count(*) FROM sqlnotify.consumers WHERE name = 'app'")
            .await,
        1,
        "the consumer's position was saved by {app}"
    );
    // The retention purge, run as the application role, deletes the rows the consumer read
    // and records what it deleted (for resuming SSE clients) with the script's grants.
    #[cfg(feature = "bench")]
    {
        let purger = watches(&app_url)
            .manage_triggers(false)
            .purge_interval(Duration::from_secs(3600))
            .start()
            .await
            .unwrap();
        let purged = sqlnotify::bench_support::purge_now(&purger, Duration::ZERO).await;
        assert!(purged.as_ref().is_ok_and(|n| *n > 0), "{purged:?}");
        purger.stop().await.unwrap();
    }
}

/// SQLite has no roles to grant to: a typed error, not a script that pretends.
#[cfg(feature = "sqlite")]
#[actix_rt::test]
async fn grants_are_refused_where_there_are_no_roles() {
    let file = common::sqlite_file::SqliteFile::new("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let err = Notifier::builder(file.url())
        .watch(Watch::new("t", Operation::Insert))
        .install_sql_granting("app")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidOption {
                option: "grant_to",
                ..
            }
        ),
        "{err}"
    );
}

/// The owner of a watched table controls what turning its rows into JSON runs (a cast of a
/// type it owns to `json`): that must run as the writer, never as whoever installed
/// sqlnotify. Here the installer is a superuser and the owner tries to make itself one.
#[actix_rt::test]
async fn the_owner_of_a_watched_table_cannot_act_as_sqlnotify_s_owner() {
    let db = TestDb::new().await;
    let (app, app_url) = db.role("app").await;
    db.exec(&format!("GRANT CREATE ON SCHEMA public TO \"{app}\""))
        .await;
    let owner = connect(&app_url).await;
    owner
        .batch_execute("CREATE TABLE pub (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    for tier in [Tier::Notify, Tier::Durable] {
        let op = if tier == Tier::Notify {
            Operation::Insert
        } else {
            Operation::Update
        };
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("pub", op).extra_columns(["v"]).tier(tier))
            .start()
            .await
            .unwrap();
        notifier.stop().await.unwrap();
    }
    owner
        .batch_execute(&format!(
            "CREATE TYPE evil AS ENUM ('a', 'b');
             CREATE FUNCTION evil_json(evil) RETURNS json LANGUAGE plpgsql AS $$
             BEGIN EXECUTE 'ALTER ROLE \"{app}\" SUPERUSER'; RETURN '\"a\"'; END $$;
             CREATE CAST (evil AS json) WITH FUNCTION evil_json(evil);
             INSERT INTO pub VALUES (1, 'a');
             ALTER TABLE pub ALTER COLUMN v TYPE evil USING 'a';"
        ))
        .await
        .unwrap();
    // The cast runs as the owner itself: it may not ALTER ROLE, so its own write fails.
    // (a new session: the old one planned the trigger for the text column)
    let writer = connect(&app_url).await;
    let insert = writer
        .batch_execute("INSERT INTO pub VALUES (2, 'a')")
        .await;
    let update = writer.batch_execute("UPDATE pub SET v = 'b'").await;
    let superuser = db
        .count(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{app}' AND rolsuper"
        ))
        .await;
    assert_eq!(
        superuser, 0,
        "the table owner became superuser (insert: {insert:?}, update: {update:?})"
    );
    let denied = |r: &Result<(), tokio_postgres::Error>| {
        r.as_ref().err().and_then(|e| e.code()).cloned()
            == Some(tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    };
    assert!(denied(&insert), "{insert:?}");
    assert!(denied(&update), "{update:?}");
}

/// The helpers any role may call check that the caller may write to the watched table:
/// called by a role that may not, they send nothing, and the caller's statement succeeds.
/// (The durable watch's helper is the one of row capture on a plain table: it takes one
/// payload per changed row.)
#[actix_rt::test]
async fn a_helper_called_without_the_table_s_privilege_sends_nothing() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE n (id int PRIMARY KEY, v text); CREATE TABLE d (id int PRIMARY KEY, v text)",
    )
    .await;
    let (_, mallory) = db.role("mallory").await;
    let notifier = two_tiers(&db, ("n", Operation::Insert), ("d", Operation::Insert)).await;
    let mut n = Events::subscribe(&notifier, Subscription::new("n", Operation::Insert)).await;
    let mut d = Events::subscribe(&notifier, Subscription::new("d", Operation::Insert)).await;
    let attacker = connect(&mallory).await;
    attacker
        .batch_execute(
            r#"SELECT sqlnotify.sqlnotify_public_n_insert('{"id":1000,"v":"forged"}', NULL);
               SELECT sqlnotify.sqlnotify_public_d_insert(ARRAY['{"id":1000,"v":"forged"}']);
               SELECT pg_notify('sqlnotify_public_d_insert', '')"#,
        )
        .await
        .expect("the call succeeds and does nothing");
    assert_eq!(
        db.count("SELECT count(*) FROM sqlnotify.journal").await,
        0,
        "no journal row"
    );
    db.exec("INSERT INTO n VALUES (1, 'real'); INSERT INTO d VALUES (1, 'real')")
        .await;
    for events in [&mut n, &mut d] {
        let e = events.next().await;
        assert_eq!(
            (e.id().as_i64(), e.get("v")),
            (Some(1), Some(&json!("real")))
        );
        events.assert_none_within(Duration::from_millis(200)).await;
    }
    let stats = notifier.stats().await.unwrap();
    assert_eq!((stats.forged, stats.malformed), (0, 0), "{stats:?}");
    notifier.stop().await.unwrap();
}

/// The helper's privilege test has two steps (the session's own role, then the roles it is a
/// member of): a writer whose INSERT privilege comes only from a group role has its rows
/// captured, on both tiers, and one without any still sends nothing.
#[actix_rt::test]
async fn a_writer_privileged_through_a_group_role_has_its_rows_captured() {
    for tier in [Tier::Notify, Tier::Durable] {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
        let (group, _) = db.role("group").await;
        let (member, member_url) = db.role("member").await;
        let (_, mallory) = db.role("mallory").await;
        db.exec(&format!(
            "GRANT INSERT ON t TO \"{group}\"; GRANT \"{group}\" TO \"{member}\""
        ))
        .await;
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("t", Operation::Insert).tier(tier))
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
        connect(&member_url)
            .await
            .batch_execute("INSERT INTO t VALUES (1)")
            .await
            .unwrap();
        assert_eq!(ins.next().await.id().as_i64(), Some(1), "{tier:?}");
        let helper = match tier {
            Tier::Notify => "SELECT sqlnotify.sqlnotify_public_t_insert('{\"id\":1000}', NULL)",
            // (row capture on a plain table: one payload per row, see README "Row capture")
            _ => "SELECT sqlnotify.sqlnotify_public_t_insert(ARRAY['{\"id\":1000}'])",
        };
        connect(&mallory)
            .await
            .batch_execute(helper)
            .await
            .expect("the call succeeds and does nothing");
        ins.assert_none_within(Duration::from_millis(200)).await;
        notifier.stop().await.unwrap();
    }
}

/// Columns of extension types keep their own comparison (hstore has no `=` in pg_catalog;
/// citext's `=` ignores case): the trigger runs with the writer's search path.
#[actix_rt::test]
async fn extension_types_compare_with_their_own_operators() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE EXTENSION hstore; CREATE EXTENSION citext;
         CREATE TABLE h (id int PRIMARY KEY, m hstore, c citext);
         INSERT INTO h VALUES (1, 'a=>1', 'abc');",
    )
    .await;
    let notifier = Notifier::builder(&db.url)
        .watch(
            Watch::new("h", Operation::Update)
                .extra_columns(["m", "c"])
                .trigger_columns(["m", "c"])
                .tier(Tier::Durable)
                .capture(Capture::Statement),
        )
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(&notifier, Subscription::new("h", Operation::Update)).await;
    db.exec("UPDATE h SET c = 'ABC'").await; // equal as citext: no change
    db.exec("UPDATE h SET m = 'a=>2'").await; // a change, compared with hstore's `=`
    let e = events.next().await;
    // (hstore has a cast to json of its own, which the trigger uses)
    assert_eq!(e.get("m"), Some(&json!({"a": "2"})), "{}", e.to_json());
    events.assert_none_within(Duration::from_millis(300)).await;
    notifier.stop().await.unwrap();
}

/// An extension installed in a schema of its own (`ext`), which neither the writer's nor the
/// installer's `search_path` holds: its type's `=` is not found unqualified. Every way a
/// trigger compares such a column names the operator's schema, so the writer's UPDATE
/// succeeds and reports the column changed: a row trigger's changed list (notify tier), row
/// capture per statement, a row trigger with `trigger_columns`, and statement capture with
/// `trigger_columns`. (Before, the UPDATE failed: `operator does not exist: ext.hstore =
/// ext.hstore`; a watch with `trigger_columns` could not even be installed.)
#[actix_rt::test]
async fn an_extension_s_equality_in_its_own_schema_never_fails_the_write() {
    for (tier, capture, trigger_columns) in [
        (Tier::Notify, Capture::Row, false),
        (Tier::Durable, Capture::Row, false),
        (Tier::Durable, Capture::Row, true),
        (Tier::Durable, Capture::Statement, true),
    ] {
        let case = format!("{tier:?} {capture:?} trigger_columns {trigger_columns}");
        let db = TestDb::new().await;
        db.exec(
            "CREATE SCHEMA ext; CREATE EXTENSION hstore SCHEMA ext;
             CREATE TABLE ht (id int PRIMARY KEY, h ext.hstore, n int);
             INSERT INTO ht VALUES (1, 'a=>1', 0);",
        )
        .await;
        let mut watch = Watch::new("ht", Operation::Update)
            .old_values(true)
            .tier(tier)
            .capture(capture);
        if trigger_columns {
            watch = watch.trigger_columns(["h"]);
        }
        let notifier = Notifier::builder(&db.url)
            .watch(watch)
            .start()
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let mut events =
            Events::subscribe(&notifier, Subscription::new("ht", Operation::Update)).await;
        let writer = db.client().await;
        writer
            .batch_execute(r#"SET search_path = "$user", public"#)
            .await
            .unwrap();
        writer
            .batch_execute("UPDATE ht SET h = 'a=>2'")
            .await
            .unwrap_or_else(|e| panic!("{case}: the UPDATE must succeed: {e:?}"));
        let e = events.next().await;
        assert_eq!(e.id().as_i64(), Some(1), "{case}");
        assert_eq!(
            e.changed_columns(),
            Some(&["h".to_string()][..]),
            "{case}: {}",
            e.to_json()
        );
        // Equal values, and NULLs on either side, compare as `IS DISTINCT FROM` does. (One
        // transaction each: the notify tier's identical payloads in one transaction would be
        // folded into one notification by PostgreSQL.)
        for update in [
            "UPDATE ht SET n = 1",
            "UPDATE ht SET h = NULL",
            "UPDATE ht SET n = 2",
            "UPDATE ht SET h = 'b=>1'",
        ] {
            writer
                .batch_execute(update)
                .await
                .unwrap_or_else(|e| panic!("{case}: {update}: {e:?}"));
        }
        let mut changed = Vec::new();
        for _ in 0..if trigger_columns { 2 } else { 4 } {
            let e = events.next().await;
            changed.push(e.changed_columns().map(<[String]>::to_vec));
        }
        let h = || Some(vec!["h".to_string()]);
        let n = || Some(vec!["n".to_string()]);
        let expected = if trigger_columns {
            vec![h(), h()]
        } else {
            vec![n(), h(), n(), h()]
        };
        assert_eq!(changed, expected, "{case}");
        events.assert_none_within(Duration::from_millis(200)).await;
        notifier.stop().await.unwrap();
    }
}

/// A `SQL_ASCII` database stores whatever bytes it is given; signing must not fail a write
/// whose text is not UTF-8, and UTF-8 text still verifies.
#[actix_rt::test]
async fn a_sql_ascii_database_never_fails_the_write() {
    let db = TestDb::sql_ascii().await;
    db.exec("CREATE TABLE pub (id int PRIMARY KEY, v text)")
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(Watch::new("pub", Operation::Insert).extra_columns(["v"]))
        .start()
        .await
        .unwrap();
    let mut events =
        Events::subscribe(&notifier, Subscription::new("pub", Operation::Insert)).await;
    // UTF-8 text signs and verifies as on any database …
    db.exec("INSERT INTO pub VALUES (2, 'été')").await;
    let e = events.next().await;
    assert_eq!(
        (e.id().as_i64(), e.get("v")),
        (Some(2), Some(&json!("été")))
    );
    // … and bytes that are not UTF-8 never fail the write (what the listener makes of such
    // a payload is the driver's business: it only reads UTF-8)
    db.client()
        .await
        .batch_execute("INSERT INTO pub VALUES (1, convert_from('\\xe974e9', 'SQL_ASCII'))")
        .await
        .unwrap_or_else(|e| panic!("the write failed: {e:?}"));
    assert_eq!(db.count("SELECT count(*) FROM pub").await, 2);
    assert_eq!(notifier.stats().await.unwrap().forged, 0);
    notifier.stop().await.unwrap();
}

/// Notifiers of one channel must agree on signing: a second one with the other setting is
/// refused instead of replacing the trigger under the first (which would then drop every
/// event as forged, or receive signatures it does not expect).
#[actix_rt::test]
async fn a_notifier_may_not_flip_the_signing_of_an_installed_channel() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let watch = || Watch::new("t", Operation::Insert);
    let first = Notifier::builder(&db.url)
        .watch(watch())
        .start()
        .await
        .unwrap();
    let mut events = Events::subscribe(&first, Subscription::new("t", Operation::Insert)).await;
    let err = Notifier::builder(&db.url)
        .watch(watch())
        .sign_notifications(false)
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidOption { option: "sign_notifications", reason }
            if reason.contains("sqlnotify_public_t_insert is installed signed")),
        "{err}"
    );
    db.exec("INSERT INTO t VALUES (1)").await;
    assert_eq!(events.next().await.id().as_i64(), Some(1));
    assert_eq!(first.stats().await.unwrap().forged, 0);
    first.stop().await.unwrap();
    // Once removed, the watch may be installed unsigned.
    Notifier::builder(&db.url).cleanup().await.unwrap();
    let unsigned = Notifier::builder(&db.url)
        .watch(watch())
        .sign_notifications(false)
        .start()
        .await
        .unwrap();
    unsigned.stop().await.unwrap();
}

/// Context names who wrote: `current_user` is the writing role (the trigger function runs as
/// the writer, the helper that sends as sqlnotify's owner only afterwards), `session_user` the
/// role that logged in — also when a session switched roles with `SET ROLE`. A custom setting
/// is whatever the writer set, and nothing when it set nothing.
#[actix_rt::test]
async fn context_names_the_writing_role_not_sqlnotifys_owner() {
    for tier in [Tier::Notify, Tier::Durable] {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
        let (role, url) = db.role("writer").await;
        db.exec(&format!("GRANT INSERT ON t TO \"{role}\"")).await;
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("t", Operation::Insert).tier(tier).context([
                "current_user",
                "session_user",
                "app.user_id",
            ]))
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;

        connect(&url)
            .await
            .batch_execute(
                "BEGIN; SET LOCAL app.user_id = 'alice'; INSERT INTO t VALUES (1); COMMIT;",
            )
            .await
            .unwrap();
        let e = ins.next().await;
        assert_eq!(e.context("current_user"), Some(&json!(role)), "{tier:?}");
        assert_eq!(e.context("session_user"), Some(&json!(role)));
        assert_eq!(e.context("app.user_id"), Some(&json!("alice")));

        // the owner's session, switched to the writer's role
        db.exec(&format!(
            "SET ROLE \"{role}\"; INSERT INTO t VALUES (2); RESET ROLE;"
        ))
        .await;
        let e = ins.next().await;
        let owner: String = db
            .client()
            .await
            .query_one("SELECT session_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(e.context("current_user"), Some(&json!(role)));
        assert_eq!(e.context("session_user"), Some(&json!(owner)));
        assert_eq!(e.context("app.user_id"), Some(&json!(null)));
        ins.assert_empty();
        notifier.stop().await.unwrap();
    }
}

/// A writer granted INSERT or UPDATE on some columns only (`GRANT INSERT (id, v) ON t`) writes
/// rows like any other: their events arrive on every tier and capture (the helpers' privilege
/// test accepts a privilege on any column; before, such a writer's events were dropped with a
/// warning). A role with no privilege at all still sends nothing through the helper.
#[actix_rt::test]
async fn a_writer_granted_some_columns_only_has_its_rows_captured() {
    for (tier, capture) in [
        (Tier::Notify, Capture::Row),
        (Tier::Durable, Capture::Row),
        (Tier::Durable, Capture::Statement),
    ] {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE t (id int PRIMARY KEY, v text, secret text)")
            .await;
        let (writer, writer_url) = db.role("columns").await;
        db.exec(&format!(
            "GRANT INSERT (id, v), UPDATE (v), SELECT (id) ON t TO \"{writer}\""
        ))
        .await;
        let notifier = Notifier::builder(&db.url)
            .watch(
                Watch::new("t", Operation::Insert)
                    .extra_columns(["v"])
                    .tier(tier)
                    .capture(capture),
            )
            .watch(
                Watch::new("t", Operation::Update)
                    .extra_columns(["v"])
                    .tier(tier)
                    .capture(capture),
            )
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
        let mut upd = Events::subscribe(&notifier, Subscription::new("t", Operation::Update)).await;
        connect(&writer_url)
            .await
            .batch_execute(
                "INSERT INTO t (id, v) VALUES (1, 'a'), (2, 'b');
                 UPDATE t SET v = 'c' WHERE id = 2",
            )
            .await
            .expect("the column-privileged writes succeed");
        let inserted = ins.take(2).await;
        assert_eq!(
            inserted
                .iter()
                .map(|e| (e.id().as_i64(), e.get("v").cloned()))
                .collect::<Vec<_>>(),
            [(Some(1), Some(json!("a"))), (Some(2), Some(json!("b")))],
            "{tier:?} {capture:?}"
        );
        let e = upd.next().await;
        assert_eq!(
            (e.id().as_i64(), e.get("v")),
            (Some(2), Some(&json!("c"))),
            "{tier:?} {capture:?}"
        );
        notifier.stop().await.unwrap();
    }
}

/// A role may change a watched table without holding any privilege on it: here its DELETE on
/// `parent` cascades (`ON DELETE CASCADE`) to `child`, whose DELETE it may not do itself. The
/// rows are really deleted, so their events arrive, on every tier (the helpers accept a
/// session that has just deleted rows of the table; before, they dropped the events with a
/// server-log warning only).
#[actix_rt::test]
async fn a_cascade_s_deletes_reach_a_watch_the_deleting_role_may_not_write() {
    for tier in [Tier::Durable, Tier::Poll, Tier::Notify] {
        let db = TestDb::new().await;
        db.exec(
            "CREATE TABLE parent (id int PRIMARY KEY);
             CREATE TABLE child (id int PRIMARY KEY, parent int REFERENCES parent ON DELETE CASCADE);
             INSERT INTO parent VALUES (1), (2);
             INSERT INTO child VALUES (10, 1), (11, 1), (20, 2);",
        )
        .await;
        let (app, app_url) = db.role("app").await;
        db.exec(&format!("GRANT SELECT, DELETE ON parent TO \"{app}\""))
            .await;
        let notifier = Notifier::builder(&db.url)
            .watch(Watch::new("child", Operation::Delete).tier(tier))
            .start()
            .await
            .unwrap();
        let mut deleted =
            Events::subscribe(&notifier, Subscription::new("child", Operation::Delete)).await;
        connect(&app_url)
            .await
            .batch_execute("DELETE FROM parent WHERE id = 1")
            .await
            .expect("the cascading delete succeeds");
        assert_eq!(
            db.count("SELECT count(*) FROM child").await,
            1,
            "the cascade deleted child's rows"
        );
        let mut ids: Vec<_> = deleted
            .take(2)
            .await
            .iter()
            .map(|e| e.id().as_i64())
            .collect();
        ids.sort();
        assert_eq!(ids, [Some(10), Some(11)], "{tier:?}");
        deleted.assert_none_within(Duration::from_millis(200)).await;
        notifier.stop().await.unwrap();
    }
}

/// A `SECURITY DEFINER` function writes with its owner's privileges for a login role that has
/// none on the table (`session_user` is the caller): the rows it writes have their events.
#[actix_rt::test]
async fn writes_through_a_security_definer_function_are_captured() {
    for tier in [Tier::Durable, Tier::Notify] {
        let db = TestDb::new().await;
        db.exec(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             CREATE FUNCTION add_row(i int) RETURNS void LANGUAGE sql SECURITY DEFINER
               SET search_path = pg_catalog, public
               AS 'INSERT INTO public.t VALUES (i, ''through the function'')';",
        )
        .await;
        let (_, app_url) = db.role("app").await;
        let notifier = Notifier::builder(&db.url)
            .watch(
                Watch::new("t", Operation::Insert)
                    .extra_columns(["v"])
                    .tier(tier),
            )
            .start()
            .await
            .unwrap();
        let mut ins = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
        let app = connect(&app_url).await;
        let denied = app
            .batch_execute("INSERT INTO t VALUES (1, 'direct')")
            .await;
        assert!(denied.is_err(), "the role may not insert itself");
        app.batch_execute("SELECT add_row(5)")
            .await
            .expect("the function inserts");
        let e = ins.next().await;
        assert_eq!(
            (e.id().as_i64(), e.get("v")),
            (Some(5), Some(&json!("through the function"))),
            "{tier:?}"
        );
        ins.assert_none_within(Duration::from_millis(200)).await;
        notifier.stop().await.unwrap();
    }
}

/// What does not count as having changed the table's rows the watch's way: a lock on it
/// (`PREPARE … AS DELETE` takes the one a DELETE takes, without any privilege), a DELETE
/// refused for lack of privilege, or rows changed another way (an INSERT it may do). A role
/// calling the DELETE watch's helper after any of them still sends nothing.
#[actix_rt::test]
async fn a_helper_is_not_fooled_by_a_lock_a_refused_write_or_another_kind_of_write() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a')")
        .await;
    let (mallory, mallory_url) = db.role("mallory").await;
    db.exec(&format!("GRANT INSERT ON t TO \"{mallory}\""))
        .await;
    let notifier = Notifier::builder(&db.url)
        .watch(
            Watch::new("t", Operation::Delete)
                .extra_columns(["v"])
                .tier(Tier::Durable),
        )
        .watch(
            Watch::new("t", Operation::Insert)
                .extra_columns(["v"])
                .tier(Tier::Durable),
        )
        .start()
        .await
        .unwrap();
    let mut deleted = Events::subscribe(&notifier, Subscription::new("t", Operation::Delete)).await;
    let mut inserted =
        Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    let attacker = connect(&mallory_url).await;
    let forge = "SELECT sqlnotify.sqlnotify_public_t_delete(ARRAY['{\"id\":1,\"v\":\"forged\"}'])";
    attacker
        .batch_execute(&format!(
            "BEGIN;
             PREPARE p AS DELETE FROM t;
             {forge};
             SAVEPOINT s;"
        ))
        .await
        .expect("the lock and the call succeed");
    let refused = attacker.batch_execute("DELETE FROM t").await;
    assert!(refused.is_err(), "the role may not delete");
    attacker
        .batch_execute(&format!(
            "ROLLBACK TO s;
             {forge};
             INSERT INTO t VALUES (2, 'inserted');
             {forge};
             COMMIT"
        ))
        .await
        .expect("the calls succeed and do nothing");
    let e = inserted.next().await;
    assert_eq!(e.id().as_i64(), Some(2), "the real insert arrives");
    deleted.assert_none_within(Duration::from_millis(300)).await;
    assert_eq!(
        db.count("SELECT count(*) FROM sqlnotify.journal").await,
        1,
        "the insert's journal row only"
    );
    notifier.stop().await.unwrap();
}

/// An install of an earlier version (its helper without the row-count test, its catalog row
/// recording another definition) is replaced at the next start, as any changed definition
/// is (`revoke_on_model_change`, the default): the cascade's events then arrive.
#[actix_rt::test]
async fn a_restart_replaces_the_helper_of_an_earlier_install() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (id int PRIMARY KEY, parent int REFERENCES parent ON DELETE CASCADE);
         INSERT INTO parent VALUES (1); INSERT INTO child VALUES (10, 1);",
    )
    .await;
    let (app, app_url) = db.role("app").await;
    db.exec(&format!("GRANT SELECT, DELETE ON parent TO \"{app}\""))
        .await;
    let watch = || Watch::new("child", Operation::Delete).tier(Tier::Durable);
    let first = Notifier::builder(&db.url)
        .watch(watch())
        .start()
        .await
        .unwrap();
    first.stop().await.unwrap();
    // (what an earlier version left: a helper that drops the event, another definition)
    db.exec(
        "CREATE OR REPLACE FUNCTION sqlnotify.sqlnotify_public_child_delete(_sqn_payloads text[])
           RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
           AS 'BEGIN RAISE WARNING ''earlier version''; END';
         UPDATE sqlnotify.catalog SET definition = 'earlier', definition_hash = md5('earlier');",
    )
    .await;
    let notifier = Notifier::builder(&db.url)
        .watch(watch())
        .start()
        .await
        .unwrap();
    assert_eq!(
        db.count(
            "SELECT count(*) FROM pg_proc WHERE proname = 'sqlnotify_public_child_delete'
                AND prosrc LIKE '%pg_stat_get_xact_tuples_deleted%'"
        )
        .await,
        1,
        "the helper was replaced"
    );
    let mut deleted =
        Events::subscribe(&notifier, Subscription::new("child", Operation::Delete)).await;
    connect(&app_url)
        .await
        .batch_execute("DELETE FROM parent WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(deleted.next().await.id().as_i64(), Some(10));
    notifier.stop().await.unwrap();
}
