//! DDL for a set of [`TableModel`]s, in pg_dump's phases, for tables that are created and
//! loaded somewhere first (a staging schema) and moved into place at the end.
//!
//! The order of calls is the order of the phases:
//! 1. [`Plan::extensions`], [`Plan::schemas`] and [`Plan::prerequisites`] (types, and the
//!    functions that types, defaults, checks and indexes call): what the tables need to exist;
//! 2. [`Plan::create_tables`] at a [`Placement`], then the data ([`Plan::copy_in_sql`]);
//! 3. [`Plan::build_statements`]: constraints backed by indexes, checks, indexes (the costly
//!    part after the data, one model at a time, so models can be built in parallel);
//! 4. once every table has its final name: [`Plan::function_statements`], then each model's
//!    [`Plan::finish_statements`] (sequences, defaults, identity, triggers, rules, row-level
//!    security, policies, extended statistics, comments, owners, privileges), then
//!    [`Plan::foreign_key_statements`], which also validate the loaded rows.

use std::collections::{BTreeSet, HashSet};
use std::fmt;

use super::acl::AccessOptions;
use super::constraint::ConstraintKind;
use super::function::{ExtensionDef, FunctionDef};
use super::sequence;
use super::table::{ReplicaIdentityDef, TableDef};
use super::types::TypeDef;
use super::TableModel;
use crate::pg::{quote_ident, quote_literal, TableName};

/// Where the relations of a plan are while a statement runs.
#[derive(Debug, Clone, Copy)]
pub enum Placement<'a> {
    /// Under their own names.
    Final,
    /// In this (unquoted) staging schema, as `t<model>_<relation>`, and their indexes with
    /// them.
    Staging(&'a str),
}

/// A foreign key that references a table the plan does not create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedForeignKey {
    pub table: TableName,
    pub constraint: String,
    pub references: TableName,
}

impl fmt::Display for SkippedForeignKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "foreign key {} of {} references {}, which is not restored with it; it was skipped \
             (add it by hand once {} holds the referenced rows)",
            self.constraint, self.table, self.references, self.references
        )
    }
}

/// A type or function created before the tables, in [`Plan::prerequisites`]' order.
#[derive(Debug, Clone, Copy)]
pub enum Prerequisite<'m> {
    Type(&'m TypeDef),
    Function(&'m FunctionDef),
}

/// The DDL of several models created together.
pub struct Plan<'m> {
    models: Vec<&'m TableModel>,
    opts: AccessOptions,
    /// Only the tables will be created (a replica's), not their triggers, rules, policies
    /// and statistics: what only those need is not required.
    tables_only: bool,
}

impl<'m> Plan<'m> {
    pub fn new(models: Vec<&'m TableModel>, opts: AccessOptions) -> Plan<'m> {
        Plan {
            models,
            opts,
            tables_only: false,
        }
    }

    /// A plan whose caller creates the tables (with their constraints, indexes, defaults and
    /// types) and nothing that comes after: [`Plan::extensions`] and [`Plan::functions`] then
    /// leave out what only triggers, rules and policies need.
    pub fn tables_only(mut self) -> Plan<'m> {
        self.tables_only = true;
        self
    }

    /// The models, in the order given to [`Plan::new`]; `m` in the other methods indexes them.
    pub fn models(&self) -> &[&'m TableModel] {
        &self.models
    }

    /// Relation `r` of model `m` as it is named at `at`, quoted.
    pub fn relation_at(&self, m: usize, r: usize, at: Placement) -> String {
        match at {
            Placement::Final => self.models[m].relations[r].name.quoted(),
            Placement::Staging(s) => {
                format!("{}.{}", quote_ident(s), quote_ident(&format!("t{m}_{r}")))
            }
        }
    }

    /// The schema an index of relation `r` of model `m` lives in.
    fn index_schema(&self, m: usize, r: usize, at: Placement) -> String {
        match at {
            Placement::Final => quote_ident(&self.models[m].relations[r].name.schema),
            Placement::Staging(s) => quote_ident(s),
        }
    }

    fn restores(&self, name: &TableName) -> bool {
        self.models
            .iter()
            .any(|m| m.relations.iter().any(|r| &r.name == name))
    }

