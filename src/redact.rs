//! Connection strings with their secrets hidden, for `Debug` output, logs and error messages.
//!
//! A connection string may carry a password in several places: the URL's userinfo
//! (`postgres://user:secret@host/db`, `mysql://…` alike), a query parameter
//! (`?password=secret`, `&sslpassword=…`), or a libpq key=value string
//! (`host=db password='se cret'`). [`redact`] replaces each such value with `***` and leaves the
//! rest as it was, so the output still says which database is meant. When in doubt it hides
//! more rather than less.

/// Shown instead of a secret.
const HIDDEN: &str = "***";

/// `url` with every password-like value replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let hide = match scheme(url) {
        Some(scheme) => url_secrets(url, scheme.len() + 3, names_a_user(scheme)),
        None => key_value_secrets(url),
    };
    replace(url, hide)
}

/// The scheme of `url` if it starts with one followed by `://` (a scheme being letters,
/// digits, `+`, `-` and `.`): only then is it a URL. A `://` anywhere else — in a libpq
/// key=value string's value, `host=db password=a://b` — makes no scheme, so the text before
/// it (a secret, maybe) is neither parsed as a URL's nor shown as a scheme.
pub(crate) fn scheme(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once("://")?;
    let valid = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    valid.then_some(scheme)
}

/// Whether a parameter named `key` holds a secret (`password`, `sslpassword`, `pass`, `pwd`,
/// `*secret*`, `*token*`, any case).
fn is_secret(key: &str) -> bool {
    let key = percent_decode(key).to_ascii_lowercase();
    ["pass", "pwd", "secret", "token"]
        .iter()
        .any(|word| key.contains(word))
}

/// Whether userinfo without a ':' names a user in a URL of `scheme` (a database's): shown,
/// as it helps to read an authentication error. Elsewhere it may be a secret of its own.
fn names_a_user(scheme: &str) -> bool {
    ["postgres", "postgresql", "mysql", "mariadb", "sqlite"]
        .iter()
        .any(|known| scheme.eq_ignore_ascii_case(known))
}

/// Byte ranges of the secrets in a URL whose authority starts at `start`; `user_alone`:
/// userinfo without a ':' is a user name, not a secret.
fn url_secrets(url: &str, start: usize, user_alone: bool) -> Vec<(usize, usize)> {
    let rest = &url[start..];
    let mut hide = Vec::new();
    // Userinfo. Drivers disagree on where it ends (tokio-postgres: the first '@'; the `url`
    // crate: the last '@' of the authority), so hide from its first ':' up to the last '@'
    // before the authority ends after the first '@' — a password containing '@', '/' or '?'
    // is hidden either way. Userinfo without a ':' may be a secret of its own outside a
    // database's URL (NATS's token form, `nats://s3cr3t@host`): hidden whole, when its '@' is
    // in the authority.
    if let Some(first_at) = rest.find('@') {
        let end = rest[first_at..]
            .find(['/', '?', '#'])
            .map_or(rest.len(), |i| first_at + i);
        let last_at = rest[..end].rfind('@').unwrap_or(first_at);
        if let Some(colon) = rest[..last_at].find(':') {
            hide.push((start + colon + 1, start + last_at));
        } else if !user_alone && !rest[..first_at].contains(['/', '?', '#']) {
            hide.push((start, start + last_at));
        }
    }
    // Query parameters: `name=value` pairs separated by '&', up to a '#'.
    if let Some(question) = rest.find('?') {
        let query_start = start + question + 1;
        let query_end = url[query_start..]
            .find('#')
            .map_or(url.len(), |i| query_start + i);
        let mut at = query_start;
        for pair in url[query_start..query_end].split('&') {
            if let Some((key, _)) = pair.split_once('=') {
                if is_secret(key) {
                    hide.push((at + key.len() + 1, at + pair.len()));
                }
            }
            at += pair.len() + 1;
        }
    }
    hide
}

