//! How sqlnotify connects to PostgreSQL: the connection string with libpq's TLS parameters
//! taken out of it ([`PgConfig`]), and the TLS connector every connection of the trigger tiers
//! uses (rustls, feature `tls`).
//!
//! tokio-postgres knows `sslmode` `disable`, `prefer` and `require` and rejects `verify-ca`,
//! `verify-full` and `sslrootcert`; libpq's meanings are kept here instead:
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | – |
//! | `allow`, `prefer` (the default) | when the server offers TLS | no |
//! | `require` | yes | no (as libpq without a root certificate) |
//! | `verify-ca` | yes | chain, against `sslrootcert` (else Mozilla's roots) |
//! | `verify-full` | yes | chain and host name |
//!
//! `sslcert` and `sslkey` (PEM files, both or neither; PKCS #8, PKCS #1 or SEC1 keys) present
//! a client certificate when the server asks for one (`cert` in pg_hba.conf, or
//! `clientcert=verify-*`); unlike libpq, nothing is read from `~/.postgresql/` unasked.
//! Encrypted keys (`sslpassword`) and revocation lists (`sslcrl`, `sslcrldir`) are a typed
//! error. Without the `tls` feature, `require`, `verify-ca`, `verify-full`, `sslrootcert`,
//! `sslcert` and `sslkey` are a typed error when the notifier is built, and `prefer` connects
//! without TLS.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, Connection, Socket};

use crate::error::{Error, Result};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::InvalidUrl {
                    reason: format!(
                        "sslmode {other:?} is not one of disable, allow, prefer, require, \
                         verify-ca, verify-full"
                    ),
                })
            }
        })
    }

    /// Its name in a connection string.
    #[cfg(not(feature = "tls"))]
    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether TLS is tried, and whether it is required.
    fn for_tokio_postgres(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
        }
    }
}

/// The TLS parameters of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsParams {
    /// `None`: not given (libpq's default, `prefer`).
    pub mode: Option<SslMode>,
    pub root_cert: Option<PathBuf>,
    /// `sslcert` and `sslkey`: a client certificate (PEM) and its key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// A connection string split into what tokio-postgres parses (its `sslmode` one of its three)
/// and the TLS parameters it does not know.
pub(crate) fn split(url: &str) -> Result<(String, TlsParams)> {
    let mut params = TlsParams {
        mode: None,
        root_cert: None,
        client_cert: None,
    };
    let (mut cert, mut key_file) = (None, None);
    let mut take = |key: &str, value: &str| -> Result<Option<String>> {
        match key {
            "sslmode" => {
                let mode = SslMode::parse(value)?;
                params.mode = Some(mode);
                Ok(Some(mode.for_tokio_postgres().to_string()))
            }
            "sslrootcert" => {
                params.root_cert = Some(PathBuf::from(value));
                Ok(None)
            }
            "sslcert" => {
                cert = Some(PathBuf::from(value));
                Ok(None)
            }
            "sslkey" => {
                key_file = Some(PathBuf::from(value));
                Ok(None)
            }
            "sslpassword" | "sslcrl" | "sslcrldir" => Err(Error::Unsupported {
                what: format!(
                    "the connection parameter {key}: sqlnotify does not read encrypted keys or \
                     check revocation lists; decrypt the key (`openssl pkey -in key.pem -out \
                     plain.pem`) and keep it readable by this process only"
                ),
            }),
            _ => Ok(Some(value.to_string())),
        }
    };
    let rest = if let Some(at) = url.find("://") {
        split_url(url, at, &mut take)?
    } else {
        split_pairs(url, &mut take)?
    };
    params.client_cert = match (cert, key_file) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => {
            return Err(Error::InvalidUrl {
                reason: "sslcert and sslkey go together: give both or neither".into(),
            })
        }
    };
    Ok((rest, params))
}

/// `scheme://authority/db?k=v&…`: the query's parameters through `take`.
fn split_url(
    url: &str,
    scheme_end: usize,
    take: &mut impl FnMut(&str, &str) -> Result<Option<String>>,
) -> Result<String> {
    let Some(q) = url[scheme_end..].find('?').map(|q| scheme_end + q) else {
        return Ok(url.to_string());
    };
    let mut kept = Vec::new();
    for pair in url[q + 1..].split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| Error::InvalidUrl {
                    reason: format!("URL parameter {key:?} is not UTF-8 once decoded"),
                })
        };
        let name = decoded(key)?;
        if !name.starts_with("ssl") {
            kept.push(pair.to_string());
            continue;
        }
        if let Some(value) = take(&name, &decoded(value)?)? {
            let encoded =
                percent_encoding::utf8_percent_encode(&value, percent_encoding::NON_ALPHANUMERIC);
            kept.push(format!("{key}={encoded}"));
        }
    }
    let base = &url[..q];
    Ok(if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    })
}

