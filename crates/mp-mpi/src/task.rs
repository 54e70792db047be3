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
//! * ids carry a tag made with the run's secret key ([`mp_core::run_key`]) and are refused when
//!   decoded under another key, so every rank adopts rank 0's key at start
//!   ([`share_run_key`], before the fingerprint check in `session.rs`).

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

/// Gives every rank rank 0's run key (broadcast over the job's own communicator), so that the
/// ids rank 0 sends are accepted by the workers. Returns false on a rank that had already made
/// or adopted another key (it must then refuse to serve).
pub(crate) fn share_run_key(root: &impl mpi::collective::Root, is_root: bool) -> bool {
    /// Room for the key's postcard form (32 bytes) and its length.
    const KEY_BUFFER: usize = 64;
    let mut buffer = [0u8; KEY_BUFFER];
    if is_root {
        let key = postcard::to_allocvec(&mp_core::run_key()).expect("a run key encodes");
        buffer[0] = u8::try_from(key.len()).expect("a run key is short");
        buffer[1..=key.len()].copy_from_slice(&key);
    }
    root.broadcast_into(&mut buffer[..]);
    if is_root {
        return true;
    }
    let length = usize::from(buffer[0]).min(KEY_BUFFER - 1);
    let Ok(key) = postcard::from_bytes::<mp_core::RunKey>(&buffer[1..=length]) else {
        tracing::error!("rank 0's run key does not decode: not serving");
        return false;
    };
    // SAFETY: `adopt_run_key` asks that the key come from a peer running this same
    // executable. It comes from rank 0 of this job; whether rank 0 runs the same executable is
    // checked right after (`image_fingerprint`, gathered and compared by rank 0) and no id is
    // decoded, let alone called, before that check passes.
    match unsafe { mp_core::adopt_run_key(key) } {
        Ok(()) => true,
        Err(conflict) => {
            tracing::error!(%conflict, "this rank already has another run key: not serving");
            false
        }
    }
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
