//! Dialect selection: which [`Dialect`] a URL's scheme names, and the error for a scheme this
//! build does not support. Kept apart from the trait so that the trait's module, which every
//! dialect imports, imports no dialect.

use super::{Dialect, DialectOptions};
use crate::error::{Error, Result};

/// The dialect `url`'s scheme selects (case-insensitive), with `options`. Fails with
/// [`Error::UnsupportedDatabase`] for an unknown scheme or one whose feature is disabled.
#[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
pub(crate) fn open_dialect(url: &str, options: DialectOptions) -> Result<Box<dyn Dialect>> {
    // Only a scheme at the start is one: the text before a `://` elsewhere (a key=value
    // string's `password=a://b`) may be a secret, and the error would show it.
    let scheme = crate::redact::scheme(url)
        .or_else(|| url.strip_prefix("sqlite:").map(|_| "sqlite"))
        .unwrap_or("");
    match scheme.to_ascii_lowercase().as_str() {
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Box::new(crate::postgres::Postgres::new(url, options)?)),
        #[cfg(not(feature = "postgres"))]
        "postgres" | "postgresql" => Err(Error::UnsupportedDatabase {
            scheme: scheme.to_string(),
            reason: "this build of sqlnotify has the `postgres` feature disabled".into(),
        }),
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Box::new(crate::sqlite::Sqlite::new(url)?)),
        #[cfg(not(feature = "sqlite"))]
        "sqlite" => Err(Error::UnsupportedDatabase {
            scheme: scheme.to_string(),
            reason: "this build of sqlnotify has the `sqlite` feature disabled".into(),
        }),
        #[cfg(feature = "mysql")]
        "mysql" | "mariadb" => Ok(Box::new(crate::mysql::Mysql::new(url, options)?)),
        #[cfg(not(feature = "mysql"))]
        "mysql" | "mariadb" => Err(Error::UnsupportedDatabase {
            scheme: scheme.to_string(),
            reason: "this build of sqlnotify has the `mysql` feature disabled".into(),
        }),
        // Not echoing the URL: it may carry a password.
        "" => Err(Error::UnsupportedDatabase {
            scheme: String::new(),
            reason: "the URL has no scheme; use postgres://…, postgresql://…, sqlite://…, \
                     mysql://… or mariadb://…"
                .into(),
        }),
        _ => Err(Error::UnsupportedDatabase {
            scheme: scheme.to_string(),
            reason: "supported schemes are postgres://, postgresql://, sqlite://, mysql:// and \
                     mariadb://"
                .into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsupported_database_error_shows_no_secret_as_its_scheme() {
        let options = DialectOptions {
            sign_notifications: true,
            gap_timeout: None,
            mysql_transaction_ids: false,
        };
        // A key=value string with `://` in a value: the text before it is no scheme.
        for url in [
            "host=db password=s3cr3t://x",
            "user=app password=a=s3cr3t:// host=db",
        ] {
            let Err(e) = open_dialect(url, options) else {
                panic!("{url} opened a dialect");
            };
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
    }
}
