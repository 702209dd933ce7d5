//! Old values (issue 15 §1): UPDATE and DELETE events of a watch with `old_values(true)` carry
//! the old row's carried columns and, on UPDATE, the table's columns that really changed
//! (NULL ↔ value is a change, NULL ↔ NULL is not); INSERT events carry neither. Rows too
//! large for one notification (PostgreSQL's notify tier: the overflow table) carry them too.

use serde_json::{json, Value};
use sqlnotify::{ChangeEvent, Operation, Subscription, Tier};

use crate::common::backend::{Backend, Kind};
use crate::common::Events;

/// How a JSON document whose keys were only reordered compares on this backend: as a value
/// (PostgreSQL's `jsonb`, MySQL's `JSON`) or as text (SQLite, MariaDB).
async fn json_compared_as_value(db: &impl Backend) -> bool {
    match db.kind() {
        Kind::Postgres(_) => true,
        Kind::Sqlite => false,
        Kind::Mysql => db.number("SELECT VERSION() NOT LIKE '%MariaDB%'").await == 1,
    }
}

fn changed(e: &ChangeEvent) -> Vec<&str> {
    e.changed_columns()
        .expect("an UPDATE of an old_values watch lists its changed columns")
        .iter()
        .map(String::as_str)
        .collect()
}