/// `key=value key='quoted value' …`: every pair through `take`, the kept ones written back
/// quoted.
fn split_pairs(
    text: &str,
    take: &mut impl FnMut(&str, &str) -> Result<Option<String>>,
) -> Result<String> {
    let bad = |what: &str| Error::InvalidUrl {
        reason: format!("connection string: {what}"),
    };
    let mut chars = text.chars().peekable();
    let mut kept = Vec::new();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(bad(&format!("{key:?} has no value")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.push(chars.next().ok_or_else(|| bad("ends in \\"))?),
                    Some(c) => value.push(c),
                    None => return Err(bad(&format!("the value of {key:?} has no closing quote"))),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next().ok_or_else(|| bad("ends in \\"))?);
                } else {
                    value.push(c);
                }
            }
        }
        if let Some(value) = take(&key, &value)? {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{key}='{quoted}'"));
        }
    }
    Ok(kept.join(" "))
}

/// The connector of every connection the trigger tiers open.
#[cfg(not(feature = "tls"))]
pub(crate) type Connector = tokio_postgres::NoTls;

/// rustls' connector, for a connection that may have no server name: on a unix socket
/// tokio-postgres gives none (rustls would refuse that before connecting, and the server speaks
/// no TLS there). Only `verify-full` (`.1`) needs the name, and then none is an error.
#[cfg(feature = "tls")]
#[derive(Clone)]
pub(crate) struct Connector(tokio_postgres_rustls::MakeRustlsConnect, bool);

#[cfg(feature = "tls")]
impl MakeTlsConnect<Socket> for Connector {
    type Stream = <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect =
        <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;
    type Error = <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::Error;

    fn make_tls_connect(
        &mut self,
        host: &str,
    ) -> std::result::Result<Self::TlsConnect, Self::Error> {
        let name = if host.is_empty() && !self.1 {
            "localhost" // checked against nothing (see `Libpq`)
        } else {
            host
        };
        MakeTlsConnect::<Socket>::make_tls_connect(&mut self.0, name)
    }
}

/// The stream of a connection (TLS or not).
pub(crate) type PgStream = <Connector as MakeTlsConnect<Socket>>::Stream;

/// A PostgreSQL connection's settings: tokio-postgres' [`Config`] (what it dereferences to),
/// the TLS settings it does not hold, and the connector built from them once (cloning it
/// shares its rustls configuration).
#[derive(Clone)]
pub(crate) struct PgConfig {
    config: Config,
    tls: TlsParams,
    connector: Connector,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("config", &self.config)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Deref for PgConfig {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

impl DerefMut for PgConfig {
    fn deref_mut(&mut self) -> &mut Config {
        &mut self.config
    }
}

impl PgConfig {
    /// Parses a connection string (URL or `key=value` pairs), reading `sslrootcert` if given.
    pub fn parse(url: &str) -> Result<PgConfig> {
        let (rest, tls) = split(url)?;
        let mut config: Config =
            rest.parse()
                .map_err(|e: tokio_postgres::Error| Error::InvalidUrl {
                    reason: crate::error::chain(&e),
                })?;
        // As libpq: sslmode means nothing on a unix socket, where the server speaks no TLS.
        #[cfg(unix)]
        if !config.get_hosts().is_empty()
            && (config.get_hosts().iter())
                .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)))
        {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        #[cfg(not(feature = "tls"))]
        if let Some(what) = (tls.mode)
            .filter(|_| tls.required())
            .map(|m| format!("sslmode={}", m.name()))
            .or(tls.root_cert.as_ref().map(|_| "sslrootcert".to_string()))
            .or(tls.client_cert.as_ref().map(|_| "sslcert".to_string()))
        {
            return Err(Error::Unsupported {
                what: format!("TLS connections ({what} in the URL) need sqlnotify's `tls` feature"),
            });
        }
        #[cfg(feature = "tls")]
        let connector = Connector(
            tokio_postgres_rustls::MakeRustlsConnect::new(rustls_config(&tls)?),
            tls.mode == Some(SslMode::VerifyFull),
        );
        #[cfg(not(feature = "tls"))]
        let connector = tokio_postgres::NoTls;
        Ok(PgConfig {
            config,
            tls,
            connector,
        })
    }

