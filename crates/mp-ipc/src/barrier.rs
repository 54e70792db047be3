//! (barrier: in progress)
