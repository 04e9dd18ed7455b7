//! Key ranges and the SQL that compares them: which rows of a table a range holds, how a row is
//! rendered for hashing, and how rows are sorted into buckets by sampled key boundaries.
//!
//! Invariants: a range is `lo <= key < hi` under the server's own ordering of the key, with an
//! absent bound meaning unbounded, so the buckets of one split cover their parent range exactly.
//! Keys travel as the text of each key column and come back into SQL as typed literals
//! (`'v'::type`), which round-trips every type a primary key can have, composite keys included.
//! Every row is rendered as `ROW(col, ...)::text` over the source's column order, under the
//! session settings [`super::side`] fixes, so both sides hash byte-identical text for equal rows.

use crate::pg::{quote_ident, quote_literal, TableInfo, TableName};

/// A key: the text of each key column, in key order.
pub(crate) type Key = Vec<String>;

/// One column as verification uses it.
#[derive(Debug, Clone)]
pub(crate) struct Col {
    pub name: String,
    pub quoted: String,
    pub type_name: String,
    /// Generated columns are compared but never written by repair SQL.
    pub generated: bool,
}

/// A table as both sides agree on it: the columns to compare, the key, the row filter.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    pub table: TableName,
    pub quoted: String,
    pub key: Vec<Col>,
    pub columns: Vec<Col>,
    filter: Option<String>,
}

/// `lo <= key < hi`; `None` is unbounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyRange {
    pub lo: Option<Key>,
    pub hi: Option<Key>,
}

impl KeyRange {
    /// The ranges between consecutive `boundaries` (ascending) inside `self`.
    pub fn split(&self, boundaries: &[Key]) -> Vec<KeyRange> {
        let mut edges: Vec<Option<Key>> = vec![self.lo.clone()];
        edges.extend(boundaries.iter().cloned().map(Some));
        edges.push(self.hi.clone());
        edges
            .windows(2)
            .map(|w| KeyRange {
                lo: w[0].clone(),
                hi: w[1].clone(),
            })
            .collect()
    }
}

