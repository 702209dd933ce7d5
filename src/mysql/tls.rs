//! How sqlnotify connects to MySQL / MariaDB: the URL's TLS parameters, in MySQL's own
//! words (`ssl-mode`, `ssl-ca`, `ssl-cert`, `ssl-key`, as the `mysql` client and sqlx spell
//! them), taken out of the URL and turned into mysql_async's options ([`MysqlConfig`]), with
//! rustls under feature `tls`.
//!
//! | `ssl-mode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `DISABLED` | no | – |
//! | `PREFERRED` (the default) | when the server offers TLS | no |
//! | `REQUIRED` | yes | no |
//! | `VERIFY_CA` (the default when `ssl-ca` is given) | yes | chain, against `ssl-ca` (else Mozilla's roots), and the host name too (see below) |
//! | `VERIFY_IDENTITY` | yes | chain and host name |
//!
//! `VERIFY_CA` is stricter than MySQL's: mysql_async's rustls path cannot leave the host name
//! out of the check (it recognises a name mismatch by an error text rustls no longer prints,
//! blackbeam/mysql_async#404), so a certificate that does not name the host is refused —
//! never accepted. `ssl-cert` and `ssl-key` (PEM, both or neither) present a client
//! certificate; the key must be RSA in PKCS #1 form (`BEGIN RSA PRIVATE KEY`), the only
//! form mysql_async reads — another is a typed error that says how to convert it. Modes are case-insensitive; the files are read when the notifier is built,
//! and a file that cannot be read or holds no certificate or key is an error naming it.
//!
//! Without the `tls` feature, `PREFERRED` connects without TLS and every other mode but
//! `DISABLED`, `ssl-ca`, `ssl-cert` and `ssl-key` are a typed error when the notifier is
//! built. mysql_async's own TLS parameters (`require_ssl`, `verify_ca`, `verify_identity`,
//! `built_in_roots`) are refused with the `ssl-mode` that says the same.

use std::ops::Deref;
use std::path::PathBuf;

use mysql_async::{Conn, Opts};

use crate::error::{Error, Result};

/// MySQL's `--ssl-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disabled,
    Preferred,
    Required,
    VerifyCa,
    VerifyIdentity,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode> {
        Ok(match value.to_ascii_uppercase().as_str() {
            "DISABLED" => SslMode::Disabled,
            "PREFERRED" => SslMode::Preferred,
            "REQUIRED" => SslMode::Required,
            "VERIFY_CA" => SslMode::VerifyCa,
            "VERIFY_IDENTITY" => SslMode::VerifyIdentity,
            _ => {
                return Err(Error::InvalidUrl {
                    reason: format!(
                        "ssl-mode {value:?} is not one of DISABLED, PREFERRED, REQUIRED, \
                         VERIFY_CA, VERIFY_IDENTITY"
                    ),
                })
            }
        })
    }

    /// Its name in a URL.
    fn name(self) -> &'static str {
        match self {
            SslMode::Disabled => "DISABLED",
            SslMode::Preferred => "PREFERRED",
            SslMode::Required => "REQUIRED",
            SslMode::VerifyCa => "VERIFY_CA",
            SslMode::VerifyIdentity => "VERIFY_IDENTITY",
        }
    }
}