    /// Roles that must exist on the target: owners and grantees (unless left out by the
    /// options) and the roles policies name; a schema's only if the plan creates it (see
    /// [`Plan::schema_roles`]).
    pub fn required_roles(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for m in &self.models {
            for r in &m.relations {
                out.extend(r.access.roles(self.opts));
                if !self.opts.no_acl {
                    for c in &r.columns {
                        out.extend(c.acl.iter().flatten().filter_map(|g| g.grantee.clone()));
                    }
                }
                for p in &r.policies {
                    out.extend(p.roles().cloned());
                }
            }
            out.extend(m.types.iter().flat_map(|t| t.access.roles(self.opts)));
            out.extend(m.sequences.iter().flat_map(|s| s.access.roles(self.opts)));
            out.extend(m.functions.iter().flat_map(|f| f.access.roles(self.opts)));
            for r in &m.relations {
                out.extend(r.statistics.iter().flat_map(|s| s.access.roles(self.opts)));
            }
        }
        out
    }

    /// Roles schema `name` needs on the target if the plan creates it (its owner and grantees
    /// under the options).
    pub fn schema_roles(&self, name: &str) -> Vec<String> {
        self.models
            .iter()
            .flat_map(|m| m.schemas.iter())
            .find(|s| s.name == name)
            .map(|s| s.access.roles(self.opts))
            .unwrap_or_default()
    }

    /// The comments, owners and privileges of the schemas named in `created` (those the
    /// restore created), once everything in them exists: run earlier, privileges that leave
    /// the restoring role out would keep it from creating the rest.
    pub fn schema_statements(&self, created: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for name in created {
            let Some(def) = self
                .models
                .iter()
                .flat_map(|m| m.schemas.iter())
                .find(|s| &s.name == name)
            else {
                continue;
            };
            let quoted = quote_ident(name);
            if let Some(c) = &def.comment {
                out.push(format!(
                    "COMMENT ON SCHEMA {quoted} IS {}",
                    quote_literal(c)
                ));
            }
            out.extend(def.access.statements("SCHEMA", &quoted, self.opts));
        }
        out
    }