/// Byte ranges of the secret values in a libpq `key=value` string: `key = value` pairs
/// separated by whitespace, values bare or in single quotes, with backslash escapes.
fn key_value_secrets(s: &str) -> Vec<(usize, usize)> {
    let bytes = s.as_bytes();
    let skip_ws = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut hide = Vec::new();
    let mut i = skip_ws(0);
    while i < bytes.len() {
        let key_start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[key_start..i];
        i = skip_ws(i);
        if i >= bytes.len() || bytes[i] != b'=' {
            // Not a key=value pair (e.g. "sqlite:app.db"): go on with the next word.
            i = skip_ws(i);
            continue;
        }
        i = skip_ws(i + 1);
        let value_start = i;
        let quoted = i < bytes.len() && bytes[i] == b'\'';
        if quoted {
            i += 1;
        }
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'\'' if quoted => {
                    i += 1;
                    break;
                }
                c if !quoted && c.is_ascii_whitespace() => break,
                _ => i += 1,
            }
        }
        i = i.min(bytes.len());
        if is_secret(key) {
            hide.push((value_start, i));
        }
        i = skip_ws(i);
    }
    hide
}

/// `s` with each range (merged where they overlap) replaced by [`HIDDEN`].
fn replace(s: &str, mut hide: Vec<(usize, usize)>) -> String {
    hide.retain(|(from, to)| from < to);
    hide.sort_unstable();
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    for (from, to) in hide {
        if to <= at {
            continue;
        }
        out.push_str(&s[at..from.max(at)]);
        if from >= at {
            out.push_str(HIDDEN);
        }
        at = to;
    }
    out.push_str(&s[at..]);
    out
}