/// The TLS parameters of a `mysql://` URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsParams {
    /// `None`: not given (`PREFERRED`, or `VERIFY_CA` with `ssl-ca`).
    pub mode: Option<SslMode>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsParams {
    /// Takes `key=value` if it is a TLS parameter (`Ok(true)`); `value` is percent-decoded.
    pub fn take(&mut self, key: &str, value: &str) -> Result<bool> {
        let decoded = || -> Result<PathBuf> {
            let text = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| Error::InvalidUrl {
                    reason: format!("the value of {key} is not UTF-8 once decoded"),
                })?;
            Ok(PathBuf::from(text.as_ref()))
        };
        match key {
            "ssl-mode" | "ssl_mode" | "sslMode" => self.mode = Some(SslMode::parse(value)?),
            "ssl-ca" | "ssl_ca" => self.ca = Some(decoded()?),
            "ssl-cert" | "ssl_cert" => self.cert = Some(decoded()?),
            "ssl-key" | "ssl_key" => self.key = Some(decoded()?),
            "require_ssl" | "verify_ca" | "verify_identity" | "built_in_roots" => {
                return Err(Error::InvalidUrl {
                    reason: format!(
                        "{key}: sqlnotify takes MySQL's ssl-mode instead (DISABLED, PREFERRED, \
                         REQUIRED, VERIFY_CA, VERIFY_IDENTITY) with ssl-ca for the root \
                         certificates"
                    ),
                })
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The mode in force: as given, else `VERIFY_CA` with `ssl-ca`, else `PREFERRED`.
    pub fn mode(&self) -> SslMode {
        self.mode.unwrap_or(if self.ca.is_some() {
            SslMode::VerifyCa
        } else {
            SslMode::Preferred
        })
    }

    /// The error a build without the `tls` feature gives for what this asks, if any.
    #[cfg_attr(feature = "tls", allow(dead_code))]
    fn without_the_feature(&self) -> Option<Error> {
        self.needs_tls().map(|what| Error::Unsupported {
            what: format!(
                "TLS connections to MySQL ({what} in the URL) need sqlnotify's `tls` feature"
            ),
        })
    }

    /// What this asks for that needs TLS, if anything (`PREFERRED` does not).
    fn needs_tls(&self) -> Option<String> {
        if matches!(
            self.mode(),
            SslMode::Required | SslMode::VerifyCa | SslMode::VerifyIdentity
        ) {
            return Some(format!("ssl-mode={}", self.mode().name()));
        }
        [
            ("ssl-ca", &self.ca),
            ("ssl-cert", &self.cert),
            ("ssl-key", &self.key),
        ]
        .into_iter()
        .find(|(_, p)| p.is_some())
        .map(|(k, _)| k.to_string())
    }
}

/// mysql_async's options for one server, with the TLS parameters applied: what every MySQL
/// connection of the dialect opens through. Derefs to the options (host, user, database).
#[derive(Clone)]
pub(crate) struct MysqlConfig {
    /// The options of the first attempt.
    opts: Opts,
    /// `PREFERRED` with TLS: the options without TLS, for a server that offers none.
    plain: Option<Opts>,
}

impl Deref for MysqlConfig {
    type Target = Opts;

    fn deref(&self) -> &Opts {
        &self.opts
    }
}

impl MysqlConfig {
    /// `opts` (parsed from the URL without its TLS parameters) with `tls` applied; reads the
    /// certificate files.
    pub fn new(opts: Opts, tls: &TlsParams) -> Result<MysqlConfig> {
        let mode = tls.mode();
        if let (Some(_), None) | (None, Some(_)) = (&tls.cert, &tls.key) {
            return Err(Error::InvalidUrl {
                reason: "ssl-cert and ssl-key go together: give both or neither".into(),
            });
        }
        if mode == SslMode::Disabled {
            if let Some(what) = tls.needs_tls() {
                return Err(Error::InvalidUrl {
                    reason: format!("{what} with ssl-mode=DISABLED: nothing would use it"),
                });
            }
            return Ok(MysqlConfig { opts, plain: None });
        }
        #[cfg(not(feature = "tls"))]
        {
            if let Some(e) = tls.without_the_feature() {
                return Err(e);
            }
            // PREFERRED without TLS support: as a client built without it, plain.
            Ok(MysqlConfig { opts, plain: None })
        }
        #[cfg(feature = "tls")]
        {
            // mysql_async's rustls builds its configuration with the process's provider:
            // ring's unless the application installed one.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let ssl = ssl_opts(mode, tls)?;
            let secure = mysql_async::OptsBuilder::from_opts(opts.clone()).ssl_opts(Some(ssl));
            Ok(MysqlConfig {
                opts: Opts::from(secure),
                plain: (mode == SslMode::Preferred).then_some(opts),
            })
        }
    }

    /// Opens a connection; with `PREFERRED`, without TLS when the server offers none.
    pub async fn connect(&self) -> std::result::Result<Conn, mysql_async::Error> {
        match open(self.opts.clone()).await {
            Err(mysql_async::Error::Driver(
                mysql_async::DriverError::NoClientSslFlagFromServer,
            )) if self.plain.is_some() => {
                let plain = self.plain.clone().expect("checked");
                open(plain).await
            }
            other => other,
        }
    }

    /// Whether connections ask for TLS (plain ones follow with `PREFERRED`).
    #[cfg(test)]
    fn tries_tls(&self) -> bool {
        self.opts.ssl_opts().is_some()
    }
}

/// `Conn::new` in a task of its own. mysql_async panics on some malformed replies while it
/// authenticates (a slice past a packet's end, a public key that is no PEM, in
/// `caching_sha2_password` over plaintext): a server that is not MySQL, or whoever sits
/// between, must not take the listener down with it — the panic is this connection's error.
async fn open(opts: Opts) -> std::result::Result<Conn, mysql_async::Error> {
    /// Aborts the connecting task when the caller gives up (a timeout, a stop): the attempt
    /// and its socket go with it instead of lingering.
    struct AbortOnDrop(tokio::task::JoinHandle<std::result::Result<Conn, mysql_async::Error>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(tokio::spawn(Conn::new(opts)));
    match (&mut task.0).await {
        Ok(result) => result,
        Err(e) => {
            let what = match e.try_into_panic() {
                Ok(panic) => crate::error::panic_message(&*panic),
                Err(e) => e.to_string(),
            };
            Err(mysql_async::Error::Other(
                format!(
                    "the MySQL driver failed on the server's replies while connecting ({what}): \
                     is this a MySQL server, and is the network path to it trusted?"
                )
                .into(),
            ))
        }
    }
}

/// mysql_async's TLS options for `mode` (not `DISABLED`).
#[cfg(feature = "tls")]
fn ssl_opts(mode: SslMode, tls: &TlsParams) -> Result<mysql_async::SslOpts> {
    use mysql_async::{ClientIdentity, SslOpts};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;

    let mut ssl = SslOpts::default();
    match mode {
        SslMode::Disabled | SslMode::Preferred | SslMode::Required => {
            if tls.ca.is_some() {
                log::warn!(
                    "sqlnotify: ssl-ca is given with ssl-mode={}, which checks no certificate: \
                     the server's certificate is not checked (ssl-mode=VERIFY_CA or \
                     VERIFY_IDENTITY would)",
                    mode.name()
                );
            }
            ssl = ssl.with_danger_accept_invalid_certs(true)
        }
        // mysql_async's skip_domain_validation (what VERIFY_CA would set) does nothing with
        // this rustls (blackbeam/mysql_async#404): the name is checked either way.
        SslMode::VerifyCa | SslMode::VerifyIdentity => {}
    }
    if let Some(path) = &tls.ca {
        ssl = ssl
            .with_root_certs(vec![read_certs(path, "ssl-ca")?.into()])
            .with_disable_built_in_roots(true);
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        let chain = read_certs(cert, "ssl-cert")?;
        let key_pem = read_file(key, "ssl-key")?;
        match PrivateKeyDer::from_pem_slice(&key_pem) {
            Ok(PrivateKeyDer::Pkcs1(_)) => {}
            // mysql_async's rustls path reads RSA keys in PKCS #1 form only.
            Ok(_) => {
                return Err(Error::Unsupported {
                    what: format!(
                        "ssl-key {}: the MySQL driver presents RSA keys in PKCS #1 form only \
                         (-----BEGIN RSA PRIVATE KEY-----); convert an RSA key with \
                         `openssl rsa -in key.pem -traditional -out key-rsa.pem`",
                        key.display()
                    ),
                })
            }
            Err(e) => return Err(bad_file(key, "ssl-key", &e)),
        }
        ssl = ssl.with_client_identity(Some(ClientIdentity::new(chain.into(), key_pem.into())));
    }
    Ok(ssl)
}

/// The error for the file at `path`, the URL's `param`.
#[cfg(feature = "tls")]
fn bad_file(path: &std::path::Path, param: &str, e: &dyn std::fmt::Display) -> Error {
    Error::InvalidUrl {
        reason: format!("{param} {}: {e}", path.display()),
    }
}

/// The bytes of the file at `path`, the URL's `param`.
#[cfg(feature = "tls")]
fn read_file(path: &std::path::Path, param: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| bad_file(path, param, &e))
}

/// The file at `path`, the URL's `param`, checked to hold PEM certificates, at least one.
#[cfg(feature = "tls")]
fn read_certs(path: &std::path::Path, param: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let bytes = read_file(path, param)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad_file(path, param, &e))?;
    if certs.is_empty() {
        return Err(bad_file(path, param, &"no PEM certificate in it"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Result<TlsParams> {
        let mut p = TlsParams::default();
        for (k, v) in pairs {
            assert!(p.take(k, v)?, "{k} is a TLS parameter");
        }
        Ok(p)
    }

    fn opts() -> Opts {
        Opts::from_url("mysql://root@127.0.0.1:3306/app").unwrap()
    }

    #[test]
    fn modes_and_defaults() {
        assert_eq!(params(&[]).unwrap().mode(), SslMode::Preferred);
        assert_eq!(
            params(&[("ssl-mode", "verify_identity")]).unwrap().mode(),
            SslMode::VerifyIdentity
        );
        assert_eq!(
            params(&[("ssl-mode", "REQUIRED")]).unwrap().mode(),
            SslMode::Required
        );
        // ssl-ca alone means VERIFY_CA, as the mysql client.
        assert_eq!(
            params(&[("ssl-ca", "/etc/ca.pem")]).unwrap().mode(),
            SslMode::VerifyCa
        );
        assert_eq!(
            params(&[("ssl-ca", "/tmp/my%20ca.pem")]).unwrap().ca,
            Some(PathBuf::from("/tmp/my ca.pem"))
        );
        let e = params(&[("ssl-mode", "sometimes")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sometimes") && e.contains("VERIFY_IDENTITY"),
            "{e}"
        );
        for driver in [
            "require_ssl",
            "verify_ca",
            "verify_identity",
            "built_in_roots",
        ] {
            let e = params(&[(driver, "true")]).unwrap_err().to_string();
            assert!(e.contains(driver) && e.contains("ssl-mode"), "{e}");
        }
        assert!(!TlsParams::default().take("prefer_socket", "false").unwrap());
    }

    #[test]
    fn disabled_and_inconsistent() {
        let plain = MysqlConfig::new(opts(), &params(&[("ssl-mode", "disabled")]).unwrap());
        assert!(!plain.unwrap().tries_tls());
        let e = MysqlConfig::new(
            opts(),
            &params(&[("ssl-mode", "DISABLED"), ("ssl-ca", "/x.pem")]).unwrap(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("ssl-ca") && e.contains("DISABLED"), "{e}");
        let e = MysqlConfig::new(opts(), &params(&[("ssl-cert", "/c.pem")]).unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ssl-key"), "{e}");
    }

    #[test]
    fn without_the_feature() {
        // PREFERRED connects without TLS; anything that must encrypt is refused by name.
        assert!(TlsParams::default().without_the_feature().is_none());
        for (pairs, named) in [
            (&[("ssl-mode", "REQUIRED")][..], "ssl-mode=REQUIRED"),
            (&[("ssl-mode", "VERIFY_CA")], "ssl-mode=VERIFY_CA"),
            (&[("ssl-ca", "/ca.pem")], "ssl-mode=VERIFY_CA"),
            (
                &[("ssl-mode", "PREFERRED"), ("ssl-cert", "/c.pem")],
                "ssl-cert",
            ),
        ] {
            let e = params(pairs).unwrap().without_the_feature().unwrap();
            assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
            let e = e.to_string();
            assert!(e.contains(named) && e.contains("`tls` feature"), "{e}");
        }
        #[cfg(not(feature = "tls"))]
        {
            let preferred = MysqlConfig::new(opts(), &TlsParams::default()).unwrap();
            assert!(!preferred.tries_tls());
            let e = MysqlConfig::new(opts(), &params(&[("ssl-mode", "REQUIRED")]).unwrap());
            assert!(matches!(e, Err(Error::Unsupported { .. })));
        }
    }

    #[cfg(feature = "tls")]
    #[test]
    fn with_the_feature() {
        let preferred = MysqlConfig::new(opts(), &TlsParams::default()).unwrap();
        assert!(preferred.tries_tls() && preferred.plain.is_some());
        let required = MysqlConfig::new(opts(), &params(&[("ssl-mode", "REQUIRED")]).unwrap());
        let required = required.unwrap();
        assert!(required.tries_tls() && required.plain.is_none());
        // Files are read at once, and named when they cannot be used.
        let e = MysqlConfig::new(opts(), &params(&[("ssl-ca", "/no/such/ca.pem")]).unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ssl-ca /no/such/ca.pem"), "{e}");
        let empty =
            std::env::temp_dir().join(format!("sqlnotify-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = MysqlConfig::new(
            opts(),
            &params(&[("ssl-ca", empty.to_str().unwrap())]).unwrap(),
        )
        .err()
        .unwrap()
        .to_string();
        let _ = std::fs::remove_file(&empty);
        assert!(
            e.contains("ssl-ca") && e.contains("no PEM certificate"),
            "{e}"
        );
    }
}