    /// The TLS parameters the connection string gave.
    #[cfg_attr(not(all(feature = "logical", feature = "tls")), allow(dead_code))]
    pub fn tls(&self) -> &TlsParams {
        &self.tls
    }

    /// Opens a connection for `purpose` (named in its error), all of it (socket, TLS,
    /// start-up, authentication) within [`connect_within`](Self::connect_within).
    #[cfg_attr(not(feature = "tls"), allow(clippy::clone_on_copy))] // NoTls is Copy
    pub async fn connect(&self, purpose: &str) -> Result<(Client, Connection<Socket, PgStream>)> {
        let context = || format!("connecting to PostgreSQL ({purpose})");
        let within = self.connect_within();
        match tokio::time::timeout(within, self.config.connect(self.connector.clone())).await {
            Ok(connected) => connected.map_err(|e| Error::db(context(), e)),
            Err(_) => Err(Error::Database {
                context: context(),
                source: format!("no answer within {within:?}").into(),
            }),
        }
    }

    /// How long opening a connection may take: twice the connection string's
    /// `connect_timeout` for each host it names, else [`CONNECT_WITHIN`]. tokio-postgres
    /// bounds only each address's socket connect with it (libpq each address's whole
    /// attempt); twice per host lets a name that resolves to one address dropping the SYN and
    /// one answering connect. A server that takes the socket and never answers (a network
    /// path gone silent, a hung server) would otherwise hold a listener's reconnect, or an
    /// overflow read, for ever.
    pub fn connect_within(&self) -> Duration {
        connect_within(
            self.config.get_connect_timeout().copied(),
            (self.config.get_hosts().len()).max(self.config.get_hostaddrs().len()),
        )
    }
}

/// How long opening a connection may take when the connection string sets no
/// `connect_timeout`.
pub(crate) const CONNECT_WITHIN: Duration = Duration::from_secs(30);

fn connect_within(per_host: Option<Duration>, hosts: usize) -> Duration {
    match per_host {
        Some(limit) => limit
            .saturating_mul(2)
            .saturating_mul(u32::try_from(hosts.max(1)).unwrap_or(u32::MAX)),
        None => CONNECT_WITHIN,
    }
}

impl TlsParams {
    /// The logical tier's replication connection's TLS settings (`pgwire-replication`, whose
    /// modes are libpq's too); none on a unix socket. Its rustls needs a process-wide crypto
    /// provider: ring's is installed unless the application installed one.
    #[cfg(all(feature = "tls", feature = "logical"))]
    pub fn replication(&self, unix_socket: bool) -> pgwire_replication::TlsConfig {
        use pgwire_replication::TlsConfig;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let root = self.root_cert.clone();
        let config = match self.mode.unwrap_or(SslMode::Prefer) {
            _ if unix_socket => TlsConfig::disabled(),
            SslMode::Disable => TlsConfig::disabled(),
            SslMode::Prefer => TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::default()
            },
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => TlsConfig::verify_ca(root),
            SslMode::VerifyFull => TlsConfig::verify_full(root),
        };
        match &self.client_cert {
            Some((cert, key)) if config.mode != pgwire_replication::SslMode::Disable => {
                config.with_client_cert(cert.clone(), key.clone())
            }
            _ => config,
        }
    }

    /// Whether every connection must be encrypted.
    #[cfg_attr(feature = "tls", allow(dead_code))]
    pub fn required(&self) -> bool {
        matches!(
            self.mode,
            Some(SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull)
        )
    }
}

