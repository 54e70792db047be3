//! (futex: in progress)