    /// Foreign keys to tables outside the plan: not created.
    pub fn skipped_foreign_keys(&self) -> Vec<SkippedForeignKey> {
        let mut out = Vec::new();
        for m in &self.models {
            for r in &m.relations {
                for c in &r.constraints {
                    if let Some(to) = c.references.as_ref().filter(|to| !self.restores(to)) {
                        out.push(SkippedForeignKey {
                            table: r.name.clone(),
                            constraint: c.name.clone(),
                            references: to.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// Schemas the tables, types, sequences, functions, statistics and extensions live in,
    /// by name.
    pub fn schemas(&self) -> Vec<String> {
        let mut out = BTreeSet::new();
        for m in &self.models {
            out.extend(m.relations.iter().map(|r| r.name.schema.clone()));
            out.extend(m.types.iter().flat_map(TypeDef::schemas));
            out.extend(m.sequences.iter().map(|s| s.name.schema.clone()));
            out.extend(m.functions.iter().map(|f| f.schema.clone()));
            out.extend(m.extensions.iter().map(|e| e.schema.clone()));
            for r in &m.relations {
                out.extend(r.statistics.iter().map(|s| s.name.schema.clone()));
            }
        }
        out.remove("");
        out.into_iter().collect()
    }

    /// The extensions the tables use, once each (with [`Plan::tables_only`], those that
    /// what is created before the tables uses).
    pub fn extensions(&self) -> Vec<&'m ExtensionDef> {
        let mut out: Vec<&ExtensionDef> = self
            .models
            .iter()
            .flat_map(|m| m.extensions.iter())
            .filter(|e| e.before_tables || !self.tables_only)
            .collect();
        out.sort_by(|a, b| (&a.name, &a.schema).cmp(&(&b.name, &b.schema)));
        out.dedup_by(|a, b| a.name == b.name && a.schema == b.schema);
        out
    }

    /// The functions of every model, once each by signature (with [`Plan::tables_only`],
    /// those created before the tables).
    pub fn functions(&self) -> Vec<&'m FunctionDef> {
        let mut seen = HashSet::new();
        self.models
            .iter()
            .flat_map(|m| m.functions.iter())
            .filter(|f| f.before_tables || !self.tables_only)
            .filter(|f| seen.insert(&f.signature))
            .collect()
    }

    /// True when function `f` takes or returns the row type of one of the plan's tables:
    /// it can only be created once they exist.
    fn uses_row_type(&self, f: &FunctionDef) -> bool {
        f.uses_types.iter().any(|t| self.restores(t))
    }

    /// The types, and the functions created before the tables, each after what it needs: a
    /// type after the functions its checks call, a function after the types of its
    /// signature; otherwise in [`Plan::types`] order.
    pub fn prerequisites(&self) -> Vec<Prerequisite<'m>> {
        let types = self.types();
        let functions: Vec<&FunctionDef> = self
            .functions()
            .into_iter()
            .filter(|f| f.before_tables && !self.uses_row_type(f))
            .collect();
        struct Order<'a, 'm> {
            types: &'a [&'m TypeDef],
            functions: &'a [&'m FunctionDef],
            done_types: HashSet<&'m TableName>,
            done_functions: HashSet<&'m str>,
            out: Vec<Prerequisite<'m>>,
        }
        impl<'m> Order<'_, 'm> {
            fn add_type(&mut self, t: &'m TypeDef) {
                if !self.done_types.insert(&t.name) {
                    return;
                }
                for sig in &t.calls {
                    if let Some(f) = self.functions.iter().find(|f| &f.signature == sig) {
                        self.add_function(f);
                    }
                }
                self.out.push(Prerequisite::Type(t));
            }
            fn add_function(&mut self, f: &'m FunctionDef) {
                if !self.done_functions.insert(&f.signature) {
                    return;
                }
                for name in &f.uses_types {
                    if let Some(t) = self.types.iter().find(|t| &t.name == name) {
                        self.add_type(t);
                    }
                }
                self.out.push(Prerequisite::Function(f));
            }
        }
        let mut order = Order {
            types: &types,
            functions: &functions,
            done_types: HashSet::new(),
            done_functions: HashSet::new(),
            out: Vec::new(),
        };
        for t in &types {
            order.add_type(t);
        }
        for f in &functions {
            order.add_function(f);
        }
        order.out
    }

    /// The statements that create function `f` with its comment, owner and privileges.
    pub fn function_create_statements(&self, f: &FunctionDef) -> Vec<String> {
        f.create_statements(self.opts)
    }

    /// The user-defined types the tables need, each after those it is built from, once each.
    pub fn types(&self) -> Vec<&'m TypeDef> {
        let mut out: Vec<&TypeDef> = Vec::new();
        for t in self.models.iter().flat_map(|m| m.types.iter()) {
            if !out.iter().any(|o| o.name == t.name) {
                out.push(t);
            }
        }
        out
    }

    /// The statements that create type `t` with its comment, owner and privileges.
    pub fn type_statements(&self, t: &TypeDef) -> Vec<String> {
        t.create_statements(self.opts)
    }

    /// True when every index and index-backed constraint of the plan has a name of its own,
    /// so all of them can be built side by side in one staging schema.
    pub fn can_build_in_staging(&self) -> bool {
        let mut names = HashSet::new();
        self.models
            .iter()
            .flat_map(|m| m.relations.iter())
            .all(|r| {
                r.constraints
                    .iter()
                    .filter(|c| c.kind.has_index())
                    .map(|c| &c.name)
                    .chain(r.indexes.iter().map(|i| &i.name))
                    .all(|n| names.insert(n.clone()))
            })
    }

    /// `CREATE TABLE` of model `m`'s relations at `at`, parents before partitions.
    pub fn create_tables(&self, m: usize, at: Placement) -> Vec<String> {
        let model = self.models[m];
        model
            .relations
            .iter()
            .enumerate()
            .map(|(r, rel)| {
                let parent = rel.partition_of.as_ref().and_then(|p| {
                    model
                        .relations
                        .iter()
                        .position(|x| x.name == p.parent)
                        .map(|pr| self.relation_at(m, pr, at))
                });
                rel.create_sql(&self.relation_at(m, r, at), parent.as_deref())
            })
            .collect()
    }

