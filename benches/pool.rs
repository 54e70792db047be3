//! Criterion benches of mp-pool's Pool (create, map, apply, CPU speedup): the
//! figures behind the mp-pool benchmark targets. The side-by-side comparison
//! with CPython is `mp-bench compare`.
//!
//! (The benches are wired in as the pool lands.)

fn main() {}
