//! (connection: in progress)