    /// `COPY ... FROM STDIN` into model `m`'s table at `at`. A plain table created in the same
    /// transaction is loaded FROZEN (no later vacuum pass to set hint bits); a partitioned one
    /// cannot be.
    pub fn copy_in_sql(&self, m: usize, at: Placement) -> String {
        let table = self.models[m].table();
        let cols: Vec<String> = table
            .copied_columns()
            .iter()
            .map(|c| quote_ident(c))
            .collect();
        format!(
            "COPY {} ({}) FROM STDIN{}",
            self.relation_at(m, 0, at),
            cols.join(", "),
            if table.partition_key.is_none() {
                " WITH (FREEZE)"
            } else {
                ""
            }
        )
    }

    /// Index-backed constraints, checks and indexes of model `m` at `at`, then the
    /// attachment of partitions' indexes to their parents', deepest partitions first.
    pub fn build_statements(&self, m: usize, at: Placement) -> Vec<String> {
        let model = self.models[m];
        let mut out = Vec::new();
        for (r, rel) in model.relations.iter().enumerate() {
            let table = self.relation_at(m, r, at);
            for c in &rel.constraints {
                let only = match c.kind {
                    k if k.has_index() => "ONLY ",
                    ConstraintKind::Check => "",
                    _ => continue,
                };
                out.push(format!(
                    "ALTER TABLE {only}{table} ADD CONSTRAINT {} {}",
                    quote_ident(&c.name),
                    c.definition
                ));
            }
            out.extend(rel.indexes.iter().map(|i| i.create_sql(&table)));
        }
        for (r, rel) in model.relations.iter().enumerate().rev() {
            let Some(parent) = rel
                .partition_of
                .as_ref()
                .and_then(|p| model.relations.iter().position(|x| x.name == p.parent))
            else {
                continue;
            };
            let attached = rel
                .constraints
                .iter()
                .filter(|c| c.kind.has_index())
                .map(|c| (&c.name, &c.attach_to))
                .chain(rel.indexes.iter().map(|i| (&i.name, &i.attach_to)));
            for (name, to) in attached {
                if let Some(to) = to {
                    out.push(format!(
                        "ALTER INDEX {}.{} ATTACH PARTITION {}.{}",
                        self.index_schema(m, parent, at),
                        quote_ident(to),
                        self.index_schema(m, r, at),
                        quote_ident(name)
                    ));
                }
            }
        }
        out
    }

    /// The functions of every model (`CREATE OR REPLACE`: those created before the tables
    /// are written again, as the source has them), before the triggers, rules and policies
    /// that call them.
    pub fn function_statements(&self) -> Vec<String> {
        self.functions()
            .into_iter()
            .flat_map(|f| self.function_create_statements(f))
            .collect()
    }

    /// What completes model `m` once its relations have their final names: its
    /// [`Plan::column_statements`], then replica identity, clustering, triggers, rules,
    /// row-level security, policies, extended statistics, comments, owners and privileges.
    pub fn finish_statements(&self, m: usize) -> Vec<String> {
        let mut out = self.column_statements(m);
        for rel in &self.models[m].relations {
            out.extend(self.relation_statements(rel));
        }
        out
    }

    /// Sequences (with their positions), defaults and identity of model `m`'s columns, once
    /// its relations have their final names.
    pub fn column_statements(&self, m: usize) -> Vec<String> {
        let model = self.models[m];
        let mut out = Vec::new();
        for s in model.sequences.iter().filter(|s| !s.identity) {
            out.push(s.create_sql());
        }
        for rel in &model.relations {
            let table = rel.name.quoted();
            for c in &rel.columns {
                let col = quote_ident(&c.name);
                if let Some(d) = &c.default {
                    out.push(format!(
                        "ALTER TABLE {table} ALTER COLUMN {col} SET DEFAULT {d}"
                    ));
                }
                let kind = match c.identity.as_deref() {
                    Some("a") => "ALWAYS",
                    Some("d") => "BY DEFAULT",
                    _ => continue,
                };
                let seq = model.sequences.iter().find(|s| {
                    s.identity && s.owned_by.as_ref() == Some(&(rel.name.clone(), c.name.clone()))
                });
                let options = seq
                    .map(|s| format!(" (SEQUENCE NAME {}{})", s.name.quoted(), s.options()))
                    .unwrap_or_default();
                out.push(format!(
                    "ALTER TABLE {table} ALTER COLUMN {col} ADD GENERATED {kind} AS IDENTITY{options}"
                ));
            }
        }
        for s in &model.sequences {
            out.extend(sequence::owned_by_sql(s));
            out.extend(s.finish_statements(self.opts));
        }
        out
    }

