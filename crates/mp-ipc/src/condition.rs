//! (condition: in progress)
