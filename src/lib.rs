//! pixbatch: a durable batch job orchestrator for paid AI image APIs.
//!
//! The binary (`src/main.rs`) is a thin shell over this library. See
//! `docs/ARCHITECTURE.md` for the map of the modules and the invariants.

pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod cost;
pub mod demo;
pub mod download;
pub mod engine;
pub mod failpoint;
// The fuzz targets' checks assert by design: compiled only for tests and for
// cargo-fuzz (which passes `--cfg fuzzing`), never into the shipped binary.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
pub mod intake;
pub mod lock;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod progress;
pub mod providers;
pub mod query;
pub mod rate;
pub mod report;
pub mod sim;
pub mod store;
pub mod verify;
pub mod versions;
pub mod wait;