    /// `REPLICA IDENTITY` of model `m`'s relations that do not use the default, once their
    /// indexes exist under their final names.
    pub fn replica_identity_statements(&self, m: usize) -> Vec<String> {
        self.models[m]
            .relations
            .iter()
            .filter_map(replica_identity_sql)
            .collect()
    }

    fn relation_statements(&self, rel: &TableDef) -> Vec<String> {
        let table = rel.name.quoted();
        let mut out: Vec<String> = replica_identity_sql(rel).into_iter().collect();
        for i in rel.indexes.iter().filter(|i| i.clustered) {
            out.push(format!(
                "ALTER TABLE {table} CLUSTER ON {}",
                quote_ident(&i.name)
            ));
        }
        for t in &rel.triggers {
            out.push(t.definition.clone());
            out.extend(t.state_sql(&table));
        }
        for r in &rel.rules {
            out.push(r.definition.clone());
            out.extend(r.state_sql(&table));
        }
        if rel.row_security {
            out.push(format!("ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"));
        }
        if rel.force_row_security {
            out.push(format!("ALTER TABLE {table} FORCE ROW LEVEL SECURITY"));
        }
        out.extend(rel.policies.iter().map(|p| p.create_sql(&table)));
        for s in &rel.statistics {
            out.extend(s.create_statements(self.opts));
        }
        let comment =
            |on: String, text: &str| format!("COMMENT ON {on} IS {}", quote_literal(text));
        if let Some(c) = &rel.comment {
            out.push(comment(format!("TABLE {table}"), c));
        }
        for col in &rel.columns {
            if let Some(c) = &col.comment {
                out.push(comment(
                    format!("COLUMN {table}.{}", quote_ident(&col.name)),
                    c,
                ));
            }
        }
        for con in &rel.constraints {
            // Foreign keys come later, with their comments.
            if con.kind == ConstraintKind::ForeignKey {
                continue;
            }
            if let Some(c) = &con.comment {
                out.push(comment(
                    format!("CONSTRAINT {} ON {table}", quote_ident(&con.name)),
                    c,
                ));
            }
        }
        for i in &rel.indexes {
            if let Some(c) = &i.comment {
                out.push(comment(
                    format!(
                        "INDEX {}.{}",
                        quote_ident(&rel.name.schema),
                        quote_ident(&i.name)
                    ),
                    c,
                ));
            }
        }
        for t in &rel.triggers {
            if let Some(c) = &t.comment {
                out.push(comment(
                    format!("TRIGGER {} ON {table}", quote_ident(&t.name)),
                    c,
                ));
            }
        }
        for r in &rel.rules {
            if let Some(c) = &r.comment {
                out.push(comment(
                    format!("RULE {} ON {table}", quote_ident(&r.name)),
                    c,
                ));
            }
        }
        out.extend(rel.access.statements("TABLE", &table, self.opts));
        if !self.opts.no_acl {
            for col in &rel.columns {
                for g in col.acl.iter().flatten() {
                    let to = g
                        .grantee
                        .as_deref()
                        .map(quote_ident)
                        .unwrap_or("PUBLIC".into());
                    out.push(format!(
                        "GRANT {} ({}) ON TABLE {table} TO {to}{}",
                        g.privilege,
                        quote_ident(&col.name),
                        if g.grantable {
                            " WITH GRANT OPTION"
                        } else {
                            ""
                        }
                    ));
                }
            }
        }
        out
    }

    /// A constraint the plan creates (a foreign key only when it references a restored table).
    fn restores_constraint(&self, c: &super::constraint::Constraint) -> bool {
        c.references.as_ref().is_none_or(|to| self.restores(to))
    }

