//! What other objects of a database hold on to tables that are about to be dropped and
//! created again (a restore with `--replace`): the views and materialized views built on them
//! (directly or through other views), the foreign keys of other tables that reference them,
//! the functions that take or return their row type, and the policies and rules of other
//! tables that read them (a policy also when it calls such a function).
//!
//! [`Dependents::load`] reads them from the catalogs in the caller's transaction, with every
//! name schema-qualified; [`Dependents::drop_statements`] removes them so the tables can go,
//! and once the new tables are in place [`Dependents::foreign_key_statements`] and
//! [`Dependents::view_statements`] put them back as they were. Run all of it in one
//! transaction: a foreign key that the new rows break, or a view that no longer fits the new
//! columns, then fails the whole, and nothing has changed.
//!
//! Kept for a view: its definition and options (`check_option`, `security_barrier`,
//! `security_invoker`), triggers, rules, comments (its own and its columns'), owner and
//! privileges; for a materialized view also its indexes and whether it held data (it is
//! filled again from the new rows). Kept for a foreign key: its definition (actions,
//! deferrability, `NOT VALID`), comment, and the table it belongs to. Kept for a function:
//! its definition, comment, owner and privileges; for a policy: all of it but its comment;
//! for a rule: its definition, whether it fires, and its comment.
//! Column privileges of views are not kept. Anything else that holds on to such a function
//! (a column default of another table, say) makes its drop fail, naming it, and the restore
//! changes nothing.

use tokio_postgres::Client;

use super::acl::{self, Access, AccessOptions};
use super::function::{self, FunctionDef};
use super::policy::{self, Policy};
use super::trigger::Rule;
use crate::pg::{quote_ident, quote_literal, ConnInfo, PgError, TableName};

/// A view or materialized view that depends on the tables, as it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewDef {
    pub name: TableName,
    pub materialized: bool,
    /// The `SELECT`, as `pg_get_viewdef` writes it (without the final `;`).
    pub query: String,
    /// `name=value` options.
    pub options: Vec<String>,
    /// For a materialized view: whether it held data.
    pub populated: bool,
    pub comment: Option<String>,
    /// (column, comment)
    pub column_comments: Vec<(String, String)>,
    /// `CREATE INDEX`, `CREATE TRIGGER` and `CREATE RULE` statements, as PostgreSQL writes them.
    pub attached: Vec<String>,
    pub access: Access,
}

/// A foreign key of a table that is not replaced, referencing one that is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignKeyDef {
    pub table: TableName,
    pub name: String,
    /// As `pg_get_constraintdef` writes it.
    pub definition: String,
    pub comment: Option<String>,
}

impl ForeignKeyDef {
    /// The statements that add it back (and check every row of its table against the
    /// referenced rows, unless it was `NOT VALID`).
    pub fn add_statements(&self) -> Vec<String> {
        let table = self.table.quoted();
        let mut out = vec![format!(
            "ALTER TABLE {table} ADD CONSTRAINT {} {}",
            quote_ident(&self.name),
            self.definition
        )];
        if let Some(c) = &self.comment {
            out.push(format!(
                "COMMENT ON CONSTRAINT {} ON {table} IS {}",
                quote_ident(&self.name),
                quote_literal(c)
            ));
        }
        out
    }
}

/// The views and foreign keys that depend on a set of tables; views ordered so that each
/// comes after the views it is built on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dependents {
    pub views: Vec<ViewDef>,
    pub foreign_keys: Vec<ForeignKeyDef>,
    /// Functions taking or returning a replaced table's row type (or an array of it).
    pub functions: Vec<FunctionDef>,
    /// Policies of other tables that read a replaced table or call one of `functions`.
    pub policies: Vec<(TableName, Policy)>,
    /// Rules of other tables that read or write a replaced table.
    pub rules: Vec<(TableName, Rule)>,
}

/// Rules of tables other than the roots (views' are kept with the views) that name a root.
const RULES_SQL: &str = "SELECT DISTINCT n.nspname::text, c.relname::text, r.rulename::text, \
    rtrim(pg_get_ruledef(r.oid), ';'), r.ev_enabled::text, obj_description(r.oid, 'pg_rewrite') \
  FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class \
  JOIN pg_namespace n ON n.oid = c.relnamespace \
  WHERE c.relkind IN ('r', 'p') AND r.ev_class <> ALL($1::oid[]) AND EXISTS (SELECT 1 \
    FROM pg_depend d WHERE d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid \
      AND d.refclassid = 'pg_class'::regclass AND d.refobjid = ANY($1::oid[])) \
  ORDER BY 1, 2, 3";

