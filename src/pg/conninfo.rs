//! libpq connection strings in both of libpq's forms, read the way libpq reads them:
//! URIs (`postgres://user:pw@host:port,host2/db?keyword=value&...`) and keyword/value strings
//! (`host=h port=5432 dbname=einvoice password='a b'`).
//!
//! Both forms become one ordered list of keyword/value pairs. In a URI every part is
//! percent-decoded and nothing else: `+` is a literal plus (libpq is not an HTML form), so
//! `options=-c%20statement_timeout%3D5000` reaches the server as `-c statement_timeout=5000`.
//! A keyword/value string takes values bare up to the next blank, or in single quotes; a
//! backslash escapes the next character in both.
//!
//! Invariant: no error built here contains a value (any of them may be a password), and
//! [`ConnString::shown`] replaces every password, from the userinfo or a `password` keyword,
//! with `***`.

use std::fmt::Write;

/// The password placeholder in everything shown to people.
pub(super) const MASK: &str = "***";

/// A connection string taken apart.
#[derive(Clone, Debug)]
pub(super) struct ConnString {
    /// The keyword/value pairs in the order given; a later pair overrides an earlier one.
    pub params: Vec<(String, String)>,
    /// How to show the string again, without its password.
    pub shown: Shown,
}

/// The connection string as written, with its password masked.
#[derive(Clone, Debug)]
pub(super) enum Shown {
    /// A URI: the part before the database name and the query after it (`?...` or empty).
    Uri { authority: String, query: String },
    /// A keyword/value string: its pairs, the password's value already masked.
    KeyValue(Vec<(String, String)>),
}

impl Shown {
    /// The string with `dbname` as its database.
    pub fn render(&self, dbname: &str) -> String {
        match self {
            Shown::Uri { authority, query } => format!("{authority}/{dbname}{query}"),
            Shown::KeyValue(pairs) => {
                let mut out = String::new();
                let mut named = false;
                for (k, v) in pairs {
                    let v = if k == "dbname" {
                        named = true;
                        dbname
                    } else {
                        v
                    };
                    push_pair(&mut out, k, v);
                }
                if !named && !dbname.is_empty() {
                    push_pair(&mut out, "dbname", dbname);
                }
                out
            }
        }
    }
}

/// Appends ` keyword=value`, quoting the value as libpq reads it back.
pub(super) fn push_pair(out: &mut String, keyword: &str, value: &str) {
    if !out.is_empty() {
        out.push(' ');
    }
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        let _ = write!(out, "{keyword}={value}");
    } else {
        let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
        let _ = write!(out, "{keyword}='{escaped}'");
    }
}

/// True when `text` is a connection string rather than a name: a URI or keyword/value pairs.
pub(super) fn is_connection_string(text: &str) -> bool {
    text.contains("://") || text.contains('=')
}

/// Parses either form; which one is decided as libpq does, by the URI prefix.
pub(super) fn parse(text: &str) -> Result<ConnString, String> {
    if text.contains("://") {
        parse_uri(text)
    } else if text.contains('=') {
        parse_key_value(text)
    } else {
        Err(format!("not a connection string; {FORMS}"))
    }
}

const FORMS: &str =
    "write postgres://USER:PASSWORD@HOST:PORT/DATABASE or host=HOST port=PORT user=USER dbname=DATABASE";

