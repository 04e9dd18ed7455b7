//! Table patterns as operators write them in the configuration and in `--tables`: a table
//! (`schema.table`, or `table` in `public`) or every table of a schema (`schema.*`).
//!
//! Each part is either PostgreSQL's quoted form (`"Sales Data"."Order"`, a doubled `""` standing
//! for one quote), which may hold any character including `.` and `*`, or the raw form, taken
//! literally up to the first `.`: `public.Invoice` names the table `Invoice` (no case folding,
//! as invsync has always read it). Only an unquoted `*` means "every table".
//!
//! This is the one parser of table patterns; everything that accepts them calls [`TablePattern::parse`].

use std::fmt;

/// A table name or a whole schema (`schema.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePattern {
    pub schema: String,
    /// `None` stands for every table of the schema.
    pub table: Option<String>,
}

impl TablePattern {
    /// True when `table` is the named table or lies in the named schema (`schema.*`).
    pub fn matches(&self, table: &super::TableName) -> bool {
        self.schema == table.schema && self.table.as_deref().is_none_or(|t| t == table.name)
    }

    /// Parses `schema.table`, `schema.*` or `table`; each part raw or `"quoted"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("`{s}` is not a table name ({why}); write schema.table, schema.* or \"Quoted Schema\".\"Quoted.Table\"")
        };
        let (first, rest) = part(s).map_err(&bad)?;
        let (schema, table) = match rest {
            None => (Part::Name("public".to_string()), first),
            Some(rest) => {
                let (second, more) = part(rest).map_err(&bad)?;
                if more.is_some() {
                    return Err(bad("more than two parts; quote a name that holds a `.`"));
                }
                (first, second)
            }
        };
        let schema = match schema {
            Part::Name(n) => n,
            Part::Star => return Err(bad("`*` stands for tables, not schemas")),
        };
        Ok(TablePattern {
            schema,
            table: match table {
                Part::Name(n) => Some(n),
                Part::Star => None,
            },
        })
    }
}

enum Part {
    Name(String),
    /// An unquoted `*`.
    Star,
}

/// One part, and what follows its separating `.` (None at the end).
fn part(s: &str) -> Result<(Part, Option<&str>), &'static str> {
    let (part, after) = if let Some(quoted) = s.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("a quoted name has no closing `\"`"),
                Some((i, '"')) => {
                    if quoted[i + 1..].starts_with('"') {
                        name.push('"');
                        chars.next();
                    } else {
                        break i + 1;
                    }
                }
                Some((_, c)) => name.push(c),
            }
        };
        if name.is_empty() {
            return Err("a quoted name is empty");
        }
        let after = &quoted[end..];
        if !after.is_empty() && !after.starts_with('.') {
            return Err("text follows a closing `\"`");
        }
        (Part::Name(name), after)
    } else {
        let end = s.find('.').unwrap_or(s.len());
        let raw = &s[..end];
        if raw.is_empty() {
            return Err("a name is empty");
        }
        let part = if raw == "*" {
            Part::Star
        } else {
            Part::Name(raw.to_string())
        };
        (part, &s[end..])
    };
    Ok((part, after.strip_prefix('.')))
}

/// A part as it parses back: raw when that is unambiguous, else quoted.
fn shown(name: &str) -> String {
    if name.contains('.') || name.starts_with('"') || name == "*" {
        super::quote_ident(name)
    } else {
        name.to_string()
    }
}

/// `schema.table` or `schema.*`, quoting only a part that would not parse back raw.
impl fmt::Display for TablePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.table {
            Some(t) => write!(f, "{}.{}", shown(&self.schema), shown(t)),
            None => write!(f, "{}.*", shown(&self.schema)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(schema: &str, name: &str) -> TablePattern {
        TablePattern {
            schema: schema.into(),
            table: Some(name.into()),
        }
    }

    #[test]
    fn raw_and_quoted_forms() {
        assert_eq!(
            TablePattern::parse("invoice").unwrap(),
            table("public", "invoice")
        );
        assert_eq!(
            TablePattern::parse("public.Invoice").unwrap(),
            table("public", "Invoice")
        );
        assert_eq!(
            TablePattern::parse("Sales Data.Order").unwrap(),
            table("Sales Data", "Order")
        );
        assert_eq!(
            TablePattern::parse(r#""Sales Data"."Order""#).unwrap(),
            table("Sales Data", "Order")
        );
        assert_eq!(
            TablePattern::parse(r#""a.b"."say ""hi"".v2""#).unwrap(),
            table("a.b", r#"say "hi".v2"#)
        );
        assert_eq!(
            TablePattern::parse(r#""x.y""#).unwrap(),
            table("public", "x.y")
        );
        assert_eq!(TablePattern::parse(r#"s."*""#).unwrap(), table("s", "*"));
        let all = TablePattern::parse(r#""My Schema".*"#).unwrap();
        assert_eq!((all.schema.as_str(), all.table), ("My Schema", None));
    }

    #[test]
    fn display_parses_back() {
        for text in [
            "public.invoice",
            "audit.*",
            r#""a.b"."say ""hi"".v2""#,
            r#"s."*""#,
            r#""x.y".*"#,
        ] {
            let p = TablePattern::parse(text).unwrap();
            assert_eq!(p.to_string(), text);
            assert_eq!(TablePattern::parse(&p.to_string()).unwrap(), p);
        }
    }

    #[test]
    fn malformed_patterns() {
        for bad in [
            "a.b.c",
            ".x",
            "x.",
            r#""open.x"#,
            r#""a"b.c"#,
            r#""".x"#,
            "*.t",
            "",
        ] {
            let e = TablePattern::parse(bad).unwrap_err();
            assert!(e.contains("is not a table name"), "{bad}: {e}");
        }
    }
}
