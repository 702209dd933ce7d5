//! Context (issue 15 §1, "who"): events of a watch with `context([...])` carry the values the
//! trigger read from the *writer's* session — PostgreSQL settings set with `SET LOCAL`, MySQL
//! user variables, SQLite per-connection values set with `sqlite_context::set` — `null` for a
//! value not set, and the write never fails because of them. Rows that overflow (PostgreSQL's
//! notify tier) carry them too.

use serde_json::{json, Value};
use sqlnotify::{Error, Operation, Subscription, Tier};

use crate::common::backend::{Backend, Kind};
use crate::common::Events;

/// The name of the application's "user id" value and of one the application never sets, as
/// each dialect spells them.
fn names(db: &impl Backend) -> (&'static str, &'static str) {
    match db.kind() {
        Kind::Mysql => ("@app_user_id", "@app_never_set"),
        _ => ("app.user_id", "app.never_set"),
    }
}

/// The session values each dialect offers besides the application's own.
fn session_names(db: &impl Backend) -> Vec<&'static str> {
    match db.kind() {
        Kind::Postgres(_) => vec![
            "application_name",
            "current_user",
            "session_user",
            "backend_pid",
            "client_addr",
        ],
        Kind::Mysql => vec!["user", "current_user", "connection_id"],
        Kind::Sqlite => vec![],
    }
}

