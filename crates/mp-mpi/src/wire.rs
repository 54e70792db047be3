//! The messages between rank 0 and the worker ranks, and their byte layout.
//!
//! All traffic is point to point on `MPI_COMM_WORLD` between rank 0 and one worker, so MPI's
//! non-overtaking rule keeps each worker's messages in order whatever their tag:
//!
//! | tag | direction | body |
//! |---|---|---|
//! | [`TASK`] | 0 → worker | `key: u64 LE`, `FunctionId` (postcard), arguments (postcard `Vec<A>`) |
//! | [`RESULT`] | worker → 0 | `key: u64 LE`, status byte, result (postcard `Vec<R>`) or `TaskFailure` (postcard) |
//! | [`STOP`] | 0 → worker | empty: finish the tasks received, answer [`STOPPED`], finalise MPI |
//! | [`STOPPED`] | worker → 0 | empty: nothing more will come from this worker |
//!
//! The arguments and results are written after a fixed header, so neither side copies them
//! into or out of an envelope.

use mp_core::{FunctionId, TaskFailure};
use mpi::Tag;

/// A chunk of work, rank 0 → worker.
pub(crate) const TASK: Tag = 1;
/// A chunk's outcome, worker → rank 0.
pub(crate) const RESULT: Tag = 2;
/// Rank 0 → worker: no more tasks.
pub(crate) const STOP: Tag = 3;
/// Worker → rank 0: acknowledges [`STOP`].
pub(crate) const STOPPED: Tag = 4;

/// The largest message MPI can carry in one call (its counts are `int`).
pub(crate) const MAX_MESSAGE: usize = i32::MAX as usize;

const OK: u8 = 0;
const FAILED: u8 = 1;

/// Starts a task message: the header, to which the caller appends the postcard arguments.
pub(crate) fn task_header(key: u64, function: FunctionId) -> Vec<u8> {
    let mut message = key.to_le_bytes().to_vec();
    // A FunctionId is plain data: encoding it into a Vec cannot fail.
    postcard::to_io(&function, &mut message).expect("a FunctionId encodes into a Vec");
    message
}

/// Splits a task message into its key, function and postcard arguments.
pub(crate) fn parse_task(message: &[u8]) -> Result<(u64, FunctionId, &[u8]), String> {
    let (key, rest) = split_key(message)?;
    let (function, arguments) =
        postcard::take_from_bytes::<FunctionId>(rest).map_err(|e| format!("task header: {e}"))?;
    Ok((key, function, arguments))
}

/// A result message.
pub(crate) fn result_message(key: u64, outcome: &Result<Vec<u8>, TaskFailure>) -> Vec<u8> {
    let mut message = key.to_le_bytes().to_vec();
    match outcome {
        Ok(bytes) => {
            message.push(OK);
            message.extend_from_slice(bytes);
        }
        Err(failure) => {
            message.push(FAILED);
            // A TaskFailure is strings: encoding it into a Vec cannot fail.
            postcard::to_io(failure, &mut message).expect("a TaskFailure encodes into a Vec");
        }
    }
    message
}

/// Splits a result message into its key and the outcome (postcard `Vec<R>` on success).
pub(crate) fn parse_result(message: &[u8]) -> Result<(u64, Result<&[u8], TaskFailure>), String> {
    let (key, rest) = split_key(message)?;
    match rest.split_first() {
        Some((&OK, bytes)) => Ok((key, Ok(bytes))),
        Some((&FAILED, bytes)) => postcard::from_bytes::<TaskFailure>(bytes)
            .map(|failure| (key, Err(failure)))
            .map_err(|e| format!("result of task {key}: {e}")),
        _ => Err(format!("result of task {key}: no valid status byte")),
    }
}

fn split_key(message: &[u8]) -> Result<(u64, &[u8]), String> {
    let (key, rest) = message
        .split_first_chunk::<8>()
        .ok_or_else(|| format!("a message of {} bytes has no header", message.len()))?;
    Ok((u64::from_le_bytes(*key), rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mp_core::PanicReport;

    #[test]
    fn a_task_survives_the_wire() {
        let id = FunctionId::of_task(&|x: u32| x + 1);
        let mut message = task_header(42, id);
        postcard::to_io(&vec![7u32, 8], &mut message).unwrap();
        let (key, function, arguments) = parse_task(&message).unwrap();
        assert_eq!((key, function), (42, id));
        assert_eq!(postcard::from_bytes::<Vec<u32>>(arguments).unwrap(), [7, 8]);
    }

    #[test]
    fn results_and_failures_survive_the_wire() {
        let ok = result_message(1, &Ok(vec![3, 4]));
        assert_eq!(parse_result(&ok).unwrap(), (1, Ok(&[3u8, 4][..])));
        let failure = TaskFailure::Panicked(PanicReport {
            message: "boom".into(),
            location: None,
            backtrace: None,
        });
        let failed = result_message(2, &Err(failure.clone()));
        assert_eq!(parse_result(&failed).unwrap(), (2, Err(failure)));
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(parse_task(&[1, 2, 3]).is_err());
        assert!(parse_result(&[]).is_err());
        assert!(parse_result(&7u64.to_le_bytes()).is_err());
        let mut bad_status = 7u64.to_le_bytes().to_vec();
        bad_status.push(9);
        assert!(parse_result(&bad_status).is_err());
        let mut bad_failure = 7u64.to_le_bytes().to_vec();
        bad_failure.extend([FAILED, 0xff, 0xff]);
        assert!(parse_result(&bad_failure).is_err());
    }
}
