//! (value: in progress)
