//! Sequences a table uses: those its serial and identity columns own, and those its defaults
//! call `nextval` on, with their options and their position at the moment they were read.
//! (Sequences are not transactional: the position is the one current when the catalog was
//! read, at or after the data's cut, so a restored sequence never hands out a used value.)

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::acl::{self, Access, AccessOptions};
use crate::pg::{quote_ident, quote_literal, ConnInfo, PgError, TableName};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceDef {
    pub name: TableName,
    /// `None` when unknown (schemas saved by older versions): PostgreSQL's defaults.
    pub settings: Option<SequenceSettings>,
    pub last_value: i64,
    pub is_called: bool,
    /// The table and column that own it (a serial or identity column).
    pub owned_by: Option<(TableName, String)>,
    /// True when it is that column's identity sequence (created by the identity itself).
    pub identity: bool,
    pub access: Access,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceSettings {
    /// `bigint`, `integer` or `smallint`.
    pub data_type: String,
    pub start: i64,
    pub increment: i64,
    pub min: i64,
    pub max: i64,
    pub cache: i64,
    pub cycle: bool,
}

impl SequenceSettings {
    /// The options of CREATE SEQUENCE, and (without `AS`, which an identity takes from its
    /// column) of an identity's `( ... )`.
    pub fn options(&self, with_type: bool) -> String {
        format!(
            "{}START WITH {} INCREMENT BY {} MINVALUE {} MAXVALUE {} CACHE {}{}",
            if with_type {
                format!("AS {} ", self.data_type)
            } else {
                String::new()
            },
            self.start,
            self.increment,
            self.min,
            self.max,
            self.cache,
            if self.cycle { " CYCLE" } else { " NO CYCLE" }
        )
    }
}

impl SequenceDef {
    /// ` options` for CREATE SEQUENCE (for an identity's, without `AS`), empty for the
    /// defaults.
    pub fn options(&self) -> String {
        self.settings
            .as_ref()
            .map(|s| format!(" {}", s.options(!self.identity)))
            .unwrap_or_default()
    }

    /// `CREATE SEQUENCE` for a sequence that is not an identity's (those come with their column).
    pub fn create_sql(&self) -> String {
        format!(
            "CREATE SEQUENCE IF NOT EXISTS {}{}",
            self.name.quoted(),
            self.options()
        )
    }

    /// Its position, comment, owner and privileges, once it exists. A sequence a column owns
    /// takes its table's owner with the table, and cannot be given another.
    pub fn finish_statements(&self, mut opts: AccessOptions) -> Vec<String> {
        opts.no_owner |= self.owned_by.is_some();
        let name = self.name.quoted();
        let mut out = vec![format!(
            "SELECT setval({}, {}, {})",
            quote_literal(&name),
            self.last_value,
            self.is_called
        )];
        if let Some(c) = &self.comment {
            out.push(format!(
                "COMMENT ON SEQUENCE {name} IS {}",
                quote_literal(c)
            ));
        }
        out.extend(self.access.statements("SEQUENCE", &name, opts));
        out
    }
}

/// The sequences table `oid` owns or whose `nextval` its defaults call.
pub(crate) async fn load(
    client: &Client,
    conn: &ConnInfo,
    table: &TableName,
    oid: u32,
) -> Result<Vec<SequenceDef>, PgError> {
    let q = |e| PgError::query(format!("reading the sequences of {table}"), conn, e);
    let rows = client
        .query(
            &format!(
                "WITH used AS ( \
                   SELECT d.objid AS seq, d.refobjsubid AS col, d.deptype = 'i' AS identity \
                   FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                     AND d.refclassid = 'pg_class'::regclass AND d.refobjid = $1 \
                     AND d.deptype IN ('a', 'i') \
                   UNION \
                   SELECT d.refobjid, NULL, false FROM pg_depend d \
                   JOIN pg_attrdef ad ON ad.oid = d.objid AND ad.adrelid = $1 \
                   WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass) \
                 SELECT n.nspname::text, c.relname::text, format_type(s.seqtypid, NULL), s.seqstart, \
                   s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle, \
                   (SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum = u.col), \
                   u.identity, pg_get_userbyid(c.relowner)::text, {}, obj_description(c.oid, 'pg_class') \
                 FROM used u JOIN pg_class c ON c.oid = u.seq AND c.relkind = 'S' \
                 JOIN pg_sequence s ON s.seqrelid = c.oid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 ORDER BY u.col IS NULL, n.nspname, c.relname",
                acl::select("c.relacl")
            ),
            &[&oid],
        )
        .await
        .map_err(q)?;
    let mut out: Vec<SequenceDef> = Vec::new();
    for r in rows {
        let name = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        if out.iter().any(|s| s.name == name) {
            // Owned and called by a default: listed once, as owned.
            continue;
        }
        let pos = client
            .query_one(
                &format!("SELECT last_value, is_called FROM {}", name.quoted()),
                &[],
            )
            .await
            .map_err(q)?;
        out.push(SequenceDef {
            settings: Some(SequenceSettings {
                data_type: r.get(2),
                start: r.get(3),
                increment: r.get(4),
                min: r.get(5),
                max: r.get(6),
                cache: r.get(7),
                cycle: r.get(8),
            }),
            last_value: pos.get(0),
            is_called: pos.get(1),
            owned_by: r
                .get::<_, Option<String>>(9)
                .map(|col| (table.clone(), col)),
            identity: r.get(10),
            access: Access {
                owner: Some(r.get(11)),
                acl: acl::parse(r.get(12)),
            },
            comment: r.get(13),
            name,
        });
    }
    Ok(out)
}

/// `ALTER SEQUENCE ... OWNED BY` for a serial column's sequence.
pub(crate) fn owned_by_sql(seq: &SequenceDef) -> Option<String> {
    let (table, col) = seq.owned_by.as_ref().filter(|_| !seq.identity)?;
    Some(format!(
        "ALTER SEQUENCE {} OWNED BY {}.{}",
        seq.name.quoted(),
        table.quoted(),
        quote_ident(col)
    ))
}