    /// Foreign keys between the plan's tables, with their comments (foreign keys to other
    /// tables are in [`Plan::skipped_foreign_keys`]). Adding one checks the loaded rows.
    pub fn foreign_key_statements(&self) -> Vec<String> {
        let mut out = Vec::new();
        for rel in self.models.iter().flat_map(|m| m.relations.iter()) {
            let table = rel.name.quoted();
            for c in &rel.constraints {
                if c.kind == ConstraintKind::ForeignKey && self.restores_constraint(c) {
                    out.push(format!(
                        "ALTER TABLE {table} ADD CONSTRAINT {} {}",
                        quote_ident(&c.name),
                        c.definition
                    ));
                    if let Some(text) = &c.comment {
                        out.push(format!(
                            "COMMENT ON CONSTRAINT {} ON {table} IS {}",
                            quote_ident(&c.name),
                            quote_literal(text)
                        ));
                    }
                }
            }
        }
        out
    }
}

fn replica_identity_sql(rel: &TableDef) -> Option<String> {
    let table = rel.name.quoted();
    match &rel.replica_identity {
        ReplicaIdentityDef::Default => None,
        ReplicaIdentityDef::Full => Some(format!("ALTER TABLE {table} REPLICA IDENTITY FULL")),
        ReplicaIdentityDef::Nothing => {
            Some(format!("ALTER TABLE {table} REPLICA IDENTITY NOTHING"))
        }
        ReplicaIdentityDef::Index(i) => Some(format!(
            "ALTER TABLE {table} REPLICA IDENTITY USING INDEX {}",
            quote_ident(i)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::acl::Access;
    use super::super::constraint::{Constraint, Index};
    use super::super::table::{ColumnDef, PartitionOf};
    use super::*;

    fn relation(name: &str, partition_of: Option<&str>) -> TableDef {
        TableDef {
            name: TableName::new("sales", name),
            columns: Vec::new(),
            primary_key: vec!["id".into()],
            partition_key: None,
            partition_of: partition_of.map(|p| PartitionOf {
                parent: TableName::new("sales", p),
                bound: "DEFAULT".into(),
            }),
            options: Vec::new(),
            constraints: Vec::new(),
            indexes: Vec::new(),
            triggers: Vec::new(),
            row_security: false,
            force_row_security: false,
            policies: Vec::new(),
            rules: Vec::new(),
            statistics: Vec::new(),
            replica_identity: ReplicaIdentityDef::Default,
            access: Access {
                owner: Some("app".into()),
                acl: None,
            },
            comment: None,
        }
    }

    fn pk(name: &str, attach_to: Option<&str>) -> Constraint {
        Constraint {
            name: name.into(),
            kind: ConstraintKind::PrimaryKey,
            definition: "PRIMARY KEY (id)".into(),
            references: None,
            attach_to: attach_to.map(str::to_string),
            comment: None,
        }
    }

    /// `sales.invoice` partitioned, with one partition, and a foreign key to `public.seller`.
    fn invoice() -> TableModel {
        let mut parent = relation("invoice", None);
        parent.partition_key = Some("RANGE (id)".into());
        parent.columns.push(ColumnDef {
            name: "id".into(),
            type_name: "bigint".into(),
            type_oid: 20,
            not_null: true,
            default: None,
            identity: None,
            generated: None,
            collation: None,
            comment: None,
            acl: None,
        });
        parent.constraints = vec![
            pk("invoice_pkey", None),
            Constraint {
                name: "invoice_seller_fkey".into(),
                kind: ConstraintKind::ForeignKey,
                definition: "FOREIGN KEY (id) REFERENCES public.seller(id)".into(),
                references: Some(TableName::new("public", "seller")),
                attach_to: None,
                comment: None,
            },
        ];
        parent.indexes = vec![Index {
            name: "invoice_day".into(),
            unique: false,
            only: true,
            body: "USING btree (day)".into(),
            attach_to: None,
            clustered: false,
            comment: None,
        }];
        let mut part = relation("invoice_other", Some("invoice"));
        part.constraints = vec![pk("invoice_other_pkey", Some("invoice_pkey"))];
        part.indexes = vec![Index {
            name: "invoice_other_day_idx".into(),
            unique: false,
            only: false,
            body: "USING btree (day)".into(),
            attach_to: Some("invoice_day".into()),
            clustered: false,
            comment: None,
        }];
        TableModel {
            relations: vec![parent, part],
            types: Vec::new(),
            sequences: Vec::new(),
            functions: Vec::new(),
            extensions: Vec::new(),
            schemas: Vec::new(),
        }
    }

    #[test]
    fn partitions_are_created_loaded_and_attached_in_staging() {
        let m = invoice();
        let plan = Plan::new(vec![&m], AccessOptions::default());
        let at = Placement::Staging("st");
        assert_eq!(
            plan.create_tables(0, at),
            vec![
                "CREATE TABLE \"st\".\"t0_0\" (\"id\" bigint NOT NULL) PARTITION BY RANGE (id)",
                "CREATE TABLE \"st\".\"t0_1\" PARTITION OF \"st\".\"t0_0\" DEFAULT",
            ]
        );
        // Rows go through the parent; a partitioned table cannot be loaded FROZEN.
        assert_eq!(
            plan.copy_in_sql(0, at),
            "COPY \"st\".\"t0_0\" (\"id\") FROM STDIN"
        );
        assert_eq!(
            plan.build_statements(0, at),
            vec![
                "ALTER TABLE ONLY \"st\".\"t0_0\" ADD CONSTRAINT \"invoice_pkey\" PRIMARY KEY (id)",
                "CREATE INDEX \"invoice_day\" ON ONLY \"st\".\"t0_0\" USING btree (day)",
                "ALTER TABLE ONLY \"st\".\"t0_1\" ADD CONSTRAINT \"invoice_other_pkey\" PRIMARY KEY (id)",
                "CREATE INDEX \"invoice_other_day_idx\" ON \"st\".\"t0_1\" USING btree (day)",
                "ALTER INDEX \"st\".\"invoice_pkey\" ATTACH PARTITION \"st\".\"invoice_other_pkey\"",
                "ALTER INDEX \"st\".\"invoice_day\" ATTACH PARTITION \"st\".\"invoice_other_day_idx\"",
            ]
        );
        assert_eq!(
            plan.build_statements(0, Placement::Final)[4],
            "ALTER INDEX \"sales\".\"invoice_pkey\" ATTACH PARTITION \"sales\".\"invoice_other_pkey\""
        );
        assert!(plan.can_build_in_staging());
    }

    #[test]
    fn foreign_keys_only_between_restored_tables() {
        let m = invoice();
        let alone = Plan::new(vec![&m], AccessOptions::default());
        assert!(alone.foreign_key_statements().is_empty());
        let skipped = alone.skipped_foreign_keys();
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].to_string().contains("references public.seller"));

        let mut seller = relation("seller", None);
        seller.name = TableName::new("public", "seller");
        let s = TableModel {
            relations: vec![seller],
            types: Vec::new(),
            sequences: Vec::new(),
            functions: Vec::new(),
            extensions: Vec::new(),
            schemas: Vec::new(),
        };
        let both = Plan::new(vec![&m, &s], AccessOptions::default());
        assert!(both.skipped_foreign_keys().is_empty());
        assert_eq!(
            both.foreign_key_statements(),
            vec!["ALTER TABLE \"sales\".\"invoice\" ADD CONSTRAINT \"invoice_seller_fkey\" FOREIGN KEY (id) REFERENCES public.seller(id)"]
        );
    }

    #[test]
    fn roles_and_clashing_index_names() {
        let m = invoice();
        let mut other = invoice();
        other.relations[0].name = TableName::new("archive", "invoice");
        other.relations[1]
            .policies
            .push(super::super::policy::Policy {
                name: "p".into(),
                permissive: true,
                command: "SELECT".into(),
                roles: vec!["public".into(), "auditor".into()],
                using: Some("true".into()),
                with_check: None,
            });
        let plan = Plan::new(vec![&m, &other], AccessOptions::default());
        assert_eq!(
            plan.required_roles().into_iter().collect::<Vec<_>>(),
            vec!["app", "auditor"]
        );
        // Same index names in two schemas: they cannot share one staging schema.
        assert!(!plan.can_build_in_staging());
        let no_owner = Plan::new(
            vec![&m, &other],
            AccessOptions {
                no_owner: true,
                no_acl: true,
            },
        );
        // Policies still name their roles.
        assert_eq!(
            no_owner.required_roles().into_iter().collect::<Vec<_>>(),
            vec!["auditor"]
        );
    }

    fn function(signature: &str, uses: &[TableName], before_tables: bool) -> FunctionDef {
        FunctionDef {
            signature: signature.into(),
            definition: format!("CREATE OR REPLACE FUNCTION {signature} ..."),
            access: Access::default(),
            comment: None,
            schema: "util".into(),
            language: "sql".into(),
            uses_types: uses.to_vec(),
            before_tables,
        }
    }

    fn enum_type(name: &str, calls: &[&str]) -> TypeDef {
        TypeDef {
            name: TableName::new("public", name),
            kind: super::super::types::TypeKind::Enum { labels: Vec::new() },
            access: Access::default(),
            comment: None,
            calls: calls.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn functions_come_between_the_types_they_take_and_the_types_that_call_them() {
        let mut m = invoice();
        let mood = TableName::new("public", "mood");
        // A domain (here any type) whose check calls a function taking the enum before it,
        // listed before the enum: the enum, the function, then the domain.
        m.types = vec![
            enum_type("checked", &["util.ok(public.mood)"]),
            enum_type("mood", &[]),
        ];
        m.functions = vec![
            function("util.touch()", &[], false),
            function("util.ok(public.mood)", std::slice::from_ref(&mood), true),
            function("util.next()", &[], true),
            // Takes a restored table's row: only once the tables exist.
            function(
                "util.label(sales.invoice)",
                &[TableName::new("sales", "invoice")],
                true,
            ),
        ];
        m.extensions = vec![
            ExtensionDef {
                name: "citext".into(),
                schema: "ext".into(),
                before_tables: true,
            },
            ExtensionDef {
                name: "moddatetime".into(),
                schema: "ext".into(),
                before_tables: false,
            },
        ];
        let plan = Plan::new(vec![&m, &m], AccessOptions::default());
        let order: Vec<String> = plan
            .prerequisites()
            .iter()
            .map(|p| match p {
                Prerequisite::Type(t) => t.name.to_string(),
                Prerequisite::Function(f) => f.signature.clone(),
            })
            .collect();
        assert_eq!(
            order,
            vec![
                "public.mood",
                "util.ok(public.mood)",
                "public.checked",
                "util.next()"
            ]
        );
        // Every function once, after the tables; extensions once; their schemas created.
        assert_eq!(plan.function_statements().len(), 4);
        assert_eq!(plan.extensions().len(), 2);
        // A replica's tables need neither the trigger's function nor its extension.
        let replica = Plan::new(vec![&m], AccessOptions::default()).tables_only();
        assert_eq!(replica.functions().len(), 3);
        assert_eq!(
            replica
                .extensions()
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
            vec!["citext"]
        );
        assert_eq!(plan.schemas(), vec!["ext", "public", "sales", "util"]);
    }

    #[test]
    fn rules_and_statistics_follow_the_triggers() {
        let mut m = invoice();
        m.relations[0].rules.push(super::super::trigger::Rule {
            name: "keep".into(),
            definition: "CREATE RULE keep AS ON DELETE TO sales.invoice DO INSTEAD NOTHING".into(),
            enabled: "D".into(),
            comment: Some("kept".into()),
        });
        m.relations[0]
            .statistics
            .push(super::super::statistics::StatisticsDef {
                name: TableName::new("sales", "invoice_stats"),
                definition: "CREATE STATISTICS sales.invoice_stats ON id, day FROM sales.invoice"
                    .into(),
                target: Some(500),
                access: Access {
                    owner: Some("stats_owner".into()),
                    acl: None,
                },
                comment: None,
            });
        let plan = Plan::new(vec![&m], AccessOptions::default());
        let finish = plan.finish_statements(0);
        let at = |s: &str| finish.iter().position(|f| f.starts_with(s)).unwrap();
        assert!(at("CREATE RULE keep") < at("ALTER TABLE \"sales\".\"invoice\" DISABLE RULE"));
        assert!(finish
            .contains(&"COMMENT ON RULE \"keep\" ON \"sales\".\"invoice\" IS 'kept'".to_string()));
        assert!(
            at("CREATE STATISTICS")
                < at("ALTER STATISTICS \"sales\".\"invoice_stats\" SET STATISTICS 500")
        );
        assert!(plan.required_roles().contains("stats_owner"));
    }
}
