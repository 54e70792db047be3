//! The crux of running a Rust function elsewhere, under Miri: a function is named by an
//! offset from a fixed symbol ([`FunctionId`]), the zero-sized function is conjured from its
//! type alone, arguments and results travel postcard-encoded, and a panic comes back as a
//! report. All of it is pure code, so Miri checks it for undefined behaviour (provenance of
//! the function pointer rebuilt from an offset, the zero-sized read, the panic hook's
//! thread-locals). `.ci/miri` runs every test whose name starts with `miri_`; these also run
//! as ordinary tests.

use mp_core::{FunctionId, TaskFailure};

fn square(x: u64) -> u64 {
    x * x
}

fn call<T: serde::Serialize>(id: FunctionId, args: &T) -> Result<Vec<u8>, TaskFailure> {
    let input = postcard::to_allocvec(args).expect("arguments encode");
    // SAFETY: every id passed here comes from `FunctionId::of_task` in this process.
    unsafe { id.call_task(&input) }
}

#[test]
fn miri_fn_item_round_trips_through_its_id() {
    let output = call(FunctionId::of_task(&square), &7u64).expect("square runs");
    assert_eq!(postcard::from_bytes::<u64>(&output).unwrap(), 49);
}

#[test]
fn miri_closures_of_zero_one_and_tuple_arguments() {
    let nothing = || String::from("no arguments");
    let output = call(FunctionId::of_task(&nothing), &()).unwrap();
    assert_eq!(
        postcard::from_bytes::<String>(&output).unwrap(),
        "no arguments"
    );

    let joined = |(count, word): (u32, String)| word.repeat(count as usize);
    let output = call(FunctionId::of_task(&joined), &(3u32, "ab".to_string())).unwrap();
    assert_eq!(postcard::from_bytes::<String>(&output).unwrap(), "ababab");
}

#[test]
fn miri_an_id_survives_its_own_encoding() {
    // Ids are compared by nobody: the same function may have several addresses (one per
    // codegen unit that instantiates it; Miri models this by handing out a fresh address for
    // each cast), and each of them names a valid trampoline. What must hold is that an id,
    // once made, still calls the function after travelling as bytes.
    let id = FunctionId::of_task(&square);
    let bytes = postcard::to_allocvec(&id).unwrap();
    let decoded: FunctionId = postcard::from_bytes(&bytes).unwrap();
    let output = call(decoded, &5u64).unwrap();
    assert_eq!(postcard::from_bytes::<u64>(&output).unwrap(), 25);
}

#[test]
fn miri_undecodable_arguments_are_a_typed_error() {
    let id = FunctionId::of_task(&|(a, b): (u64, String)| format!("{a}{b}"));
    // SAFETY: the id comes from of_task in this process.
    let truncated = unsafe { id.call_task(&[0xff]) };
    match truncated {
        Err(TaskFailure::BadArguments(message)) => assert!(!message.is_empty()),
        other => panic!("expected BadArguments, got {other:?}"),
    }
}

#[test]
fn miri_panic_comes_back_as_a_report() {
    let id = FunctionId::of_task(&|x: u32| -> u32 {
        if x > 1 {
            panic!("too big: {x}");
        }
        x
    });
    match call(id, &2u32) {
        Err(TaskFailure::Panicked(report)) => {
            assert_eq!(report.message, "too big: 2");
            assert!(
                report
                    .location
                    .as_deref()
                    .unwrap_or("")
                    .contains("miri_function.rs"),
                "location names this file: {:?}",
                report.location
            );
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    // The trampoline is usable again after a caught panic.
    let output = call(id, &1u32).unwrap();
    assert_eq!(postcard::from_bytes::<u32>(&output).unwrap(), 1);
}
