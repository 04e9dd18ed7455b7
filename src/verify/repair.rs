//! Repair SQL: statements that make the target hold exactly the source's rows.
//!
//! Invariants: the file is written beside its final name and renamed into place only when
//! complete, so a failed run never leaves a file that looks whole; the statements run in one
//! transaction, deletes first (freeing unique values), then updates, then inserts; generated
//! columns are never written (the target computes them).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::db::{Difference, DifferenceKind};
use super::keyrange::{typed_literal, Shape};
use super::VerifyError;

pub(crate) struct RepairFile {
    path: PathBuf,
    partial: PathBuf,
    out: BufWriter<File>,
}

fn io_error(path: &Path, e: std::io::Error) -> VerifyError {
    VerifyError::RepairFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

impl RepairFile {
    pub fn create(path: &Path) -> Result<RepairFile, VerifyError> {
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::create(&partial).map_err(|e| io_error(path, e))?;
        let mut out = BufWriter::new(file);
        writeln!(
            out,
            "-- Written by `invsync verify db`: run on the target to make it match the source.\nBEGIN;"
        )
        .map_err(|e| io_error(path, e))?;
        Ok(RepairFile {
            path: path.to_path_buf(),
            partial,
            out,
        })
    }

    /// Appends the statements fixing `differences` of one table.
    pub fn write_table(
        &mut self,
        shape: &Shape,
        differences: &[Difference],
    ) -> Result<(), VerifyError> {
        if differences.is_empty() {
            return Ok(());
        }
        let text = statements(shape, differences);
        self.out
            .write_all(text.as_bytes())
            .map_err(|e| io_error(&self.path, e))
    }

    /// Ends the transaction and moves the file into place; returns its path.
    pub fn finish(mut self) -> Result<String, VerifyError> {
        writeln!(self.out, "COMMIT;").map_err(|e| io_error(&self.path, e))?;
        self.out.flush().map_err(|e| io_error(&self.path, e))?;
        std::fs::rename(&self.partial, &self.path).map_err(|e| io_error(&self.path, e))?;
        Ok(self.path.display().to_string())
    }
}

/// The statements for one table's differences.
pub(crate) fn statements(shape: &Shape, differences: &[Difference]) -> String {
    let value = |v: &Option<String>, type_name: &str| match v {
        Some(v) => typed_literal(v, type_name),
        None => "NULL".to_string(),
    };
    let key_match = |d: &Difference| {
        shape
            .key
            .iter()
            .zip(&d.key_values)
            .map(|(c, v)| format!("{} = {}", c.quoted, typed_literal(v, &c.type_name)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let mut out = format!("-- {}\n", shape.table);
    for d in differences
        .iter()
        .filter(|d| d.kind == DifferenceKind::Extra)
    {
        out.push_str(&format!(
            "DELETE FROM {} WHERE {};\n",
            shape.quoted,
            key_match(d)
        ));
    }
    for d in differences
        .iter()
        .filter(|d| d.kind == DifferenceKind::Changed)
    {
        let sets: Vec<String> = d
            .changes
            .iter()
            .filter_map(|ch| {
                let c = shape
                    .columns
                    .iter()
                    .find(|c| c.name == ch.column && !c.generated)?;
                Some(format!(
                    "{} = {}",
                    c.quoted,
                    value(&ch.source, &c.type_name)
                ))
            })
            .collect();
        if !sets.is_empty() {
            out.push_str(&format!(
                "UPDATE {} SET {} WHERE {};\n",
                shape.quoted,
                sets.join(", "),
                key_match(d)
            ));
        }
    }
    let writable: Vec<usize> = (0..shape.columns.len())
        .filter(|&i| !shape.columns[i].generated)
        .collect();
    let names: Vec<&str> = writable
        .iter()
        .map(|&i| shape.columns[i].quoted.as_str())
        .collect();
    for d in differences
        .iter()
        .filter(|d| d.kind == DifferenceKind::Missing)
    {
        let Some(row) = &d.source_row else { continue };
        let values: Vec<String> = writable
            .iter()
            .map(|&i| value(&row[i], &shape.columns[i].type_name))
            .collect();
        out.push_str(&format!(
            "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({});\n",
            shape.quoted,
            names.join(", "),
            values.join(", ")
        ));
    }
    out
}
