//! User-defined types a table's columns use: enums (labels in their sort order, so labels
//! added later with `ADD VALUE BEFORE` keep their place), domains with their checks,
//! composites and ranges. Loaded depth first, so a type always comes after the types it is
//! built from and creating them in list order works.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::acl::{self, Access, AccessOptions};
use crate::pg::{quote_ident, quote_literal, ConnInfo, PgError, TableName};

/// One user-defined type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeDef {
    pub name: TableName,
    pub kind: TypeKind,
    pub access: Access,
    pub comment: Option<String>,
    /// Signatures of the user-defined functions its checks and default call, or that build
    /// it: created before it (none in manifests written before they were saved).
    #[serde(default)]
    pub calls: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TypeKind {
    Enum {
        labels: Vec<String>,
    },
    Domain {
        /// As `format_type` writes it.
        base: String,
        not_null: bool,
        default: Option<String>,
        /// `(name, definition)` of its CHECK constraints.
        checks: Vec<(String, String)>,
    },
    Composite {
        /// `(name, type)` of its attributes.
        attributes: Vec<(String, String)>,
    },
    Range {
        subtype: String,
        /// The subtype's difference function, qualified, if any.
        subtype_diff: Option<String>,
        multirange: TableName,
    },
}

impl TypeDef {
    /// The schemas this type (and, for a range, its multirange) lives in.
    pub fn schemas(&self) -> Vec<String> {
        let mut out = vec![self.name.schema.clone()];
        if let TypeKind::Range { multirange, .. } = &self.kind {
            out.push(multirange.schema.clone());
        }
        out
    }

    /// `CREATE TYPE` / `CREATE DOMAIN`, then its comment, owner and privileges.
    pub fn create_statements(&self, opts: AccessOptions) -> Vec<String> {
        let name = self.name.quoted();
        let create = match &self.kind {
            TypeKind::Enum { labels } => {
                let labels: Vec<String> = labels.iter().map(|l| quote_literal(l)).collect();
                format!("CREATE TYPE {name} AS ENUM ({})", labels.join(", "))
            }
            TypeKind::Domain {
                base,
                not_null,
                default,
                checks,
            } => {
                let mut s = format!("CREATE DOMAIN {name} AS {base}");
                if let Some(d) = default {
                    s.push_str(&format!(" DEFAULT {d}"));
                }
                if *not_null {
                    s.push_str(" NOT NULL");
                }
                for (n, def) in checks {
                    s.push_str(&format!(" CONSTRAINT {} {def}", quote_ident(n)));
                }
                s
            }
            TypeKind::Composite { attributes } => {
                let fields: Vec<String> = attributes
                    .iter()
                    .map(|(n, t)| format!("{} {t}", quote_ident(n)))
                    .collect();
                format!("CREATE TYPE {name} AS ({})", fields.join(", "))
            }
            TypeKind::Range {
                subtype,
                subtype_diff,
                multirange,
            } => {
                let mut s = format!("CREATE TYPE {name} AS RANGE (subtype = {subtype}");
                if let Some(f) = subtype_diff {
                    s.push_str(&format!(", subtype_diff = {f}"));
                }
                s.push_str(&format!(
                    ", multirange_type_name = {})",
                    multirange.quoted()
                ));
                s
            }
        };
        let alter = match self.kind {
            TypeKind::Domain { .. } => "DOMAIN",
            _ => "TYPE",
        };
        let mut out = vec![create];
        if let Some(c) = &self.comment {
            out.push(format!("COMMENT ON {alter} {name} IS {}", quote_literal(c)));
        }
        out.extend(self.access.statements(alter, &name, opts));
        out
    }
}