#[cfg(feature = "tls")]
fn rustls_config(tls: &TlsParams) -> Result<rustls::ClientConfig> {
    use std::sync::Arc;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Unsupported {
            what: format!("TLS: {e}"),
        })?;
    let mode = tls.mode.unwrap_or(SslMode::Prefer);
    let chain = match mode {
        // libpq's prefer and require: encrypted, the server's certificate not checked.
        SslMode::Disable | SslMode::Prefer | SslMode::Require => None,
        SslMode::VerifyCa | SslMode::VerifyFull => {
            Some(webpki_verifier(tls.root_cert.as_deref(), provider.clone())?)
        }
    };
    let builder = match (mode, chain) {
        (SslMode::VerifyFull, Some(verifier)) => builder.with_webpki_verifier(verifier),
        (_, chain) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Libpq { provider, chain })),
    };
    match &tls.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_file, key_file)) => {
            let (chain, key) = client_identity(cert_file, key_file)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::InvalidUrl {
                    reason: format!("sslkey {}: {e}", key_file.display()),
                })
        }
    }
}

/// The certificate chain in `cert` and the private key in `key` (PEM files).
#[cfg(feature = "tls")]
fn client_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let bad = |param: &str, path: &std::path::Path, e: &dyn std::fmt::Display| Error::InvalidUrl {
        reason: format!("{param} {}: {e}", path.display()),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("sslcert", cert, &e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad("sslcert", cert, &e))?;
    if chain.is_empty() {
        return Err(bad("sslcert", cert, &"no certificate in it"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("sslkey", key, &e))?;
    Ok((chain, key_der))
}

/// rustls' own check (chain and host name) against `root_cert`'s certificates, or Mozilla's
/// roots without one.
#[cfg(feature = "tls")]
fn webpki_verifier(
    root_cert: Option<&std::path::Path>,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
) -> Result<std::sync::Arc<rustls::client::WebPkiServerVerifier>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| Error::InvalidUrl {
                reason: format!("sslrootcert {}: {e}", path.display()),
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(&e))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad(&e))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(bad(&"no certificate in it"));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider,
    )
    .build()
    .map_err(|e| Error::InvalidUrl {
        reason: format!("TLS roots: {e}"),
    })
}

/// The certificate checks libpq has that rustls does not: none (`prefer`, `require`: `chain`
/// is `None`) and the chain without the host name (`verify-ca`). The handshake's signatures
/// are verified either way.
#[cfg(feature = "tls")]
#[derive(Debug)]
struct Libpq {
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
    chain: Option<std::sync::Arc<rustls::client::WebPkiServerVerifier>>,
}

#[cfg(feature = "tls")]
impl rustls::client::danger::ServerCertVerifier for Libpq {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::client::danger::ServerCertVerified;
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use tokio_postgres::config::SslMode as PgSslMode;

    use super::*;

    fn params(mode: Option<SslMode>, root: Option<&str>) -> TlsParams {
        TlsParams {
            mode,
            root_cert: root.map(PathBuf::from),
            client_cert: None,
        }
    }

    #[test]
    fn a_connect_is_bounded_by_twice_the_url_s_timeout_per_host_else_thirty_seconds() {
        assert_eq!(connect_within(None, 1), CONNECT_WITHIN);
        assert_eq!(connect_within(None, 3), CONNECT_WITHIN);
        let two = Duration::from_secs(2);
        assert_eq!(connect_within(Some(two), 1), Duration::from_secs(4));
        assert_eq!(connect_within(Some(two), 0), Duration::from_secs(4));
        assert_eq!(connect_within(Some(two), 3), Duration::from_secs(12));
        let parsed = PgConfig::parse("host=a,b,c user=u connect_timeout=4").unwrap();
        assert_eq!(parsed.connect_within(), Duration::from_secs(24));
        // libpq's 0 (and a negative value): wait for ever, which we do not; the default.
        let parsed = PgConfig::parse("host=a user=u connect_timeout=0").unwrap();
        assert_eq!(parsed.connect_within(), CONNECT_WITHIN);
    }

    #[test]
    fn libpq_tls_parameters_leave_the_url() {
        let (rest, tls) = split(
            "postgres://u:p@h:5/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p@h:5/db?application_name=x&sslmode=require"
        );
        assert_eq!(tls, params(Some(SslMode::VerifyFull), Some("/etc/ca.pem")));
        let (rest, tls) = split("postgresql://h/db?sslmode=prefer").unwrap();
        assert_eq!(
            (rest.as_str(), tls),
            (
                "postgresql://h/db?sslmode=prefer",
                params(Some(SslMode::Prefer), None)
            )
        );
        let (rest, tls) = split("postgres://h/db?sslrootcert=ca.pem").unwrap();
        assert_eq!(
            (rest.as_str(), tls),
            ("postgres://h/db", params(None, Some("ca.pem")))
        );
        assert_eq!(split("postgres://h/db").unwrap().0, "postgres://h/db");
        // A password holding "?" and "=" is left alone (it is before the query).
        assert_eq!(
            split("postgres://u:a%3Fb@h/db?sslmode=disable").unwrap().0,
            "postgres://u:a%3Fb@h/db?sslmode=disable"
        );
    }