/// Functions whose signature names a root's row type or its array type (not extension
/// members).
const ROW_TYPE_FUNCTIONS_SQL: &str = "SELECT DISTINCT d.objid FROM pg_depend d \
  JOIN pg_class c ON d.refobjid IN (c.reltype, (SELECT typarray FROM pg_type WHERE oid = c.reltype)) \
  WHERE d.classid = 'pg_proc'::regclass AND d.refclassid = 'pg_type'::regclass \
    AND d.deptype = 'n' AND c.oid = ANY($1::oid[]) \
    AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_proc'::regclass \
      AND x.objid = d.objid AND x.deptype = 'e') ORDER BY 1";

/// Policies of other tables that read the roots (`$1`) or call the functions (`$2`).
const POLICIES_SQL: &str = "SELECT DISTINCT n.nspname::text, c.relname::text, p.polname::text \
  FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid \
  JOIN pg_namespace n ON n.oid = c.relnamespace \
  WHERE p.polrelid <> ALL($1::oid[]) AND EXISTS (SELECT 1 FROM pg_depend d \
    WHERE d.classid = 'pg_policy'::regclass AND d.objid = p.oid \
      AND ((d.refclassid = 'pg_class'::regclass AND d.refobjid = ANY($1::oid[])) \
        OR (d.refclassid = 'pg_proc'::regclass AND d.refobjid = ANY($2::oid[])))) \
  ORDER BY 1, 2, 3";

/// Views on the roots, and views on those, each with the length of its longest path from a
/// root: creating in increasing depth puts every view after the ones it reads.
const VIEWS_SQL: &str = "WITH RECURSIVE dep(oid, depth) AS ( \
    SELECT r.ev_class, 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid \
     WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass \
       AND d.refobjid = ANY($1::oid[]) AND r.ev_class <> ALL($1::oid[]) \
    UNION \
    SELECT r.ev_class, dep.depth + 1 FROM dep JOIN pg_depend d ON d.refobjid = dep.oid \
      JOIN pg_rewrite r ON r.oid = d.objid \
     WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass \
       AND r.ev_class <> dep.oid) \
  SELECT n.nspname::text, c.relname::text, c.relkind = 'm', \
    rtrim(pg_get_viewdef(c.oid), ';'), coalesce(c.reloptions, '{}')::text[], c.relispopulated, \
    obj_description(c.oid, 'pg_class'), \
    ARRAY(SELECT a.attname::text || E'\\n' || col_description(c.oid, a.attnum) \
          FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 \
            AND col_description(c.oid, a.attnum) IS NOT NULL ORDER BY a.attnum), \
    ARRAY(SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE i.indrelid = c.oid \
          ORDER BY i.indexrelid::regclass::text) \
    || ARRAY(SELECT pg_get_triggerdef(t.oid) FROM pg_trigger t WHERE t.tgrelid = c.oid \
          AND NOT t.tgisinternal ORDER BY t.tgname) \
    || ARRAY(SELECT pg_get_ruledef(r.oid) FROM pg_rewrite r WHERE r.ev_class = c.oid \
          AND r.rulename <> '_RETURN' ORDER BY r.rulename), \
    pg_get_userbyid(c.relowner)::text, ACL \
  FROM (SELECT oid, max(depth) AS depth FROM dep GROUP BY oid) o \
  JOIN pg_class c ON c.oid = o.oid JOIN pg_namespace n ON n.oid = c.relnamespace \
  WHERE c.relkind IN ('v', 'm') ORDER BY o.depth, n.nspname, c.relname";

/// Foreign keys of other tables into the roots (declared ones: not the copies PostgreSQL
/// keeps on partitions).
const FOREIGN_KEYS_SQL: &str = "SELECT n.nspname::text, c.relname::text, k.conname::text, \
    pg_get_constraintdef(k.oid), obj_description(k.oid, 'pg_constraint') \
  FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid \
  JOIN pg_namespace n ON n.oid = c.relnamespace \
  WHERE k.contype = 'f' AND k.conparentid = 0 AND k.confrelid = ANY($1::oid[]) \
    AND k.conrelid <> ALL($1::oid[]) ORDER BY 1, 2, 3";

