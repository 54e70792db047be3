//! [`RawValue`] and [`RawArray`]: plain data in shared memory without a lock
//! (Python's `multiprocessing.RawValue` / `RawArray`).
//!
//! ```
//! use mp_ipc::raw_value::{RawArray, RawValue};
//!
//! let flag = RawValue::new(0u32)?;
//! flag.set(1);
//! assert_eq!(flag.get(), 1);
//!
//! let samples = RawArray::from_slice(&[1.5f64, 2.5])?;
//! samples.set(1, 4.0)?;
//! assert_eq!(samples.to_vec(), [1.5, 4.0]);
//! assert!(samples.get(2).is_none()); // out of range: None, never a panic
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Without a lock, two processes may read and write the same element at
//! once. Every access is therefore a copy made of relaxed atomic loads or
//! stores (8 bytes at a time where the address allows, bytes elsewhere: the
//! copies of [`SharedMemory::read_at`](crate::shm::SharedMemory::read_at)): no
//! undefined behaviour, but, as in Python, a value wider than one atomic
//! access may be read *torn* (half old, half new) while another process
//! writes it. Coordinate with a [`Lock`](crate::lock::Lock),
//! an [`Event`](crate::event::Event) or a queue when that matters, or use
//! [`Value`](crate::value::Value) / [`Array`](crate::value::Array).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::shm::ShmError;
use crate::value::{Pod, PodData, data_offset};

/// An index past the end of a [`RawArray`], or a slice of the wrong length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("index or length {index} is out of range for a RawArray of {len} elements")]
pub struct OutOfRange {
    /// The index (or slice length) asked for.
    pub index: usize,
    /// The number of elements in the array.
    pub len: usize,
}

/// Byte offset of element `index` in the segment.
fn offset_of<T: Pod>(index: usize) -> usize {
    data_offset::<T>() + index * size_of::<T>()
}

/// Reads element `index` of `data` (which has more than `index` elements).
fn load<T: Pod>(data: &PodData<T>, index: usize) -> T {
    let mut value = T::new_zeroed();
    // Cannot fail: `index` is in range, which was checked against the
    // segment's size when `data` was made.
    if let Err(error) = data
        .shm()
        .read_at(offset_of::<T>(index), value.as_mut_bytes())
    {
        tracing::error!(%error, "RawArray element out of its segment");
    }
    value
}

/// Writes element `index` of `data` (which has more than `index` elements).
fn store<T: Pod>(data: &PodData<T>, index: usize, value: T) {
    // Cannot fail, as in `load`.
    if let Err(error) = data.shm().write_at(offset_of::<T>(index), value.as_bytes()) {
        tracing::error!(%error, "RawArray element out of its segment");
    }
}

/// A `T` in shared memory without a lock (Python's `RawValue`); see the
/// [module documentation](self) for what concurrent access means.
///
/// Clones, and copies passed to child processes, are the same value.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent, bound = "")]
pub struct RawValue<T: Pod> {
    data: PodData<T>,
}

impl<T: Pod> RawValue<T> {
    /// A new shared value.
    pub fn new(value: T) -> Result<Self, ShmError> {
        let data = PodData::new(1, |ptr: *mut T| {
            // SAFETY: `ptr` points to one aligned, in-bounds, not yet shared T.
            unsafe { ptr.write(value) }
        })?;
        Ok(Self { data })
    }

    /// A copy of the value (possibly torn while another process writes it).
    pub fn get(&self) -> T {
        load(&self.data, 0)
    }

    /// Overwrites the value.
    pub fn set(&self, value: T) {
        store(&self.data, 0, value)
    }

    /// The value's address in this process, for code that synchronises by
    /// other means (reading or writing through it is `unsafe` and racy
    /// unless it does).
    pub fn as_ptr(&self) -> *mut T {
        self.data.ptr().as_ptr()
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for RawValue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RawValue").field(&self.get()).finish()
    }
}

