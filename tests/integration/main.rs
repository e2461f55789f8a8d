//! Integration tests: the real `pixbatch` binary against `pixbatch sim` on loopback.
//! One test binary (ripgrep's layout), one module per subject.

mod common;

mod answers;
mod budget;
mod crash;
mod demo;
mod dzine;
mod lifecycle;
mod limits;
mod manifest;
mod metrics;
mod ops;
mod perfect;
mod polish;
mod report_html;
mod secrets;
mod security;
mod soak;
mod storage;