impl Dependents {
    /// Reads what depends on `tables` (those that exist, with their partitions) in `client`'s
    /// current transaction. The caller has the search path set to `pg_catalog` alone, so that
    /// every name in a definition is qualified.
    pub async fn load(
        client: &Client,
        conn: &ConnInfo,
        tables: &[TableName],
    ) -> Result<Dependents, PgError> {
        let q = |what: &'static str| move |e| PgError::query(what, conn, e);
        let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
        let roots: Vec<u32> = client
            .query(
                "SELECT DISTINCT p.relid::oid FROM unnest($1::text[]) t, \
                   LATERAL pg_partition_tree(to_regclass(t)) p WHERE p.relid IS NOT NULL \
                 UNION SELECT to_regclass(t)::oid FROM unnest($1::text[]) t \
                   WHERE to_regclass(t) IS NOT NULL",
                &[&names],
            )
            .await
            .map_err(q("finding the tables to replace"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if roots.is_empty() {
            return Ok(Dependents::default());
        }
        let views = client
            .query(
                &VIEWS_SQL.replace("ACL", &acl::select("c.relacl")),
                &[&roots],
            )
            .await
            .map_err(q("reading the views on the tables to replace"))?
            .iter()
            .map(|r| ViewDef {
                name: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                materialized: r.get(2),
                query: r.get(3),
                options: r.get(4),
                populated: r.get(5),
                comment: r.get(6),
                column_comments: r
                    .get::<_, Vec<String>>(7)
                    .into_iter()
                    .filter_map(|s| {
                        s.split_once('\n')
                            .map(|(c, t)| (c.to_string(), t.to_string()))
                    })
                    .collect(),
                attached: r.get(8),
                access: Access {
                    owner: Some(r.get(9)),
                    acl: acl::parse(r.get(10)),
                },
            })
            .collect();
        let foreign_keys = client
            .query(FOREIGN_KEYS_SQL, &[&roots])
            .await
            .map_err(q("reading the foreign keys into the tables to replace"))?
            .iter()
            .map(|r| ForeignKeyDef {
                table: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                name: r.get(2),
                definition: r.get(3),
                comment: r.get(4),
            })
            .collect();
        let function_oids: Vec<u32> = client
            .query(ROW_TYPE_FUNCTIONS_SQL, &[&roots])
            .await
            .map_err(q(
                "reading the functions that take the row types of the tables to replace",
            ))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut functions = Vec::new();
        for oid in &function_oids {
            // An aggregate is left alone: dropping the tables then fails naming it, and
            // nothing changes.
            if let Some((f, _)) = function::load(client, conn, *oid, false).await? {
                functions.push(f);
            }
        }
        let mut policies = Vec::new();
        for r in client
            .query(POLICIES_SQL, &[&roots, &function_oids])
            .await
            .map_err(q("reading the policies that read the tables to replace"))?
        {
            let table = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
            let name: String = r.get(2);
            for p in policy::load_named(client, conn, &table, Some(&name)).await? {
                policies.push((table.clone(), p));
            }
        }
        let rules = client
            .query(RULES_SQL, &[&roots])
            .await
            .map_err(q("reading the rules that read the tables to replace"))?
            .iter()
            .map(|r| {
                (
                    TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                    Rule {
                        name: r.get(2),
                        definition: r.get(3),
                        enabled: r.get(4),
                        comment: r.get(5),
                    },
                )
            })
            .collect();
        Ok(Dependents {
            views,
            foreign_keys,
            functions,
            policies,
            rules,
        })
    }

    /// Drops the policies and rules, the views (those built on others first), the foreign
    /// keys, then the functions.
    pub fn drop_statements(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .policies
            .iter()
            .map(|(t, p)| format!("DROP POLICY {} ON {}", quote_ident(&p.name), t.quoted()))
            .collect();
        out.extend(
            self.rules
                .iter()
                .map(|(t, r)| format!("DROP RULE {} ON {}", quote_ident(&r.name), t.quoted())),
        );
        out.extend(
            self.views
                .iter()
                .rev()
                .map(|v| format!("DROP {} {}", v.kind(), v.name.quoted())),
        );
        out.extend(self.foreign_keys.iter().map(|k| {
            format!(
                "ALTER TABLE {} DROP CONSTRAINT {}",
                k.table.quoted(),
                quote_ident(&k.name)
            )
        }));
        out.extend(
            self.functions
                .iter()
                .map(|f| format!("DROP FUNCTION {}", f.signature)),
        );
        out
    }

    /// Creates the functions again as they were (with owners and privileges, as for views),
    /// once the new tables exist: before anything of the restore that may call them.
    pub fn function_statements(&self) -> Vec<String> {
        self.functions
            .iter()
            .flat_map(|f| f.create_statements(AccessOptions::default()))
            .collect()
    }

    /// Creates the policies and rules again, once the new tables and the functions exist.
    pub fn policy_and_rule_statements(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .policies
            .iter()
            .map(|(t, p)| p.create_sql(&t.quoted()))
            .collect();
        for (t, r) in &self.rules {
            let table = t.quoted();
            out.push(r.definition.clone());
            out.extend(r.state_sql(&table));
            if let Some(c) = &r.comment {
                out.push(format!(
                    "COMMENT ON RULE {} ON {table} IS {}",
                    quote_ident(&r.name),
                    quote_literal(c)
                ));
            }
        }
        out
    }

    /// Creates the views again, in order, with everything attached to them; a materialized
    /// view that held data is filled from the tables as they are now. Owners and privileges
    /// are put back as they were: these are the target's objects, whatever the restore's
    /// `--no-owner`/`--no-acl` say of the restored ones.
    pub fn view_statements(&self) -> Vec<String> {
        self.views.iter().flat_map(ViewDef::statements).collect()
    }
}

impl ViewDef {
    /// `VIEW` or `MATERIALIZED VIEW`.
    pub fn kind(&self) -> &'static str {
        if self.materialized {
            "MATERIALIZED VIEW"
        } else {
            "VIEW"
        }
    }

    /// The statements that create this view as it was (see [`Dependents::view_statements`]).
    pub fn statements(&self) -> Vec<String> {
        let name = self.name.quoted();
        let with = if self.options.is_empty() {
            String::new()
        } else {
            let options: Vec<String> = self
                .options
                .iter()
                .map(|o| match o.split_once('=') {
                    Some((k, v)) => format!("{}={}", quote_ident(k), quote_literal(v)),
                    None => quote_ident(o),
                })
                .collect();
            format!(" WITH ({})", options.join(", "))
        };
        let data = match (self.materialized, self.populated) {
            (false, _) => "",
            (true, true) => " WITH DATA",
            (true, false) => " WITH NO DATA",
        };
        let mut out = vec![format!(
            "CREATE {} {name}{with} AS {}{data}",
            self.kind(),
            self.query
        )];
        out.extend(self.attached.iter().cloned());
        if let Some(c) = &self.comment {
            out.push(format!(
                "COMMENT ON {} {name} IS {}",
                self.kind(),
                quote_literal(c)
            ));
        }
        for (col, c) in &self.column_comments {
            out.push(format!(
                "COMMENT ON COLUMN {name}.{} IS {}",
                quote_ident(col),
                quote_literal(c)
            ));
        }
        // ALTER TABLE and GRANT ON TABLE accept views and materialized views alike.
        out.extend(
            self.access
                .statements("TABLE", &name, AccessOptions::default()),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, materialized: bool) -> ViewDef {
        ViewDef {
            name: TableName::new("public", name),
            materialized,
            query: " SELECT 1 AS one".into(),
            options: vec!["check_option=local".into()],
            populated: true,
            comment: Some("it's one".into()),
            column_comments: vec![("one".into(), "the number".into())],
            attached: vec!["CREATE INDEX x ON public.m USING btree (one)".into()],
            access: Access {
                owner: Some("app".into()),
                acl: None,
            },
        }
    }

    #[test]
    fn views_are_dropped_last_first_and_created_first_first() {
        let d = Dependents {
            views: vec![view("base", false), view("on_base", true)],
            foreign_keys: vec![ForeignKeyDef {
                table: TableName::new("public", "payment"),
                name: "payment_fk".into(),
                definition: "FOREIGN KEY (i) REFERENCES public.t(id)".into(),
                comment: None,
            }],
            functions: Vec::new(),
            policies: Vec::new(),
            rules: Vec::new(),
        };
        assert_eq!(
            d.drop_statements(),
            vec![
                "DROP MATERIALIZED VIEW \"public\".\"on_base\"",
                "DROP VIEW \"public\".\"base\"",
                "ALTER TABLE \"public\".\"payment\" DROP CONSTRAINT \"payment_fk\"",
            ]
        );
        let created = d.view_statements();
        assert_eq!(
            created[0],
            "CREATE VIEW \"public\".\"base\" WITH (\"check_option\"='local') AS  SELECT 1 AS one"
        );
        assert!(created.iter().any(|s| s
            .starts_with("CREATE MATERIALIZED VIEW \"public\".\"on_base\"")
            && s.ends_with(" WITH DATA")));
        assert!(created.contains(&"COMMENT ON VIEW \"public\".\"base\" IS 'it''s one'".to_string()));
        assert!(created.contains(&"ALTER TABLE \"public\".\"base\" OWNER TO \"app\"".to_string()));
        assert_eq!(
            d.foreign_keys[0].add_statements(),
            vec!["ALTER TABLE \"public\".\"payment\" ADD CONSTRAINT \"payment_fk\" FOREIGN KEY (i) REFERENCES public.t(id)"]
        );
    }
}
