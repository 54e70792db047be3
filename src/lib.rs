//! placeholder
pub use mp_core;
pub use mp_ipc;
pub use mp_pool;