/// A fixed-length array of `T` in shared memory without a lock (Python's
/// `RawArray`); see the [module documentation](self) for what concurrent
/// access means.
///
/// Clones, and copies passed to child processes, are the same array.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent, bound = "")]
pub struct RawArray<T: Pod> {
    data: PodData<T>,
}

impl<T: Pod> RawArray<T> {
    /// `len` zeroed elements.
    pub fn new(len: usize) -> Result<Self, ShmError> {
        PodData::new(len, |_| {}).map(|data| Self { data })
    }

    /// A copy of `items`.
    pub fn from_slice(items: &[T]) -> Result<Self, ShmError> {
        let data = PodData::new(items.len(), |ptr| {
            // SAFETY: `ptr` points to `items.len()` aligned, in-bounds,
            // not-yet-shared elements (or is dangling for an empty slice,
            // where nothing is copied).
            unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), ptr, items.len()) }
        })?;
        Ok(Self { data })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }

    /// A copy of element `index`; `None` past the end.
    pub fn get(&self, index: usize) -> Option<T> {
        (index < self.len()).then(|| load(&self.data, index))
    }

    /// Overwrites element `index`.
    pub fn set(&self, index: usize, value: T) -> Result<(), OutOfRange> {
        self.check(index)?;
        store(&self.data, index, value);
        Ok(())
    }

    /// A copy of every element.
    pub fn to_vec(&self) -> Vec<T> {
        (0..self.len())
            .map(|index| load(&self.data, index))
            .collect()
    }

    /// Overwrites every element with `items`, which must have [`len`](Self::len) elements.
    pub fn copy_from_slice(&self, items: &[T]) -> Result<(), OutOfRange> {
        if items.len() != self.len() {
            return Err(OutOfRange {
                index: items.len(),
                len: self.len(),
            });
        }
        for (index, item) in items.iter().enumerate() {
            store(&self.data, index, *item);
        }
        Ok(())
    }

    /// The first element's address in this process (see [`RawValue::as_ptr`]).
    pub fn as_ptr(&self) -> *mut T {
        self.data.ptr().as_ptr()
    }

    fn check(&self, index: usize) -> Result<(), OutOfRange> {
        if index < self.len() {
            Ok(())
        } else {
            Err(OutOfRange {
                index,
                len: self.len(),
            })
        }
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for RawArray<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawArray")
            .field("len", &self.len())
            .field("items", &self.to_vec())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn raw_value_round_trips_odd_sizes() {
        let v = RawValue::new([1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]).unwrap();
        assert_eq!(v.get(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        v.set([9; 11]);
        assert_eq!(v.clone().get(), [9; 11]);
        let wide = RawValue::new(u128::MAX - 5).unwrap();
        assert_eq!(wide.get(), u128::MAX - 5);
    }

    #[test]
    fn raw_array_bounds_are_errors() {
        let a = RawArray::from_slice(&[1u16, 2, 3]).unwrap();
        assert_eq!(a.get(2), Some(3));
        assert_eq!(a.get(3), None);
        assert_eq!(a.set(3, 0), Err(OutOfRange { index: 3, len: 3 }));
        assert_eq!(
            a.copy_from_slice(&[1, 2]),
            Err(OutOfRange { index: 2, len: 3 })
        );
        a.copy_from_slice(&[4, 5, 6]).unwrap();
        a.set(0, 7).unwrap();
        assert_eq!(a.to_vec(), [7, 5, 6]);
        assert!(RawArray::<u64>::new(0).unwrap().is_empty());
        assert!(matches!(
            RawArray::<u64>::new(usize::MAX),
            Err(ShmError::InvalidSize(_))
        ));
    }

    #[test]
    fn writes_from_threads_are_never_lost_per_element() {
        let a = RawArray::<u64>::new(4).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let a = a.clone();
                s.spawn(move || {
                    for i in 0..1000u64 {
                        a.set(t, i).unwrap();
                    }
                });
            }
        });
        assert_eq!(a.to_vec(), [999; 4]);
    }
}
