//! How a task function travels between ranks: the one place that names a function by a
//! [`FunctionId`] on rank 0 and calls it from that id on a worker rank.
//!
//! Every rank runs the same executable (checked at start with [`image_fingerprint`]), so
//! mp-core's ids, addresses relative to a fixed symbol of the image, name the same function on
//! every rank. What this module relies on from mp-core, and nothing else:
//!
//! * [`FunctionId::of_task`] of a non-capturing `fn(Vec<A>) -> Vec<R>` and its serde form;
//! * [`FunctionId::call_task`] on postcard bytes, which catches panics as
//!   [`TaskFailure::Panicked`];
//! * ids are equal on every process running the same executable.
//!
//! If mp-core makes ids unforgeable (for instance a per-run key checked when an id is
//! decoded), worker ranks need rank 0's key: [`image_fingerprint`] is exchanged at start
//! (rank 0 → every rank, see `session.rs`) and is where the key would travel.

use mp_core::{Entry, FunctionId, TaskFailure};

/// The id of the chunk trampoline of `F`: postcard `Vec<F::Args>` in, postcard
/// `Vec<F::Output>` out. One message, one decode and one encode per chunk of items.
pub(crate) fn chunk_function<M: 'static, F: Entry<M>>(_: &F) -> FunctionId {
    FunctionId::of_task(&run_chunk::<M, F>)
}

/// Runs `F` on every argument of a chunk.
fn run_chunk<M, F: Entry<M>>(args: Vec<F::Args>) -> Vec<F::Output> {
    let function = F::recreate();
    args.into_iter().map(|a| function.call(a)).collect()
}

/// Runs a chunk a worker rank received: `input` is the postcard-encoded `Vec` of arguments.
pub(crate) fn run_chunk_by_id(function: FunctionId, input: &[u8]) -> Result<Vec<u8>, TaskFailure> {
    // SAFETY: `call_task` needs an id made by `FunctionId::of_task` in a process running this
    // executable. The id was made by `chunk_function` on rank 0 (the only sender of tasks,
    // over the job's own communicator), and the start-up handshake refused to serve unless
    // rank 0 runs the same executable (`image_fingerprint`; an MPMD launch is an error).
    unsafe { function.call_task(input) }
}

/// A value that differs between executables with overwhelming likelihood: the ids of two
/// functions of this image (their distance from mp-core's anchor depends on the whole link
/// layout) and the program's file name. Rank 0 compares every rank's against its own before
/// any task is sent.
pub(crate) fn image_fingerprint() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    FunctionId::of_task(&image_probe).hash(&mut hasher);
    FunctionId::of_task(&|s: String| s.len()).hash(&mut hasher);
    std::env::args_os()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(std::path::Path::file_name)
        .hash(&mut hasher);
    hasher.finish()
}

/// A function whose id enters the fingerprint.
fn image_probe(x: u64) -> u64 {
    x.rotate_left(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(x: u64) -> u64 {
        x * x
    }

    #[test]
    fn a_chunk_runs_through_its_id() {
        let id = chunk_function(&square);
        let input = postcard::to_allocvec(&vec![1u64, 2, 3]).unwrap();
        let output = run_chunk_by_id(id, &input).unwrap();
        assert_eq!(
            postcard::from_bytes::<Vec<u64>>(&output).unwrap(),
            [1, 4, 9]
        );
    }

    #[test]
    fn a_panic_is_a_report_and_bad_input_an_error() {
        let picky = |x: u32| -> u32 {
            assert!(x != 2, "two is not allowed");
            x
        };
        let input = postcard::to_allocvec(&vec![1u32, 2]).unwrap();
        match run_chunk_by_id(chunk_function(&picky), &input) {
            Err(TaskFailure::Panicked(report)) => {
                assert!(report.message.contains("two is not allowed"));
            }
            other => panic!("expected a panic report, got {other:?}"),
        }
        assert!(matches!(
            run_chunk_by_id(chunk_function(&square), &[0xff, 0xff]),
            Err(TaskFailure::BadArguments(_))
        ));
    }

    #[test]
    fn the_fingerprint_is_stable_in_one_image() {
        assert_eq!(image_fingerprint(), image_fingerprint());
    }
}