/// Context set by the writer arrives with its events; unset names are null; a writer that sets
/// nothing writes as before; DELETE events of a watch without context carry none; UPDATE
/// events carry context beside old values, also when the row overflows a notification.
pub async fn context_comes_from_the_writers_session(db: &impl Backend) {
    let (user, never) = names(db);
    db.run("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
        .await;
    let mut captured = vec![user, never];
    captured.extend(session_names(db));
    let notifier = db
        .builder()
        .watch(
            db.watch("items", Operation::Insert)
                .extra_columns(["name"])
                .context(captured.clone()),
        )
        .watch(
            db.watch("items", Operation::Update)
                .extra_columns(["name"])
                .old_values(true)
                .context([user]),
        )
        .watch(db.watch("items", Operation::Delete))
        .start()
        .await
        .unwrap();
    let mut ins = Events::subscribe(&notifier, Subscription::new("items", Operation::Insert)).await;
    let mut upd = Events::subscribe(&notifier, Subscription::new("items", Operation::Update)).await;
    let mut del = Events::subscribe(&notifier, Subscription::new("items", Operation::Delete)).await;

    let mut set = vec![(user, "42")];
    if let Kind::Postgres(_) = db.kind() {
        set.push(("application_name", "ctx-writer"));
    }
    db.run_with_context(&set, "INSERT INTO items (id, name) VALUES (1, 'a')")
        .await;
    let e = ins.next().await;
    assert_eq!(e.get("name"), Some(&json!("a")));
    assert_eq!(e.context(user), Some(&json!("42")), "{}", e.to_record());
    assert_eq!(e.context(never), Some(&Value::Null), "never set: null");
    assert_eq!(e.context("not.captured"), None);
    let values = e
        .context_values()
        .expect("a context watch carries its values");
    let mut keys: Vec<&str> = values.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expected = captured.clone();
    expected.sort_unstable();
    assert_eq!(keys, expected);
    let record: Value = serde_json::from_str(&e.to_record()).unwrap();
    assert_eq!(record["context"][user], json!("42"));
    match db.kind() {
        Kind::Postgres(_) => {
            // the writer's session, not the listener's
            assert_eq!(e.context("application_name"), Some(&json!("ctx-writer")));
            let role = e.context("current_user").unwrap();
            assert!(role.as_str().is_some_and(|r| !r.is_empty()), "{role}");
            assert_eq!(e.context("session_user"), Some(role));
            assert!(e.context("backend_pid").unwrap().as_i64().unwrap() > 0);
            let addr = e.context("client_addr").unwrap();
            assert!(addr.is_null() || addr.is_string(), "{addr}");
        }
        Kind::Mysql => {
            let who = e.context("user").unwrap().as_str().unwrap();
            assert!(who.starts_with("root@"), "{who}");
            assert!(e.context("current_user").unwrap().is_string());
            assert!(e.context("connection_id").unwrap().as_i64().unwrap() > 0);
        }
        Kind::Sqlite => {}
    }

    // a writer that sets nothing: every name null (session values still there), the write
    // goes through
    db.run("INSERT INTO items (id, name) VALUES (2, 'b')").await;
    let e = ins.next().await;
    assert_eq!(e.context(user), Some(&Value::Null));
    assert_eq!(e.context(never), Some(&Value::Null));
    if let Kind::Postgres(_) = db.kind() {
        assert_ne!(e.context("application_name"), Some(&json!("ctx-writer")));
    }

    if db.kind() == Kind::Mysql {
        // user variables keep their type: a number stays a number
        db.run("SET @app_user_id = 42; INSERT INTO items (id, name) VALUES (3, 'n')")
            .await;
        assert_eq!(ins.next().await.context(user), Some(&json!(42)));
    }

    // UPDATE: context beside old values; a row large enough to overflow a notification
    // carries both
    db.run_with_context(&[(user, "7")], "UPDATE items SET name = 'c' WHERE id = 1")
        .await;
    let e = upd.next().await;
    assert_eq!(e.old("name"), Some(&json!("a")));
    assert_eq!(e.context(user), Some(&json!("7")));
    assert_eq!(e.context_values().map(|v| v.len()), Some(1));
    let big = "x".repeat(9000);
    db.run_with_context(
        &[(user, "8")],
        &format!("UPDATE items SET name = '{big}' WHERE id = 1"),
    )
    .await;
    let e = upd.next().await;
    assert!(!e.is_truncated());
    assert_eq!(e.get("name"), Some(&json!(big)));
    assert_eq!(e.context(user), Some(&json!("8")));
    if db.kind() == Kind::Postgres(Tier::Notify) {
        let stats = notifier.stats().await.unwrap();
        assert!(stats.overflow_resolved >= 1, "{stats:?}");
    }

    if let Kind::Postgres(_) = db.kind() {
        // SET LOCAL ends with its transaction: the next write of the same session reads the
        // setting as empty, which is null
        db.run(
            "BEGIN; SET LOCAL app.user_id = '5'; UPDATE items SET name = 'd' WHERE id = 1; COMMIT; \
             UPDATE items SET name = 'e' WHERE id = 1;",
        )
        .await;
        assert_eq!(upd.next().await.context(user), Some(&json!("5")));
        assert_eq!(upd.next().await.context(user), Some(&Value::Null));
    }

    // DELETE: no context asked, none carried
    db.run_with_context(&[(user, "9")], "DELETE FROM items WHERE id = 2")
        .await;
    let e = del.next().await;
    assert!(e.context_values().is_none() && e.context(user).is_none());
    assert!(!e.to_record().contains("context"));

    ins.assert_empty();
    upd.assert_empty();
    del.assert_empty();
    notifier.stop().await.unwrap();
}

/// A name the dialect cannot capture fails `start()` with `InvalidWatch` naming the watch and
/// the name; nothing is installed.
pub async fn unknown_context_names_are_refused_at_start(db: &impl Backend) {
    db.run("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
        .await;
    let bad = match db.kind() {
        Kind::Postgres(_) => "user_id",
        Kind::Mysql => "app.user_id",
        Kind::Sqlite => "",
    };
    let e = db
        .builder()
        .watch(
            db.watch("items", Operation::Update)
                .context([names(db).0, bad]),
        )
        .start()
        .await
        .unwrap_err();
    match &e {
        Error::InvalidWatch { watch, reason } => {
            assert!(watch.contains("items"), "{e}");
            assert!(reason.contains(&format!("{bad:?}")), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(db.installed_triggers().await.is_empty());
}
