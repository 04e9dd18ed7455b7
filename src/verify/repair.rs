//! Repair SQL: statements that make the target hold exactly the source's rows.
//!
//! Invariants: the file is written beside its final name and renamed into place only when
//! complete, so a failed run never leaves a file that looks whole; the statements run in one
//! transaction, deletes first (freeing unique values), then updates, then inserts; generated
//! columns are never written (the target computes them). Statements are spooled to files as
//! differences are found, so memory does not grow with their number.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::db::{Difference, DifferenceKind};
use super::VerifyError;
use crate::pg::keyrange::{typed_literal, Shape};

pub(crate) struct RepairFile {
    path: PathBuf,
    partial: PathBuf,
    out: BufWriter<File>,
    /// The statements of the table being verified, by section, until the table ends.
    table: Option<TableSections>,
}

/// The order statements of one table run in: deletes free unique values for updates and
/// inserts, updates before inserts likewise.
#[derive(Clone, Copy)]
enum Section {
    Delete = 0,
    Update = 1,
    Insert = 2,
}

/// One table's statements, each section spooled to its own file beside the partial file, so
/// memory holds none of them however many rows differ.
struct TableSections {
    heading: String,
    files: [(PathBuf, Option<BufWriter<File>>); 3],
}

fn io_error(path: &Path, e: std::io::Error) -> VerifyError {
    VerifyError::RepairFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

impl RepairFile {
    pub fn create(path: &Path) -> Result<RepairFile, VerifyError> {
        let partial = suffixed(path, ".partial");
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
            table: None,
        })
    }

    /// Adds the statement fixing one difference of the table `shape` (the table being
    /// verified; [`RepairFile::end_table`] closes it).
    pub fn add(&mut self, shape: &Shape, difference: &Difference) -> Result<(), VerifyError> {
        let Some((section, sql)) = statement(shape, difference) else {
            return Ok(());
        };
        let table = self.table.get_or_insert_with(|| TableSections {
            heading: format!("-- {}\n", shape.table),
            files: [".delete", ".update", ".insert"].map(|s| (suffixed(&self.partial, s), None)),
        });
        let (spool, writer) = &mut table.files[section as usize];
        if writer.is_none() {
            *writer = Some(BufWriter::new(
                File::create(&*spool).map_err(|e| io_error(&self.path, e))?,
            ));
        }
        if let Some(w) = writer {
            w.write_all(sql.as_bytes())
                .map_err(|e| io_error(&self.path, e))?;
        }
        Ok(())
    }

    /// Appends the table's statements, section by section, and removes the spool files.
    pub fn end_table(&mut self) -> Result<(), VerifyError> {
        let Some(table) = self.table.take() else {
            return Ok(());
        };
        let fail = |e| io_error(&self.path, e);
        self.out.write_all(table.heading.as_bytes()).map_err(fail)?;
        for (spool, writer) in table.files {
            let Some(writer) = writer else { continue };
            writer.into_inner().map_err(|e| fail(e.into_error()))?;
            let mut f = File::open(&spool).map_err(fail)?;
            std::io::copy(&mut f, &mut self.out).map_err(fail)?;
            std::fs::remove_file(&spool).map_err(fail)?;
        }
        Ok(())
    }

    /// Ends the transaction and moves the file into place; returns its path.
    pub fn finish(mut self) -> Result<String, VerifyError> {
        self.end_table()?;
        writeln!(self.out, "COMMIT;").map_err(|e| io_error(&self.path, e))?;
        self.out.flush().map_err(|e| io_error(&self.path, e))?;
        std::fs::rename(&self.partial, &self.path).map_err(|e| io_error(&self.path, e))?;
        Ok(self.path.display().to_string())
    }
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// The statement fixing one difference, and the section it belongs to. None when nothing can
/// be written (a change only in generated columns, a missing row without its source row).
fn statement(shape: &Shape, d: &Difference) -> Option<(Section, String)> {
    let value = |v: &Option<String>, type_name: &str| match v {
        Some(v) => typed_literal(v, type_name),
        None => "NULL".to_string(),
    };
    let key_match = shape
        .key
        .iter()
        .zip(&d.key_values)
        .map(|(c, v)| format!("{} = {}", c.quoted, typed_literal(v, &c.type_name)))
        .collect::<Vec<_>>()
        .join(" AND ");
    match d.kind {
        DifferenceKind::Extra => Some((
            Section::Delete,
            format!("DELETE FROM {} WHERE {key_match};\n", shape.quoted),
        )),
        DifferenceKind::Changed => {
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
            (!sets.is_empty()).then(|| {
                (
                    Section::Update,
                    format!(
                        "UPDATE {} SET {} WHERE {key_match};\n",
                        shape.quoted,
                        sets.join(", ")
                    ),
                )
            })
        }
        DifferenceKind::Missing => {
            let row = d.source_row.as_ref()?;
            let writable = shape.columns.iter().zip(row).filter(|(c, _)| !c.generated);
            let (names, values): (Vec<&str>, Vec<String>) = writable
                .map(|(c, v)| (c.quoted.as_str(), value(v, &c.type_name)))
                .unzip();
            Some((
                Section::Insert,
                format!(
                    "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({});\n",
                    shape.quoted,
                    names.join(", "),
                    values.join(", ")
                ),
            ))
        }
    }
}