/// `%XX` escapes decoded (invalid ones kept as they are), lossily as UTF-8.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn userinfo_passwords_are_hidden() {
        for (url, shown) in [
            (
                "postgres://app:s3cr3t@db.example:5432/app",
                "postgres://app:***@db.example:5432/app",
            ),
            (
                "postgresql://app:s3cr3t@db/app?sslmode=disable",
                "postgresql://app:***@db/app?sslmode=disable",
            ),
            (
                "mysql://root:s3cr3t@127.0.0.1:3306/shop",
                "mysql://root:***@127.0.0.1:3306/shop",
            ),
            (
                "mariadb://root:s3cr3t@127.0.0.1/shop",
                "mariadb://root:***@127.0.0.1/shop",
            ),
            // A password with ':', '@', '/' or '?' in it (raw or encoded) is hidden whole.
            ("postgres://u:a:b@h/d", "postgres://u:***@h/d"),
            ("postgres://u:p@ss@h/d", "postgres://u:***@h/d"),
            ("postgres://u:p/ss@h/d", "postgres://u:***@h/d"),
            ("postgres://u:p?w=1@h/d", "postgres://u:***@h/d"),
            ("postgres://u:p%40ss@h/d", "postgres://u:***@h/d"),
            // No password: nothing to hide.
            ("postgres://app@db/app", "postgres://app@db/app"),
            ("mysql://root@127.0.0.1/app", "mysql://root@127.0.0.1/app"),
            ("postgres://db:5432/app", "postgres://db:5432/app"),
            ("sqlite:///tmp/app.db", "sqlite:///tmp/app.db"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[test]
    fn userinfo_without_a_colon_is_hidden_whole() {
        for (url, shown) in [
            // NATS's token form, as the relay prints its URL.
            ("nats://s3cr3t@host:4222", "nats://***@host:4222"),
            ("tls://s3cr3t@host:4222", "tls://***@host:4222"),
            ("nats://s3@cr3t@host:4222", "nats://***@host:4222"),
            ("nats://s3cr3t@[::1]:4222", "nats://***@[::1]:4222"),
            // An '@' after the authority is no userinfo.
            ("nats://host/x?a=b@c", "nats://host/x?a=b@c"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[test]
    fn a_key_value_string_with_a_url_in_a_value_is_no_url() {
        for (conninfo, shown) in [
            ("host=db password=a://b", "host=db password=***"),
            (
                "host=db password=s3://cr3t@x user=app",
                "host=db password=*** user=app",
            ),
            ("password='x://y' host=db", "password=*** host=db"),
            ("host=db sslpassword=u:p@h://x", "host=db sslpassword=***"),
        ] {
            assert_eq!(redact(conninfo), shown, "{conninfo}");
        }
        assert_eq!(super::scheme("host=db password=a://b"), None);
        assert_eq!(super::scheme(" postgres://h/d"), None);
        assert_eq!(super::scheme("://h/d"), None);
        assert_eq!(super::scheme("git+ssh.v-2://h"), Some("git+ssh.v-2"));
    }

    #[test]
    fn password_parameters_are_hidden() {
        for (url, shown) in [
            (
                "postgres://app@db/app?password=s3cr3t",
                "postgres://app@db/app?password=***",
            ),
            (
                "postgresql:///app?host=/run/postgresql&password=s3cr3t&sslmode=disable",
                "postgresql:///app?host=/run/postgresql&password=***&sslmode=disable",
            ),
            (
                "postgres://db/app?sslmode=require&sslpassword=s3cr3t",
                "postgres://db/app?sslmode=require&sslpassword=***",
            ),
            (
                "postgres://db/app?PASSWORD=s3cr3t#frag",
                "postgres://db/app?PASSWORD=***#frag",
            ),
            // An encoded key and a value with '@' in it.
            (
                "postgres://db/app?pass%77ord=s3@cr3t",
                "postgres://db/app?pass%77ord=***",
            ),
            (
                "mysql://root@127.0.0.1/shop?pass=s3cr3t&prefer_socket=false",
                "mysql://root@127.0.0.1/shop?pass=***&prefer_socket=false",
            ),
            (
                "postgres://u:s3cr3t@db/app?password=s3cr3t",
                "postgres://u:***@db/app?password=***",
            ),
            // Other parameters stay readable.
            (
                "postgres://db/app?application_name=a@b&options=-c%20x%3Dy",
                "postgres://db/app?application_name=a@b&options=-c%20x%3Dy",
            ),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[test]
    fn key_value_strings_hide_their_password() {
        for (conninfo, shown) in [
            (
                "host=db user=app password=s3cr3t dbname=app",
                "host=db user=app password=*** dbname=app",
            ),
            (
                "host=db password = 's3 cr\\'3t' dbname=app",
                "host=db password = *** dbname=app",
            ),
            ("password=s3cr3t", "password=***"),
            ("host=db sslpassword=s3cr3t", "host=db sslpassword=***"),
            ("host=db password=", "host=db password="),
            ("sqlite:app.db", "sqlite:app.db"),
        ] {
            assert_eq!(redact(conninfo), shown, "{conninfo}");
        }
    }

    #[test]
    fn the_builder_s_debug_shows_no_password() {
        for url in [
            "postgres://app:s3cr3t@db/app",
            "postgres://app@db/app?sslmode=disable&password=s3cr3t",
            "host=db user=app password=s3cr3t",
            "mysql://root:s3cr3t@127.0.0.1:3306/shop",
            "mariadb://root@127.0.0.1:3306/shop?pass=s3cr3t",
        ] {
            let shown = format!("{:?}", crate::Notifier::builder(url));
            assert!(shown.contains("***"), "{shown}");
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn sqlite_url_errors_show_no_password() {
        let e = crate::sqlite::parse_url("sqlite:///tmp/app.db?password=s3cr3t").unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("password=***"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn no_secret_survives_any_of_the_forms() {
        let forms = [
            "postgres://u:SECRET@h/d",
            "postgres://h/d?password=SECRET",
            "postgres://u:SECRET@h/d?sslpassword=SECRET",
            "mysql://u:SECRET@h:3306/d",
            "host=h password=SECRET",
            "host=h password='SECRET with spaces'",
            "postgres://u:SEC@RET@h/d",
            "postgres://u:SEC/RET@h/d",
            "nats://SECRET@h:4222",
            "host=h password=SEC://RET",
        ];
        for form in forms {
            let shown = redact(form);
            assert!(
                !shown.contains("SEC") && !shown.contains("RET"),
                "{form} -> {shown}"
            );
        }
    }
}
