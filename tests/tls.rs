//! TLS to PostgreSQL (feature `tls`): a cluster of the test's own that speaks TLS with a
//! certificate from a test CA (for `localhost` only) and refuses every unencrypted TCP
//! connection, replication ones too, so an event that arrives proves that the listener, the
//! control connection and (logical tier) the replication stream were encrypted; and libpq's
//! `sslmode`s checking what they promise.

mod common;

use common::certs::{percent_encode, Ca};
use common::{Cluster, Events};
use sqlnotify::{Error, Notifier, Operation, Subscription, Tier, Watch};

/// A CA's certificate (PEM) and a server certificate and key it signed for `names`.
fn certificates(names: &[&str]) -> (String, String, String) {
    let ca = Ca::new();
    let (cert, key) = ca.issue("localhost", names);
    (ca.pem(), cert, key)
}

/// A started notifier on `url` watching `t`, and its events; or the start's error.
async fn watch(url: &str, tier: Tier) -> Result<(Notifier, Events), Error> {
    let notifier = Notifier::builder(url)
        .watch(Watch::new("t", Operation::Insert).tier(tier))
        .start()
        .await?;
    let events = Events::subscribe(&notifier, Subscription::new("t", Operation::Insert)).await;
    Ok((notifier, events))
}

#[actix_rt::test]
async fn every_sslmode_does_what_libpq_promises_against_a_server_that_refuses_plaintext() {
    let (ca, cert, key) = certificates(&["localhost"]);
    let Some(cluster) = Cluster::start_tls(
        &cert,
        &key,
        "-c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10",
    ) else {
        common::prerequisite_missing(
            "every_sslmode_does_what_libpq_promises_against_a_server_that_refuses_plaintext",
            "no PostgreSQL cluster of its own could be started",
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("sqlnotify-tls-{}", cluster.port));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let (other_ca, _, _) = certificates(&["localhost"]);
    let other_ca_file = dir.join("other-ca.pem");
    std::fs::write(&other_ca_file, &other_ca).unwrap();

    // The socket trusts local clients: the test's own writes go there.
    let (socket, port) = cluster.socket();
    let admin = common::connect(&format!(
        "postgresql:///postgres?host={socket}&port={port}&user=postgres"
    ))
    .await;
    admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let tcp = |host: &str, params: &str| {
        format!("postgres://postgres@{host}:{port}/postgres?connect_timeout=10&{params}")
    };
    let ca_param =
        |file: &std::path::Path| format!("sslrootcert={}", percent_encode(file.to_str().unwrap()));

    // Unencrypted: refused by the server, a database error at start.
    let e = watch(&tcp("127.0.0.1", "sslmode=disable"), Tier::Notify)
        .await
        .err()
        .expect("a plaintext connection is refused");
    assert!(matches!(e, Error::Database { .. }), "{e:?}");

    // Encrypted, and the certificate checked as far as each mode says.
    let accepted = [
        ("no sslmode (prefer)", tcp("127.0.0.1", ""), Tier::Notify),
        ("require", tcp("127.0.0.1", "sslmode=require"), Tier::Notify),
        (
            "verify-ca by IP address",
            tcp(
                "127.0.0.1",
                &format!("sslmode=verify-ca&{}", ca_param(&ca_file)),
            ),
            Tier::Durable,
        ),
        (
            "verify-full by the certificate's name",
            tcp(
                "localhost",
                &format!("sslmode=verify-full&{}", ca_param(&ca_file)),
            ),
            Tier::Durable,
        ),
        // The logical tier's replication connection is encrypted too.
        (
            "logical tier, require",
            tcp("127.0.0.1", "sslmode=require"),
            Tier::Logical,
        ),
        (
            "logical tier, verify-full",
            tcp(
                "localhost",
                &format!("sslmode=verify-full&{}", ca_param(&ca_file)),
            ),
            Tier::Logical,
        ),
    ];
    for (id, (what, url, tier)) in (1..).zip(accepted) {
        let (notifier, mut events) = watch(&url, tier)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        admin
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap();
        let event = events.next().await;
        assert_eq!(event.id().as_i64(), Some(i64::from(id)), "{what}");
        notifier.stop().await.unwrap();
    }
    // Every client connection the server has seen on TCP was encrypted.
    let plain: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE client_addr IS NOT NULL AND NOT ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0);

    // Refused by the client: a name the certificate does not carry, a CA that did not sign it.
    let refused = [
        (
            "verify-full by IP address",
            tcp(
                "127.0.0.1",
                &format!("sslmode=verify-full&{}", ca_param(&ca_file)),
            ),
        ),
        (
            "verify-full against another CA",
            tcp(
                "localhost",
                &format!("sslmode=verify-full&{}", ca_param(&other_ca_file)),
            ),
        ),
        (
            "verify-ca against another CA",
            tcp(
                "127.0.0.1",
                &format!("sslmode=verify-ca&{}", ca_param(&other_ca_file)),
            ),
        ),
        (
            "verify-full against Mozilla's roots",
            tcp("localhost", "sslmode=verify-full"),
        ),
    ];
    for (what, url) in refused {
        let e = watch(&url, Tier::Notify)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: the server's certificate was accepted"));
        assert!(matches!(e, Error::Database { .. }), "{what}: {e:?}");
        let chain = error_chain(&e);
        assert!(chain.contains("certificate"), "{what}: {chain}");
    }

    // A root certificate file that is missing is an error naming it, before connecting.
    let missing = dir.join("missing.pem");
    let e = watch(
        &tcp(
            "localhost",
            &format!("sslmode=verify-full&{}", ca_param(&missing)),
        ),
        Tier::Notify,
    )
    .await
    .err()
    .expect("a missing sslrootcert is an error");
    assert!(matches!(e, Error::InvalidUrl { .. }), "{e:?}");
    assert!(e.to_string().contains("missing.pem"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn error_chain(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A CA that signs a server certificate for `localhost` and a client certificate with the
/// common name `cn`: (CA, server certificate, server key, client certificate, client key).
fn certificates_with_client(cn: &str) -> (String, String, String, String, String) {
    let ca = Ca::new();
    let (server_cert, server_key) = ca.issue("localhost", &["localhost"]);
    let (client_cert, client_key) = ca.issue(cn, &[]);
    (ca.pem(), server_cert, server_key, client_cert, client_key)
}

/// `sslcert` and `sslkey` authenticate a role the server admits by certificate only (`cert`
/// in pg_hba.conf, replication included): the trigger tiers' connections and the logical
/// tier's replication stream present it; without it the same role is refused.
#[actix_rt::test]
async fn a_client_certificate_authenticates_where_the_server_demands_one() {
    let (ca, server_cert, server_key, client_cert, client_key) =
        certificates_with_client("certuser");
    let Some(cluster) = Cluster::start_tls_with(
        &server_cert,
        &server_key,
        Some(&ca),
        "hostssl all certuser all cert\nhostssl replication certuser all cert\n",
        "-c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10",
    ) else {
        common::prerequisite_missing(
            "a_client_certificate_authenticates_where_the_server_demands_one",
            "no PostgreSQL cluster of its own could be started",
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("sqlnotify-tls-client-{}", cluster.port));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        percent_encode(path.to_str().unwrap())
    };
    let ca_file = file("ca.pem", &ca);
    let cert_file = file("client.pem", &client_cert);
    let key_file = file("client-key.pem", &client_key);

    let (socket, port) = cluster.socket();
    let admin = common::connect(&format!(
        "postgresql:///postgres?host={socket}&port={port}&user=postgres"
    ))
    .await;
    admin
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY); \
             CREATE ROLE certuser LOGIN SUPERUSER REPLICATION",
        )
        .await
        .unwrap();
    let url = |params: &str| {
        format!(
            "postgres://certuser@localhost:{port}/postgres?connect_timeout=10&\
             sslmode=verify-full&sslrootcert={ca_file}{params}"
        )
    };
    let with_cert = url(&format!("&sslcert={cert_file}&sslkey={key_file}"));

    for (id, tier) in (1..).zip([Tier::Durable, Tier::Logical]) {
        let (notifier, mut events) = watch(&with_cert, tier)
            .await
            .unwrap_or_else(|e| panic!("{tier:?} with a client certificate: {e}"));
        admin
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap();
        assert_eq!(
            events.next().await.id().as_i64(),
            Some(i64::from(id)),
            "{tier:?}"
        );
        // The server saw the certificate: on a walsender too, for the logical tier.
        let (sessions, walsenders): (i64, i64) = admin
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE backend_type = 'walsender') \
                 FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
                 WHERE usename = 'certuser' AND ssl AND client_dn = '/CN=certuser'",
                &[],
            )
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
        assert!(
            sessions >= 1,
            "{tier:?}: no session authenticated by certificate"
        );
        assert_eq!(
            walsenders >= 1,
            tier == Tier::Logical,
            "{tier:?}: {walsenders} walsenders"
        );
        notifier.stop().await.unwrap();
    }
    // Without the certificate the role is refused.
    let e = watch(&url(""), Tier::Durable)
        .await
        .err()
        .expect("no client certificate");
    assert!(matches!(e, Error::Database { .. }), "{e:?}");
    let chain = error_chain(&e);
    assert!(chain.contains("certificate"), "{chain}");
    std::fs::remove_dir_all(&dir).unwrap();
}
