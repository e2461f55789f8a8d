//! Integration tests: the real `pixbatch` binary against `pixbatch sim` on loopback.
//! One test binary (ripgrep's layout), one module per subject.

mod common;

mod answers;
mod budget;
mod crash;
mod demo;
mod dzine;
mod halt;
mod lifecycle;
mod limits;
mod live_apis;
mod live_reads;
mod manifest;
mod metrics;
mod ops;
mod outputs;
mod perfect;
mod polish;
mod report_html;
mod reports;
mod secrets;
mod security;
mod shell;
mod soak;
mod storage;
mod topaz_live;
mod watch;
