//! The bootstrap marker (`MULTIPROC_BOOTSTRAP=<role>:<parent pid>`) a child process reads from
//! its environment, which anything that execs the binary can set: parsing it is a role or an
//! error naming the marker, never a panic; a role that parses re-encodes to a marker that
//! parses to the same role.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiproc::mp_core::__fuzz::parse_role;

fuzz_target!(|data: &[u8]| {
    let Ok(marker) = std::str::from_utf8(data) else {
        return;
    };
    match parse_role(marker) {
        Ok(encoded) => assert_eq!(
            parse_role(&encoded).as_ref(),
            Ok(&encoded),
            "a parsed role re-encodes stably"
        ),
        Err(reason) => assert!(
            reason.contains("MULTIPROC_BOOTSTRAP"),
            "the error names the marker: {reason}"
        ),
    }
});
