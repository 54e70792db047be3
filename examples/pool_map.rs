//! Seed Q5: create a pool of 4 worker processes and map a function over some inputs.
//!
//! Python:
//! ```python
//! with multiprocessing.Pool(processes=4) as pool:
//!     print(pool.map(square, [1, 2, 3, 4, 5]))
//! ```
//!
//! Run with `cargo run --example pool_map`; prints `[1, 4, 9, 16, 25]`.

use multiproc::mp_pool::{Pool, PoolError};

/// The task: runs in a worker process.
fn square(x: u64) -> u64 {
    x * x
}

fn main() -> Result<(), PoolError> {
    let pool = Pool::new(4)?;
    let results = pool.map(square, [1, 2, 3, 4, 5])?;
    println!("{results:?}");
    pool.close();
    pool.join()
}
