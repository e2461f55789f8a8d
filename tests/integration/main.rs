//! Integration tests: the real `pixbatch` binary against `pixbatch sim` on loopback.
//! One test binary (ripgrep's layout), one module per subject.

mod common;

mod answers;
mod crash;
mod demo;
mod dzine;
mod lifecycle;
mod limits;
mod manifest;
mod perfect;
mod secrets;
mod security;