/// Appends to `out` the user-defined type `oid` and everything it is built from, dependencies
/// first; built-in types, types already in `out`, types of extensions (the model saves the
/// extension) and row types of tables (their tables are restored, or must exist) are skipped.
pub(crate) async fn load_into(
    client: &Client,
    conn: &ConnInfo,
    oid: u32,
    out: &mut Vec<TypeDef>,
    seen: &mut Vec<u32>,
) -> Result<(), PgError> {
    // An explicit stack instead of recursion: (oid, dependencies already visited).
    let mut stack = vec![(oid, false)];
    while let Some((oid, expanded)) = stack.pop() {
        // Below FirstNormalObjectId: built in.
        if oid < 16384 || (!expanded && seen.contains(&oid)) {
            continue;
        }
        let q = |what: &str| {
            let what = format!("reading type {oid} ({what})");
            move |e| PgError::query(what, conn, e)
        };
        let row = client
            .query_one(
                &format!(
                    "SELECT n.nspname::text, t.typname::text, t.typtype::text, t.typelem, \
                     t.typbasetype, format_type(t.typbasetype, t.typtypmod), t.typnotnull, \
                     t.typrelid, t.typdefault, pg_get_userbyid(t.typowner)::text, {}, \
                     obj_description(t.oid, 'pg_type'), \
                     EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass \
                             AND d.objid = t.oid AND d.deptype = 'e'), \
                     coalesce((SELECT c.relkind <> 'c' FROM pg_class c WHERE c.oid = t.typrelid), false) \
                     FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1",
                    acl::select("t.typacl")
                ),
                &[&oid],
            )
            .await
            .map_err(q("name"))?;
        let kind: String = row.get(2);
        let elem: u32 = row.get(3);
        let from_extension: bool = row.get(12);
        let row_type: bool = row.get(13);
        if from_extension || row_type {
            // The extension creates it, or its table does.
            seen.push(oid);
            continue;
        }
        if elem != 0 && kind == "b" {
            // An array: what matters is its element type.
            stack.push((elem, false));
            continue;
        }
        // What this type is built from.
        let mut deps: Vec<u32> = Vec::new();
        let kind = match kind.as_str() {
            "e" => TypeKind::Enum {
                labels: client
                    .query(
                        "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder",
                        &[&oid],
                    )
                    .await
                    .map_err(q("labels"))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect(),
            },
            "d" => {
                deps.push(row.get(4));
                TypeKind::Domain {
                    base: row.get(5),
                    not_null: row.get(6),
                    default: row.get(8),
                    checks: client
                        .query(
                            "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
                             WHERE contypid = $1 AND contype = 'c' ORDER BY conname",
                            &[&oid],
                        )
                        .await
                        .map_err(q("constraints"))?
                        .iter()
                        .map(|r| (r.get(0), r.get(1)))
                        .collect(),
                }
            }
            "c" => {
                let attrs = client
                    .query(
                        "SELECT attname::text, format_type(atttypid, atttypmod), atttypid FROM pg_attribute \
                         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                        &[&row.get::<_, u32>(7)],
                    )
                    .await
                    .map_err(q("attributes"))?;
                deps.extend(attrs.iter().map(|a| a.get::<_, u32>(2)));
                TypeKind::Composite {
                    attributes: attrs.iter().map(|a| (a.get(0), a.get(1))).collect(),
                }
            }
            "r" => {
                let r = client
                    .query_one(
                        "SELECT r.rngsubtype, format_type(r.rngsubtype, NULL), \
                         CASE WHEN r.rngsubdiff <> 0 THEN r.rngsubdiff::regproc::text END, \
                         n.nspname::text, m.typname::text \
                         FROM pg_range r JOIN pg_type m ON m.oid = r.rngmultitypid \
                         JOIN pg_namespace n ON n.oid = m.typnamespace WHERE r.rngtypid = $1",
                        &[&oid],
                    )
                    .await
                    .map_err(q("range"))?;
                deps.push(r.get(0));
                TypeKind::Range {
                    subtype: r.get(1),
                    subtype_diff: r.get(2),
                    multirange: TableName::new(r.get::<_, String>(3), r.get::<_, String>(4)),
                }
            }
            other => {
                return Err(PgError::Invalid(format!(
                    "type {}.{} (kind {other}) cannot be saved: only enum, domain, composite \
                     and range types can; create it on the target by hand",
                    row.get::<_, String>(0),
                    row.get::<_, String>(1)
                )))
            }
        };
        if !expanded {
            seen.push(oid);
            stack.push((oid, true));
            stack.extend(deps.into_iter().map(|d| (d, false)));
            continue;
        }
        out.push(TypeDef {
            name: TableName::new(row.get::<_, String>(0), row.get::<_, String>(1)),
            kind,
            access: Access {
                owner: Some(row.get(9)),
                acl: acl::parse(row.get(10)),
            },
            comment: row.get(11),
            calls: super::function::called_by_type(client, conn, oid).await?,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ddl() {
        let t = |kind| TypeDef {
            name: TableName::new("app", "mood"),
            kind,
            access: Access {
                owner: Some("o".into()),
                acl: None,
            },
            comment: None,
            calls: Vec::new(),
        };
        let opts = AccessOptions {
            no_owner: true,
            no_acl: true,
        };
        assert_eq!(
            t(TypeKind::Enum {
                labels: vec!["sad".into(), "o'k".into()]
            })
            .create_statements(opts),
            vec!["CREATE TYPE \"app\".\"mood\" AS ENUM ('sad', 'o''k')"]
        );
        assert_eq!(
            t(TypeKind::Domain {
                base: "integer".into(),
                not_null: true,
                default: Some("1".into()),
                checks: vec![("pos".into(), "CHECK ((VALUE > 0))".into())],
            })
            .create_statements(opts),
            vec!["CREATE DOMAIN \"app\".\"mood\" AS integer DEFAULT 1 NOT NULL CONSTRAINT \"pos\" CHECK ((VALUE > 0))"]
        );
        assert_eq!(
            t(TypeKind::Range {
                subtype: "numeric".into(),
                subtype_diff: None,
                multirange: TableName::new("app", "mood_multirange"),
            })
            .create_statements(AccessOptions::default())[1],
            "ALTER TYPE \"app\".\"mood\" OWNER TO \"o\""
        );
    }
}
