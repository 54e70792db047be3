//! (robust: in progress)
