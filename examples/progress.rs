//! A progress bar over a long `imap`. The iterator knows how many results are left (its
//! `size_hint` is exact when the input's is), so indicatif's `ProgressIterator` draws a bar
//! with a rate and an ETA, and results stream in as the workers finish them.
//!
//! ```text
//! cargo run --release --example progress
//! ```

use std::time::Duration;

use indicatif::{ProgressIterator, ProgressStyle};
use multiproc::mp_pool::{Pool, PoolError};

/// A task of a couple of milliseconds: is `n` prime?
fn is_prime(n: u64) -> bool {
    std::thread::sleep(Duration::from_millis(2));
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn main() -> Result<(), PoolError> {
    let pool = Pool::new(multiproc::cpu_count())?;
    let numbers = 1_000_000..1_002_000u64;
    let style = ProgressStyle::with_template("{bar:40} {pos}/{len} tasks, {per_sec}, ETA {eta}")
        .expect("a valid template");
    let results = pool
        .imap(is_prime, numbers.clone())
        .try_progress()
        .expect("imap over a range knows its length")
        .with_style(style);
    let mut primes = Vec::new();
    for (n, prime) in numbers.zip(results) {
        if prime? {
            primes.push(n);
        }
    }
    println!(
        "{} primes between 1,000,000 and 1,002,000, the first {:?}",
        primes.len(),
        &primes[..3]
    );
    pool.close();
    pool.join()
}
