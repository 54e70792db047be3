//! (lock: in progress)