/// Insert, update and delete with `old_values(true)`: old values of the carried columns,
/// changed columns of the whole table (including columns the event does not carry), JSON
/// documents, and a row large enough to overflow a notification.
pub async fn old_values_and_changed_columns_on_update_and_delete(db: &impl Backend) {
    let (json_type, extra_json) = match db.kind() {
        // `json` has no equality operator: compared as text
        Kind::Postgres(_) => ("jsonb", ", raw json"),
        Kind::Sqlite => ("TEXT", ""),
        Kind::Mysql => ("JSON", ""),
    };
    db.run(&format!(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, doc {json_type}, \
         note VARCHAR(20){extra_json})"
    ))
    .await;
    let notifier = db
        .builder()
        .watch(
            db.watch("items", Operation::Insert)
                .extra_columns(["name", "doc"])
                .old_values(true),
        )
        .watch(
            db.watch("items", Operation::Update)
                .extra_columns(["name", "qty", "doc"])
                .old_values(true),
        )
        .watch(
            db.watch("items", Operation::Delete)
                .extra_columns(["name", "doc"])
                .old_values(true),
        )
        .start()
        .await
        .unwrap();
    let mut ins = Events::subscribe(&notifier, Subscription::new("items", Operation::Insert)).await;
    let mut upd = Events::subscribe(&notifier, Subscription::new("items", Operation::Update)).await;
    let mut del = Events::subscribe(&notifier, Subscription::new("items", Operation::Delete)).await;

    db.run(r#"INSERT INTO items (id, name, qty, doc, note) VALUES (1, 'a', NULL, '{"a": 1, "b": [2]}', 'n')"#)
        .await;
    let e = ins.next().await;
    assert_eq!(e.get("name"), Some(&json!("a")));
    assert!(e.old_values().is_none() && e.changed_columns().is_none());
    assert_eq!(e.old("name"), None);
    assert!(!e.to_record().contains("\"old\""), "{}", e.to_record());
    let doc_as_inserted = e.get("doc").cloned().unwrap();

    // NULL -> value; a column set to its own value is no change; a column the event does not
    // carry (note) is listed when it changes
    db.run("UPDATE items SET qty = 5, name = 'a', note = 'm' WHERE id = 1")
        .await;
    let e = upd.next().await;
    assert_eq!(e.get("qty"), Some(&json!(5)));
    assert_eq!(e.old("qty"), Some(&Value::Null));
    assert_eq!(e.old("name"), Some(&json!("a")));
    assert_eq!(e.old("id"), Some(&json!(1)), "the key's old value too");
    assert_eq!(e.old("note"), None, "only carried columns");
    assert_eq!(e.old("doc"), Some(&doc_as_inserted));
    assert_eq!(changed(&e), ["qty", "note"]);
    let record: Value = serde_json::from_str(&e.to_record()).unwrap();
    assert_eq!(record["old"]["qty"], Value::Null);
    assert_eq!(record["changed"], json!(["qty", "note"]));

    // value -> NULL, NULL -> NULL is no change, and a JSON document with its keys reordered
    db.run(r#"UPDATE items SET qty = NULL, note = NULL, doc = '{"b": [2], "a": 1}' WHERE id = 1"#)
        .await;
    let e = upd.next().await;
    assert_eq!(e.get("qty"), Some(&Value::Null));
    assert_eq!(e.old("qty"), Some(&json!(5)));
    if json_compared_as_value(db).await {
        assert_eq!(changed(&e), ["qty", "note"]);
    } else {
        assert_eq!(changed(&e), ["qty", "doc", "note"]);
    }
    db.run("UPDATE items SET qty = NULL, note = NULL, name = 'b' WHERE id = 1")
        .await;
    let e = upd.next().await;
    assert_eq!(changed(&e), ["name"], "NULL to NULL is no change");
    assert_eq!(
        (e.old("name"), e.get("name")),
        (Some(&json!("a")), Some(&json!("b")))
    );

    // an UPDATE that changes nothing still fires (no trigger_columns): an empty list
    db.run("UPDATE items SET name = name WHERE id = 1").await;
    let e = upd.next().await;
    assert_eq!(changed(&e), Vec::<&str>::new());

    if let Kind::Postgres(_) = db.kind() {
        // `json` compares as text: the same document with other spacing is a change
        db.run(r#"UPDATE items SET raw = '{"a":1}' WHERE id = 1"#)
            .await;
        assert_eq!(changed(&upd.next().await), ["raw"]);
        db.run(r#"UPDATE items SET raw = '{"a": 1}' WHERE id = 1"#)
            .await;
        assert_eq!(changed(&upd.next().await), ["raw"]);
        db.run(r#"UPDATE items SET doc = '{"a":1,"b":[2]}' WHERE id = 1"#)
            .await;
        assert_eq!(
            changed(&upd.next().await),
            Vec::<&str>::new(),
            "jsonb: same value"
        );
    }

    // large old and new values: on PostgreSQL's notify tier the payload goes to the overflow
    // table, and the event resolved from it carries both
    let big_old = "o".repeat(6000);
    let big_new = "N".repeat(6000);
    db.run(&format!("UPDATE items SET name = '{big_old}' WHERE id = 1"))
        .await;
    upd.next().await;
    db.run(&format!(
        "UPDATE items SET name = '{big_new}', qty = 7 WHERE id = 1"
    ))
    .await;
    let e = upd.next().await;
    assert!(!e.is_truncated());
    assert_eq!(e.get("name"), Some(&json!(big_new)));
    assert_eq!(e.old("name"), Some(&json!(big_old)));
    assert_eq!(changed(&e), ["name", "qty"]);
    if db.kind() == Kind::Postgres(Tier::Notify) {
        let stats = notifier.stats().await.unwrap();
        assert!(stats.overflow_resolved >= 1, "{stats:?}");
    }

    // DELETE: the old values are the deleted row's carried columns; no changed list
    db.run("DELETE FROM items WHERE id = 1").await;
    let e = del.next().await;
    assert_eq!(e.id().as_i64(), Some(1));
    assert_eq!(e.old("name"), Some(&json!(big_new)));
    assert_eq!(e.old("id"), Some(&json!(1)));
    assert_eq!(e.old("doc"), e.get("doc"));
    assert!(
        e.old("qty").is_none(),
        "qty is not carried by the delete watch"
    );
    assert!(e.changed_columns().is_none());
    let record: Value = serde_json::from_str(&e.to_record()).unwrap();
    assert_eq!(record["old"]["name"], json!(big_new));
    assert!(record.get("changed").is_none());

    ins.assert_empty();
    upd.assert_empty();
    del.assert_empty();
    notifier.stop().await.unwrap();
}
