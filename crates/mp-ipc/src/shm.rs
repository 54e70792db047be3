//! (shm: in progress)
