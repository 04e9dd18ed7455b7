//! Verification. (On this branch only the repository check; the `verify` branch owns this
//! file and adds `db`.)

pub mod repo;