/// libpq's `conninfo_uri_parse_options`.
fn parse_uri(text: &str) -> Result<ConnString, String> {
    let (scheme, rest) = text
        .split_once("://")
        .ok_or_else(|| format!("not a URI; {FORMS}"))?;
    if !matches!(scheme, "postgres" | "postgresql") {
        return Err(format!(
            "scheme `{scheme}:` is not postgres:// or postgresql://; {FORMS}"
        ));
    }
    let mut params = Vec::new();
    let mut authority = format!("{scheme}://");
    // As in libpq, credentials end at the first `@` before any `/`.
    let mut p = rest;
    let userinfo_end = rest.find(['@', '/']);
    if let Some(at) = userinfo_end.filter(|&i| rest.as_bytes()[i] == b'@') {
        let userinfo = &rest[..at];
        let (user, password) = match userinfo.split_once(':') {
            Some((u, pw)) => (u, Some(pw)),
            None => (userinfo, None),
        };
        if !user.is_empty() {
            params.push(("user".to_string(), decode(user, "the user name")?));
        }
        authority.push_str(user);
        if let Some(pw) = password {
            params.push(("password".to_string(), decode(pw, "the password")?));
            authority.push(':');
            authority.push_str(MASK);
        }
        authority.push('@');
        p = &rest[at + 1..];
    }
    // Hosts and ports, comma-separated; `[...]` holds an IPv6 address.
    let netloc_end = p.find(['/', '?']).unwrap_or(p.len());
    let netloc = &p[..netloc_end];
    authority.push_str(netloc);
    let (mut hosts, mut ports) = (Vec::new(), Vec::new());
    let mut any_port = false;
    if !netloc.is_empty() {
        for item in netloc.split(',') {
            let (host, port) = if let Some(bracketed) = item.strip_prefix('[') {
                let (host, after) = bracketed.split_once(']').ok_or(
                    "an IPv6 host address has no closing `]`; write postgres://[::1]:5432/DATABASE",
                )?;
                if host.is_empty() {
                    return Err("an IPv6 host address between `[` and `]` is empty".into());
                }
                match after {
                    "" => (host, None),
                    _ => match after.strip_prefix(':') {
                        Some(port) => (host, Some(port)),
                        None => {
                            return Err(
                                "unexpected text after `]` in an IPv6 host address; write [ADDRESS]:PORT"
                                    .into(),
                            )
                        }
                    },
                }
            } else {
                match item.split_once(':') {
                    Some((h, port)) => (h, Some(port)),
                    None => (item, None),
                }
            };
            hosts.push(host);
            any_port |= port.is_some();
            ports.push(port.unwrap_or(""));
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            params.push(("host".to_string(), decode(&hosts.join(","), "the host")?));
        }
        if any_port {
            params.push(("port".to_string(), decode(&ports.join(","), "the port")?));
        }
    }
    let after = &p[netloc_end..];
    let (path, query) = match after.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (after, None),
    };
    if let Some(dbname) = path.strip_prefix('/') {
        if !dbname.is_empty() {
            params.push(("dbname".to_string(), decode(dbname, "the database name")?));
        }
    }
    let mut shown_query = String::new();
    for item in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (raw_key, raw_value) = item
            .split_once('=')
            .ok_or("a URI query parameter has no `=`; write ?keyword=value&keyword=value")?;
        let keyword = decode(raw_key, "a query parameter name")?;
        if raw_value.contains('=') {
            return Err(format!(
                "the URI query parameter `{keyword}` holds a second `=`; percent-encode it as %3D"
            ));
        }
        let value = decode(raw_value, &format!("the value of `{keyword}`"))?;
        shown_query.push(if shown_query.is_empty() { '?' } else { '&' });
        shown_query.push_str(raw_key);
        shown_query.push('=');
        shown_query.push_str(if keyword == "password" {
            MASK
        } else {
            raw_value
        });
        // libpq reads the JDBC spelling `ssl=true` as `sslmode=require`.
        if keyword == "ssl" && value == "true" {
            params.push(("sslmode".to_string(), "require".to_string()));
        } else {
            params.push((keyword, value));
        }
    }
    Ok(ConnString {
        params,
        shown: Shown::Uri {
            authority,
            query: shown_query,
        },
    })
}

/// libpq's percent-decoding: `%XX` only (a stray `%` or `%00` is an error), `+` stays `+`.
fn decode(raw: &str, what: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let mut i = 0;
    while let Some(off) = raw[i..].find('%') {
        let at = i + off;
        let hex = bytes.get(at + 1..at + 3);
        match hex {
            Some(h) if h.iter().all(u8::is_ascii_hexdigit) => {
                if h == b"00" {
                    return Err(format!("{what} holds %00, which libpq forbids"));
                }
            }
            _ => {
                return Err(format!(
                    "{what} holds a `%` that is not followed by two hex digits; write %25 for a literal %"
                ))
            }
        }
        i = at + 3;
    }
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("{what} is not UTF-8 once percent-decoded"))
}

