//! (queue: in progress)
