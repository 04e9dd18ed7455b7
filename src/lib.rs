//! invsync: keeps Taiwan's e-invoice data in sync and safe across clouds.
//!
//! The library holds all behaviour; `src/bin/invsync.rs` only parses options and renders output.

pub mod agent;
pub mod backup;
pub mod cdc;
pub mod check;
pub mod config;
pub mod pg;
pub mod recovery;
pub mod sync;
pub mod verify;
pub mod workload;