/// libpq's `conninfo_parse`: `keyword = value` pairs separated by blanks; a value is bare (up
/// to the next blank) or single-quoted; a backslash escapes the next character.
fn parse_key_value(text: &str) -> Result<ConnString, String> {
    let mut params = Vec::new();
    let mut chars = text.chars().peekable();
    let mut word = 0;
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        word += 1;
        let mut keyword = String::new();
        while let Some(c) = chars.next_if(|&c| c != '=' && !c.is_whitespace()) {
            keyword.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // The word may be a mistyped value: it is not shown.
            return Err(format!(
                "word {word} of the connection string has no `=`; write keyword=value pairs separated by spaces"
            ));
        }
        if !is_keyword(&keyword) {
            return Err(format!(
                "word {word} of the connection string does not start with a keyword; write keyword=value pairs separated by spaces"
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(format!(
                            "the quoted value of `{keyword}` has no closing quote"
                        ))
                    }
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        params.push((keyword, value));
    }
    let shown = params
        .iter()
        .map(|(k, v)| {
            let v = if k == "password" { MASK } else { v.as_str() };
            (k.clone(), v.to_string())
        })
        .collect();
    Ok(ConnString {
        params,
        shown: Shown::KeyValue(shown),
    })
}

/// libpq keywords are lower-case words with underscores.
pub(super) fn is_keyword(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(text: &str) -> Vec<(String, String)> {
        parse(text).unwrap().params
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn uri_parts_are_percent_decoded_and_plus_is_literal() {
        assert_eq!(
            params("postgres://u%40x:p+w%2F@h1:5433,[::1]:5434/my%20db?options=-c%20statement_timeout%3D5000&application_name=my+app"),
            vec![
                pair("user", "u@x"),
                pair("password", "p+w/"),
                pair("host", "h1,::1"),
                pair("port", "5433,5434"),
                pair("dbname", "my db"),
                pair("options", "-c statement_timeout=5000"),
                pair("application_name", "my+app"),
            ]
        );
        assert_eq!(
            params("postgresql://%2Fvar%2Frun%2Fpostgresql/db"),
            vec![pair("host", "/var/run/postgresql"), pair("dbname", "db")]
        );
        assert_eq!(params("postgres://"), vec![]);
        assert_eq!(
            params("postgres://h?ssl=true"),
            vec![pair("host", "h"), pair("sslmode", "require")]
        );
    }

    #[test]
    fn uri_errors_name_no_value() {
        for (bad, says) in [
            ("postgres://h/db?password=a=b", "%3D"),
            ("postgres://h/db?password", "no `=`"),
            ("postgres://u:se%zzcret@h/db", "the password"),
            ("postgres://h/db?password=s%00cret", "%00"),
            ("postgres://[::1/db", "`]`"),
            ("mysql://u:secret@h/db", "scheme"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("secret") && !e.contains("a=b"), "{bad}: {e}");
        }
    }

    #[test]
    fn uri_is_shown_with_passwords_masked() {
        let c = parse("postgres://u:pw@h:5433/db?password=pw2&options=-c%20x%3D1").unwrap();
        assert_eq!(
            c.shown.render("db"),
            "postgres://u:***@h:5433/db?password=***&options=-c%20x%3D1"
        );
    }

    #[test]
    fn key_value_strings_as_libpq_reads_them() {
        assert_eq!(
            params(r"host=h  port = 5433 password='it\'s a \\secret' dbname=a\ b options='-c x=1'"),
            vec![
                pair("host", "h"),
                pair("port", "5433"),
                pair("password", r"it's a \secret"),
                pair("dbname", "a b"),
                pair("options", "-c x=1"),
            ]
        );
        let c = parse("host=h password=S3CRETpw dbname=einvoice").unwrap();
        assert_eq!(c.shown.render("other"), "host=h password=*** dbname=other");
        let c = parse("host=h password=S3CRETpw").unwrap();
        assert_eq!(c.shown.render("x y"), "host=h password=*** dbname='x y'");
    }

    #[test]
    fn key_value_errors_name_no_value() {
        for bad in [
            "host=h S3CRETpw",
            "host=h password='S3CRETpw",
            "host=h S3CRET=pw",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.contains("S3CRET"), "{bad}: {e}");
        }
        assert!(parse("maindc")
            .unwrap_err()
            .contains("not a connection string"));
    }
}
