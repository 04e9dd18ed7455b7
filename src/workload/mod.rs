//! The e-invoice workload behind `einvoice-gen`: the schema, a deterministic generator of
//! realistic invoices, a bulk fill by COPY, and a steady change stream.
//!
//! Benchmarks and demos build on its two promises: the same seed and sizes give byte-for-byte
//! the same tables, and invoice numbers grow in generation order, so recent invoices (the ones
//! that get voided, credited and corrected) sit at the recent end of the key order.

pub mod fill;
pub mod generate;
pub mod load;
mod rows;
pub mod schema;

pub use fill::{fill, FillOptions, FillReport};
pub use generate::Plan;
pub use load::{load, LoadOptions, LoadReport, Mix};

use crate::pg::PgError;

/// A workload failure: the database, or an option the workload cannot honour.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("{tables} on {target} already hold rows; fill an empty database, or pass --replace to empty the tables first")]
    NotEmpty { tables: String, target: String },
    #[error("{0}")]
    Invalid(String),
}
