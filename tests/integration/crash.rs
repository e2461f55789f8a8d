//! Crash-and-chaos soaks (the harness is `soak.rs`).

use crate::soak::{soak, LARGE, SMALL};

/// 120 jobs over all five providers with every chaos option on, killed at random
/// moments and at each failpoint, restarted, run to the end.
#[test]
fn killed_at_random_moments_and_chosen_points_it_resumes_without_paying_twice() {
    let f = soak(&SMALL);
    assert!(
        f.kills() >= 6,
        "only {} kills: {}",
        f.kills(),
        f.summary("small")
    );
}

/// The large preset, by hand:
/// `cargo test --test integration soak_large -- --ignored --nocapture`.
#[test]
#[ignore = "takes many minutes; run by hand (docs/RELIABILITY.md)"]
fn soak_large() {
    let f = soak(&LARGE);
    assert!(
        f.kills() >= 50,
        "only {} kills: {}",
        f.kills(),
        f.summary("large")
    );
}
