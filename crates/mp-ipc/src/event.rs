//! (event: in progress)
