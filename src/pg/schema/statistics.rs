//! Extended statistics objects on a relation (`CREATE STATISTICS`): what the planner learns
//! about columns together. The gathered numbers are not saved; `ANALYZE` fills them again.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::acl::{Access, AccessOptions};
use crate::pg::{quote_literal, ConnInfo, PgError, TableName};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatisticsDef {
    pub name: TableName,
    /// As `pg_get_statisticsobjdef` writes it (naming the relation by its final name).
    pub definition: String,
    /// `SET STATISTICS` target when not the default.
    pub target: Option<i32>,
    pub access: Access,
    pub comment: Option<String>,
}

impl StatisticsDef {
    /// `CREATE STATISTICS`, then its target, comment and owner.
    pub fn create_statements(&self, opts: AccessOptions) -> Vec<String> {
        let name = self.name.quoted();
        let mut out = vec![self.definition.clone()];
        if let Some(t) = self.target {
            out.push(format!("ALTER STATISTICS {name} SET STATISTICS {t}"));
        }
        if let Some(c) = &self.comment {
            out.push(format!(
                "COMMENT ON STATISTICS {name} IS {}",
                quote_literal(c)
            ));
        }
        // Statistics objects have an owner but no privileges.
        out.extend(self.access.statements("STATISTICS", &name, opts));
        out
    }
}

/// The extended statistics of relation `oid`.
pub(crate) async fn load(
    client: &Client,
    conn: &ConnInfo,
    table: &TableName,
    oid: u32,
) -> Result<Vec<StatisticsDef>, PgError> {
    Ok(client
        .query(
            "SELECT n.nspname::text, s.stxname::text, pg_get_statisticsobjdef(s.oid), \
               nullif(s.stxstattarget::int, -1), pg_get_userbyid(s.stxowner)::text, \
               obj_description(s.oid, 'pg_statistic_ext') \
             FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace \
             WHERE s.stxrelid = $1 ORDER BY 1, 2",
            &[&oid],
        )
        .await
        .map_err(|e| {
            PgError::query(
                format!("reading the extended statistics of {table}"),
                conn,
                e,
            )
        })?
        .iter()
        .map(|r| StatisticsDef {
            name: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            definition: r.get(2),
            target: r.get(3),
            access: Access {
                owner: Some(r.get(4)),
                acl: None,
            },
            comment: r.get(5),
        })
        .collect())
}
