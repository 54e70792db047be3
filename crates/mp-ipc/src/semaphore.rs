//! (semaphore: in progress)
