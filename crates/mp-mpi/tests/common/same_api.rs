//! The checks written once against [`Executor`]: run on the local pool by the unit tests
//! (`src/executor.rs`) and on the MPI pool by `tests/mpi_pool.rs`.

use std::time::Duration;

use super::{Executor, Pending};

/// The task most checks run.
pub(crate) fn square(x: u64) -> u64 {
    x * x
}

/// Every operation of the trait, on any backend.
pub(crate) fn same_api<P: Executor>(pool: &P) -> Result<(), P::Error> {
    assert_eq!(pool.map(square, 1..=5)?, [1, 4, 9, 16, 25]);
    let many: Vec<u64> = (0..10_000).collect();
    assert_eq!(
        pool.map(square, many.clone())?,
        many.iter().map(|&x| square(x)).collect::<Vec<_>>()
    );
    assert_eq!(
        pool.chunksize(2).map(square, 0..7)?,
        (0..7).map(square).collect::<Vec<_>>()
    );
    assert_eq!(
        pool.starmap(|(a, b): (u32, u32)| a * b, [(2, 3), (4, 5)])?,
        [6, 20]
    );
    assert_eq!(pool.apply(square, 9)?, 81);
    let (tx, rx) = std::sync::mpsc::channel();
    let products = pool
        .chunksize(1)
        .starmap_async(|(a, b): (u32, u32)| a * b, [(2, 3), (4, 5)])?
        .callback(move |values: &Vec<u32>| tx.send(values.clone()).unwrap());
    let called = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(called, [6, 20]);
    assert_eq!(products.successful(), Some(true));
    assert_eq!(products.get()?, [6, 20]);
    assert_eq!(
        pool.submit(square, 3)?
            .get_timeout(Duration::from_secs(30))?,
        9
    );
    assert_eq!(pool.map(square, Vec::new())?, Vec::<u64>::new());
    let ordered: Vec<u64> = pool.imap(square, 0..50).collect::<Result<_, _>>()?;
    assert_eq!(ordered, (0..50).map(square).collect::<Vec<_>>());
    let mut unordered: Vec<u64> = pool
        .chunksize(3)
        .imap_unordered(square, 0..50)
        .collect::<Result<_, _>>()?;
    unordered.sort_unstable();
    assert_eq!(unordered, ordered);
    let failed = pool
        .apply(|x: u32| -> u32 { panic!("bad {x}") }, 4)
        .unwrap_err();
    assert!(failed.to_string().contains("bad 4"), "{failed}");
    Ok(())
}