    #[test]
    fn libpq_tls_parameters_leave_key_value_strings() {
        let (rest, tls) =
            split("host=h  user = 'o\\'neil' sslmode=verify-ca sslrootcert='/a b/ca.pem' dbname=d")
                .unwrap();
        assert_eq!(
            rest,
            "host='h' user='o\\'neil' sslmode='require' dbname='d'"
        );
        assert_eq!(tls, params(Some(SslMode::VerifyCa), Some("/a b/ca.pem")));
        let config: Config = rest.parse().unwrap();
        assert_eq!(config.get_user(), Some("o'neil"));
        assert_eq!(config.get_ssl_mode(), PgSslMode::Require);
    }

    #[test]
    fn bad_tls_parameters_are_typed_errors() {
        for url in [
            "postgres://h/db?sslmode=verify",
            "host=h sslmode=sometimes",
            "host=h user='open",
            "host=h user",
        ] {
            assert!(matches!(split(url), Err(Error::InvalidUrl { .. })), "{url}");
        }
        let e = split("postgres://h/db?sslpassword=secret").unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported { what } if what.contains("sslpassword")
                && !what.contains("secret")),
            "{e}"
        );
        for url in ["postgres://h/db?sslcert=c.pem", "host=h sslkey=k.pem"] {
            let e = split(url).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidUrl { reason } if reason.contains("both or neither")),
                "{url}: {e}"
            );
        }
        let (rest, tls) = split("postgres://h/db?sslcert=%2Fc.pem&sslkey=%2Fk.pem").unwrap();
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(
            tls.client_cert,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        let e = PgConfig::parse("postgres://h/db?sslcert=/nonexistent/c.pem&sslkey=/k.pem");
        if cfg!(feature = "tls") {
            assert!(
                matches!(&e, Err(Error::InvalidUrl { reason }) if reason.contains("sslcert /nonexistent/c.pem")),
                "{e:?}"
            );
        } else {
            assert!(
                matches!(&e, Err(Error::Unsupported { what }) if what.contains("sslcert")),
                "{e:?}"
            );
        }
        let e =
            PgConfig::parse("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
        if cfg!(feature = "tls") {
            assert!(
                matches!(&e, Err(Error::InvalidUrl { reason }) if reason.contains("/nonexistent/ca.pem")),
                "{e:?}"
            );
        } else {
            assert!(
                matches!(&e, Err(Error::Unsupported { what }) if what.contains("`tls`")),
                "{e:?}"
            );
        }
    }

    #[test]
    fn sslmode_means_nothing_on_a_unix_socket_as_in_libpq() {
        let c = PgConfig::parse("postgresql:///db?host=/run/postgresql&sslmode=prefer").unwrap();
        assert_eq!(c.get_ssl_mode(), PgSslMode::Disable);
        let c = PgConfig::parse("host=/run/postgresql,db.internal dbname=db").unwrap();
        assert_eq!(c.get_hosts().len(), 2);
        assert_eq!(c.get_ssl_mode(), PgSslMode::Prefer, "a TCP host among them");
    }

    #[test]
    fn the_mode_tokio_postgres_gets() {
        for (mode, pg) in [
            ("disable", PgSslMode::Disable),
            ("allow", PgSslMode::Prefer),
            ("prefer", PgSslMode::Prefer),
        ] {
            let c = PgConfig::parse(&format!("postgres://h/db?sslmode={mode}")).unwrap();
            assert_eq!(c.get_ssl_mode(), pg, "{mode}");
            assert!(!c.tls().required());
        }
        for mode in ["require", "verify-ca", "verify-full"] {
            let c = PgConfig::parse(&format!("postgres://h/db?sslmode={mode}"));
            if cfg!(feature = "tls") {
                let c = c.unwrap();
                assert_eq!(c.get_ssl_mode(), PgSslMode::Require, "{mode}");
                assert!(c.tls().required());
            } else {
                assert!(matches!(c, Err(Error::Unsupported { .. })), "{mode}");
            }
        }
    }
}
