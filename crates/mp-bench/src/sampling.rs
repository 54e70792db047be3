//! Budgeted sampling, shared by every measurement this binary makes.
//!
//! The same rules are implemented by `benches/python/mp_bench.py`, so both
//! sides of a row are sampled alike: repeat timed samples until the budget is
//! spent (at least [`MIN_SAMPLES`], unless one sample alone takes three times
//! the budget) and report the median; throughput samples are batches sized to
//! last about a fifth of the budget.

use std::time::{Duration, Instant};

pub use crate::rigs::BenchResult;

/// Fewest samples a measurement takes when one sample fits in the budget.
pub const MIN_SAMPLES: usize = 3;

/// How long one side of one workload may measure, and at which size.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Time to spend sampling (one repetition of one side).
    pub budget: Duration,
    /// A `--quick` run: workloads with a fixed item count use a smaller one.
    pub quick: bool,
}

/// Calls `one_sample` (which returns one figure) until the budget is spent.
pub fn sample_for(
    budget: Duration,
    one_sample: impl FnMut() -> BenchResult<f64>,
) -> BenchResult<Vec<f64>> {
    let start = Instant::now();
    sample_until(budget, || start.elapsed(), one_sample)
}

/// [`sample_for`] against any clock (`elapsed` returns the time since the start).
fn sample_until(
    budget: Duration,
    mut elapsed: impl FnMut() -> Duration,
    mut one_sample: impl FnMut() -> BenchResult<f64>,
) -> BenchResult<Vec<f64>> {
    let mut samples = Vec::new();
    loop {
        samples.push(one_sample()?);
        let elapsed = elapsed();
        if (elapsed >= budget && samples.len() >= MIN_SAMPLES) || elapsed >= 3 * budget {
            return Ok(samples);
        }
    }
}

/// Finds a batch size (starting from `start`) whose batch lasts about a fifth
/// of the budget; `run_batch(k)` runs k operations and returns how long they took.
pub fn batch_size_for(
    budget: Duration,
    start: u64,
    mut run_batch: impl FnMut(u64) -> BenchResult<Duration>,
) -> BenchResult<u64> {
    let target = budget.as_secs_f64() / 5.0;
    let mut k = start.max(1);
    loop {
        let took = run_batch(k)?.as_secs_f64();
        if took >= target || k >= 1 << 40 {
            return Ok(k);
        }
        // Jump close to the target at once when the batch is far too short.
        let scale = (target / took.max(1e-9)).clamp(2.0, 64.0);
        k = (k as f64 * scale) as u64;
    }
}

/// Per-operation cost in `unit_per_sec` units (1e9 for ns, 1e6 for µs) of
/// batches of `run_batch`, sized and sampled within the budget.
pub fn per_op(
    params: &Params,
    start: u64,
    unit_per_sec: f64,
    mut run_batch: impl FnMut(u64) -> BenchResult<Duration>,
) -> BenchResult<Vec<f64>> {
    let k = batch_size_for(params.budget, start, &mut run_batch)?;
    sample_for(params.budget, || {
        Ok(run_batch(k)?.as_secs_f64() / k as f64 * unit_per_sec)
    })
}

/// Throughput of batches of `run_batch`: `per_item` units (bytes, messages...)
/// per operation, reported in units of `scale` per second (1e9 for GB/s).
pub fn throughput(
    params: &Params,
    start: u64,
    per_item: f64,
    scale: f64,
    mut run_batch: impl FnMut(u64) -> BenchResult<Duration>,
) -> BenchResult<Vec<f64>> {
    let k = batch_size_for(params.budget, start, &mut run_batch)?;
    sample_for(params.budget, || {
        Ok(k as f64 * per_item / run_batch(k)?.as_secs_f64() / scale)
    })
}

/// Times one call of `f`.
pub fn timed<T>(f: impl FnOnce() -> BenchResult<T>) -> BenchResult<Duration> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed())
}

/// Median of the samples (mean of the middle two for an even count);
/// `None` for no samples.
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn batch_size_grows_until_a_batch_fills_a_fifth_of_the_budget() {
        // A fake clock: each operation "takes" 1 ms.
        let budget = Duration::from_millis(500);
        let k = batch_size_for(budget, 1, |k| Ok(Duration::from_millis(k))).unwrap();
        assert!(k >= 100, "batch of {k} ms is shorter than budget/5");
        assert!(k < 100 * 64, "overshot: {k}");
    }

    #[test]
    fn sampling_takes_at_least_min_samples_and_stops_on_a_slow_sample() {
        // A fake clock on which every sample takes `step_ms`.
        fn tick(step_ms: u64) -> impl FnMut() -> Duration {
            let mut clock = Duration::ZERO;
            move || {
                clock += Duration::from_millis(step_ms);
                clock
            }
        }
        let budget = Duration::from_millis(10);
        let n = sample_until(budget, tick(9), || Ok(1.0)).unwrap();
        assert_eq!(n.len(), MIN_SAMPLES, "9 ms samples in a 10 ms budget");
        let slow = sample_until(budget, tick(31), || Ok(1.0)).unwrap();
        assert_eq!(slow.len(), 1, "one sample over 3x the budget ends sampling");
        let fast = sample_until(budget, tick(1), || Ok(1.0)).unwrap();
        assert_eq!(fast.len(), 10, "1 ms samples fill a 10 ms budget");
    }

    #[test]
    fn errors_propagate() {
        let err = sample_for(Duration::from_secs(1), || Err("boom".into())).unwrap_err();
        assert_eq!(err.to_string(), "boom");
    }
}