impl Shape {
    /// Compares the two descriptions; the source's column order is the rendering order.
    /// Returns a one-line description of the first mismatch.
    pub fn agree(
        source: &TableInfo,
        target: &TableInfo,
        filter: Option<String>,
    ) -> Result<Shape, String> {
        let col = |c: &crate::pg::Column| Col {
            name: c.name.clone(),
            quoted: quote_ident(&c.name),
            type_name: c.type_name.clone(),
            generated: c.generated.is_some(),
        };
        let mut problems = Vec::new();
        for s in &source.columns {
            match target.columns.iter().find(|t| t.name == s.name) {
                None => problems.push(format!("column {} is missing on the target", s.name)),
                Some(t) if t.type_name != s.type_name => problems.push(format!(
                    "column {} is {} on the source but {} on the target",
                    s.name, s.type_name, t.type_name
                )),
                Some(_) => {}
            }
        }
        for t in &target.columns {
            if !source.columns.iter().any(|s| s.name == t.name) {
                problems.push(format!("column {} exists only on the target", t.name));
            }
        }
        if source.primary_key != target.primary_key {
            problems.push(format!(
                "the primary key is ({}) on the source but ({}) on the target",
                source.primary_key.join(", "),
                target.primary_key.join(", ")
            ));
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let columns: Vec<Col> = source.columns.iter().map(col).collect();
        Ok(Shape::new(
            &source.name,
            columns,
            &source.primary_key,
            filter,
        ))
    }

    /// The shape of `table` with `columns` and the key columns named by `primary_key`.
    pub fn new(
        table: &TableName,
        columns: Vec<Col>,
        primary_key: &[String],
        filter: Option<String>,
    ) -> Shape {
        let key = primary_key
            .iter()
            .filter_map(|k| columns.iter().find(|c| &c.name == k).cloned())
            .collect();
        Shape {
            table: table.clone(),
            quoted: table.quoted(),
            key,
            columns,
            filter,
        }
    }

    /// `"a"` or `("a", "b")`: the key as one comparable SQL value.
    fn key_expr(&self) -> String {
        let cols: Vec<&str> = self.key.iter().map(|c| c.quoted.as_str()).collect();
        if cols.len() == 1 {
            cols[0].to_string()
        } else {
            format!("({})", cols.join(", "))
        }
    }

    /// A key as a typed SQL value comparable with [`Shape::key_expr`].
    fn key_value(&self, key: &Key) -> String {
        let vals: Vec<String> = self
            .key
            .iter()
            .zip(key)
            .map(|(c, v)| typed_literal(v, &c.type_name))
            .collect();
        if vals.len() == 1 {
            vals[0].clone()
        } else {
            format!("({})", vals.join(", "))
        }
    }

    /// The WHERE clause selecting `range` and the user's filter. A composite key's bounds also
    /// bound its first column (implied, so the rows are the same): the planner estimates row
    /// comparisons poorly (a third of the table) and would scan the whole table for a small
    /// range, but estimates a single column from its statistics.
    pub fn range_where(&self, range: &KeyRange) -> String {
        let mut parts = Vec::new();
        let first = |key: &Key, op: &str| match (self.key.first(), key.first()) {
            (Some(c), Some(v)) if self.key.len() > 1 => Some(format!(
                "{} {op} {}",
                c.quoted,
                typed_literal(v, &c.type_name)
            )),
            _ => None,
        };
        if let Some(lo) = &range.lo {
            parts.push(format!("{} >= {}", self.key_expr(), self.key_value(lo)));
            parts.extend(first(lo, ">="));
        }
        if let Some(hi) = &range.hi {
            parts.push(format!("{} < {}", self.key_expr(), self.key_value(hi)));
            parts.extend(first(hi, "<="));
        }
        if let Some(f) = &self.filter {
            parts.push(format!("({f})"));
        }
        if parts.is_empty() {
            "TRUE".into()
        } else {
            parts.join(" AND ")
        }
    }

    /// The user's filter alone (for lookups by key).
    pub fn filter_and(&self) -> String {
        match &self.filter {
            Some(f) => format!(" AND ({f})"),
            None => String::new(),
        }
    }

    /// A 64-bit hash of the row's canonical text. Summed per range (as numeric, so exact) it is
    /// independent of row order; the row text includes the key, so values moving between rows
    /// change the sum.
    pub fn row_hash(&self) -> String {
        let cols: Vec<&str> = self.columns.iter().map(|c| c.quoted.as_str()).collect();
        format!("hashtextextended(ROW({})::text, 0)", cols.join(", "))
    }

    /// The key columns as text, for SELECT lists.
    pub fn key_text(&self) -> String {
        self.key
            .iter()
            .map(|c| format!("{}::text", c.quoted))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The key columns, for ORDER BY.
    pub fn key_order(&self) -> String {
        self.key
            .iter()
            .map(|c| c.quoted.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every `step`-th key of `range` in key order (the keys of rows `step + 1`, `2 step + 1`, ...),
    /// read from the primary key index: boundaries cutting `range` into pieces of `step` rows.
    pub fn boundaries_sql(&self, range: &KeyRange, step: u64) -> String {
        let step = step.max(1);
        format!(
            "SELECT {} FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS rn FROM {} WHERE {}) s \
             WHERE rn > 1 AND rn % {step} = 1 ORDER BY rn",
            self.key_text(),
            self.key_order(),
            self.key_order(),
            self.quoted,
            self.range_where(range)
        )
    }

    /// A query returning whether `keys` are strictly ascending under the server's ordering of
    /// the key (true for fewer than two).
    pub fn ascending_sql(&self, keys: &[Key]) -> String {
        let values: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("({i}, {})", self.key_value(k)))
            .collect();
        if values.len() < 2 {
            return "SELECT true".into();
        }
        format!(
            "SELECT coalesce(bool_and(k < n), true) FROM (SELECT k, lead(k) OVER (ORDER BY i) AS n \
             FROM (VALUES {}) v(i, k)) s WHERE n IS NOT NULL",
            values.join(", ")
        )
    }

    /// An expression numbering the bucket (0..=boundaries.len()) a row falls in: a balanced
    /// CASE tree, so each row costs log2(buckets) key comparisons.
    pub fn bucket_expr(&self, boundaries: &[Key]) -> String {
        fn node(shape: &Shape, b: &[Key], first: usize, last: usize) -> String {
            if first == last {
                return first.to_string();
            }
            // Bucket i holds keys in [b[i-1], b[i]); split at the boundary opening bucket `mid`.
            let mid = (first + last).div_ceil(2);
            format!(
                "CASE WHEN {} < {} THEN {} ELSE {} END",
                shape.key_expr(),
                shape.key_value(&b[mid - 1]),
                node(shape, b, first, mid - 1),
                node(shape, b, mid, last)
            )
        }
        node(self, boundaries, 0, boundaries.len())
    }

    /// The keys as [`Shape::keys_join`] was asked for them, for SELECT lists: rows come back
    /// under the key as asked, so a key that is equal but written differently on a side
    /// (numeric 1.0 vs 1.00) still finds its row.
    pub fn lookup_key_text(&self) -> String {
        (0..self.key.len())
            .map(|i| format!("v.{}::text", lookup_column(i)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The lookup keys, for ORDER BY: the order of the table's key.
    pub fn lookup_key_order(&self) -> String {
        (0..self.key.len())
            .map(|i| format!("v.{}", lookup_column(i)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `(VALUES ...) AS v(...)`: a list of keys as typed values.
    pub fn keys_values(&self, keys: &[Key]) -> String {
        let rows: Vec<String> = keys
            .iter()
            .map(|k| {
                let vals: Vec<String> = self
                    .key
                    .iter()
                    .zip(k)
                    .map(|(c, v)| typed_literal(v, &c.type_name))
                    .collect();
                format!("({})", vals.join(", "))
            })
            .collect();
        let names: Vec<String> = (0..self.key.len()).map(lookup_column).collect();
        format!("(VALUES {}) AS v({})", rows.join(", "), names.join(", "))
    }

    /// A join clause matching rows to a list of keys ([`Shape::keys_values`]), which the
    /// planner turns into index lookups.
    pub fn keys_join(&self, keys: &[Key]) -> String {
        let on: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("t.{} = v.{}", c.quoted, lookup_column(i)))
            .collect();
        format!("JOIN {} ON {}", self.keys_values(keys), on.join(" AND "))
    }
}

/// The VALUES column holding key column `i` in [`Shape::keys_join`]; named so that it cannot
/// collide with a table's column.
fn lookup_column(i: usize) -> String {
    format!("invsync_k{i}")
}

/// `'text'::type`.
pub(crate) fn typed_literal(value: &str, type_name: &str) -> String {
    format!("{}::{type_name}", quote_literal(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(key: &[&str]) -> Shape {
        let col = |n: &str| Col {
            name: n.into(),
            quoted: quote_ident(n),
            type_name: "integer".into(),
            generated: false,
        };
        Shape {
            table: TableName::new("public", "t"),
            quoted: "\"public\".\"t\"".into(),
            key: key.iter().map(|k| col(k)).collect(),
            columns: vec![col("a"), col("b")],
            filter: None,
        }
    }

    #[test]
    fn split_covers_the_parent_range() {
        let r = KeyRange {
            lo: Some(vec!["1".into()]),
            hi: None,
        };
        let parts = r.split(&[vec!["5".into()], vec!["9".into()]]);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].lo, r.lo);
        assert_eq!(parts[0].hi, Some(vec!["5".to_string()]));
        assert_eq!(parts[2].lo, Some(vec!["9".to_string()]));
        assert_eq!(parts[2].hi, None);
    }

    #[test]
    fn bucket_tree_and_composite_ranges() {
        let s = shape(&["a"]);
        assert_eq!(s.bucket_expr(&[]), "0");
        assert_eq!(
            s.bucket_expr(&[vec!["5".into()]]),
            "CASE WHEN \"a\" < '5'::integer THEN 0 ELSE 1 END"
        );
        let c = shape(&["a", "b"]);
        let w = c.range_where(&KeyRange {
            lo: Some(vec!["1".into(), "x'y".into()]),
            hi: None,
        });
        assert_eq!(
            w,
            "(\"a\", \"b\") >= ('1'::integer, 'x''y'::integer) AND \"a\" >= '1'::integer"
        );
    }
}
