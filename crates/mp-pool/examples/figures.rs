//! Quick figures for the mp-pool targets (medians of a few runs). For the real comparison
//! use `cargo run --release -p mp-bench -- compare --filter pool`.
//!
//! ```text
//! cargo run --release -p mp-pool --example figures
//! ```

use std::time::{Duration, Instant};

use mp_core::StartMethod;
use mp_pool::Pool;

fn square(x: u64) -> u64 {
    x * x
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn sample(runs: usize, mut one: impl FnMut() -> f64) -> f64 {
    median((0..runs).map(|_| one()).collect())
}

fn main() {
    for method in [StartMethod::Spawn, StartMethod::ForkServer] {
        let ms = sample(21, || {
            let start = Instant::now();
            let pool = Pool::builder()
                .processes(2)
                .start_method(method)
                .build()
                .unwrap();
            pool.apply(square, 3).unwrap();
            pool.close();
            pool.join().unwrap();
            start.elapsed().as_secs_f64() * 1e3
        });
        println!("Pool(2) create + apply + close + join, {method:<10}: {ms:8.2} ms");
    }
    let pool = Pool::new(2).unwrap();
    pool.map(square, 0..1000u64).unwrap();
    let rate = sample(15, || {
        let start = Instant::now();
        let out = pool.map(square, 0..1_000_000u64).unwrap();
        assert_eq!(out.len(), 1_000_000);
        1e6 / start.elapsed().as_secs_f64() / 1e6
    });
    println!("map x*x, 1 M items, default chunks:        {rate:8.1} M items/s");
    let rate = sample(9, || {
        let start = Instant::now();
        let out = pool.chunksize(1).map(square, 0..100_000u64).unwrap();
        assert_eq!(out.len(), 100_000);
        1e5 / start.elapsed().as_secs_f64() / 1e6
    });
    println!("map x*x, 100 k items, chunksize 1:        {rate:8.2} M items/s");
    let us = sample(15, || {
        let start = Instant::now();
        for i in 0..2000 {
            pool.apply(square, i).unwrap();
        }
        start.elapsed().as_secs_f64() * 1e6 / 2000.0
    });
    println!("apply round trip:                         {us:8.2} us");
    let _ = Duration::ZERO;
}
