//! [`Value`] and [`Array`]: plain data in shared memory, each with its own
//! robust [`Lock`].
//!
//! ```
//! use mp_ipc::value::{Array, Value};
//!
//! let counter = Value::new(0u64)?;
//! *counter.lock().unwrap() += 1; // the guard holds the Value's lock
//! assert_eq!(counter.get()?, 1);
//!
//! let samples = Array::from_slice(&[1.5f64, 2.5])?;
//! samples.lock().unwrap()[1] = 4.0;
//! assert_eq!(samples.to_vec()?, [1.5, 4.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Python's `Value(typecode, v)` / `Array(typecode, n)` with `get_lock()`; the
//! element type is any [`Pod`] (plain old data: integers, floats, and arrays
//! of them). Every access goes through the lock, so a guard's `&mut T` is
//! exclusive in every process; the lock is robust, so a process killed while
//! holding it does not wedge the others (see [`LockError::OwnerDied`]).
//!
//! **`ShareableList`:** Python's `ShareableList` is a fixed-length list of
//! mixed scalars in shared memory. Here, a fixed-length list of one element
//! type is an [`Array`]; for mixed types use an `Array` of a `Pod` tuple-like
//! array (e.g. `[f64; 3]`), or encode values into a
//! [`SharedMemory`] guarded by a [`Lock`].

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::lock::{Guard, Lock, LockError, LockGuard, sealed};
use crate::shm::{Shared, SharedMemory, ShmError, ShmState, tag};

/// Plain old data: `Copy` types for which every bit pattern, including all
/// zeros, is a valid value, with no pointers or padding-dependent invariants.
///
/// # Safety
/// Implement only for types that are valid for any bit pattern (the bytes
/// come from shared memory other processes write) and contain no references
/// or pointers.
pub unsafe trait Pod: Copy + Send + Sync + 'static {}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: primitive numbers are valid for every bit pattern.
        unsafe impl Pod for $t {}
    )* };
}
pod!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64
);

// SAFETY: an array of Pod is valid for every bit pattern (no padding between
// elements of one type).
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}

/// The header of a Value or Array segment.
#[repr(C)]
struct PodHeader {
    tag: u64,
    len: u64,
    elem_size: u32,
    elem_align: u32,
}

// SAFETY: repr(C), starts with the tag; every field is written once before
// the segment is shared and only read afterwards.
unsafe impl ShmState for PodHeader {
    const TAG: u64 = tag(b"mp:Array");
    const KIND: &'static str = "Value or Array";
}

/// Where the lock sits: right after the header.
const LOCK_OFFSET: usize = size_of::<PodHeader>().next_multiple_of(8);

/// Where the data starts for elements of type `T`.
const fn data_offset<T>() -> usize {
    (LOCK_OFFSET + Lock::SIZE).next_multiple_of(align_of::<T>())
}

/// `len` elements of `T` and a lock, in one segment.
struct PodBlock<T: Pod> {
    header: Shared<PodHeader>,
    lock: Lock,
    data: NonNull<T>,
    len: usize,
}

// SAFETY: the data is only reached through guards of the lock (exclusive
// across threads and processes); `T: Send + Sync` (Pod); the pointer stays
// valid while `header` keeps the segment mapped.
unsafe impl<T: Pod> Send for PodBlock<T> {}
// SAFETY: as above.
unsafe impl<T: Pod> Sync for PodBlock<T> {}

impl<T: Pod> Clone for PodBlock<T> {
    fn clone(&self) -> Self {
        Self {
            header: self.header.clone(),
            lock: self.lock.clone(),
            data: self.data,
            len: self.len,
        }
    }
}

impl<T: Pod> PodBlock<T> {
    fn new(len: usize, fill: impl FnOnce(*mut T)) -> Result<Self, ShmError> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .and_then(|bytes| bytes.checked_add(data_offset::<T>()))
            .ok_or(ShmError::InvalidSize(usize::MAX))?;
        let shm = SharedMemory::new(bytes)?;
        // SAFETY: the closure writes every field of the header.
        let header = unsafe {
            Shared::create_in(shm.clone(), 0, |ptr: *mut PodHeader| {
                ptr.write(PodHeader {
                    tag: PodHeader::TAG,
                    len: len as u64,
                    elem_size: size_of::<T>() as u32,
                    elem_align: align_of::<T>() as u32,
                });
                Ok(())
            })?
        };
        let lock = Lock::create_in(shm.clone(), LOCK_OFFSET)?;
        let data = Self::data(&shm, len)?;
        // The segment is zeroed (a valid T, as T is Pod); `fill` may
        // overwrite it before anybody else can see it.
        fill(data.as_ptr());
        Ok(Self {
            header,
            lock,
            data,
            len,
        })
    }

    fn data(shm: &SharedMemory, len: usize) -> Result<NonNull<T>, ShmError> {
        let offset = data_offset::<T>();
        // Check the whole range, then take an aligned pointer to its start.
        let bytes = len.saturating_mul(size_of::<T>());
        if offset.checked_add(bytes).is_none_or(|end| end > shm.len()) {
            return Err(ShmError::OutOfBounds {
                offset,
                len: bytes,
                size: shm.len(),
            });
        }
        if len == 0 || size_of::<T>() == 0 {
            // Nothing to point at; an aligned dangling pointer is fine for
            // empty slices.
            return Ok(NonNull::dangling());
        }
        shm.region::<T>(offset)
    }

    fn attach(header: Shared<PodHeader>) -> Result<Self, ShmError> {
        let wrong = || ShmError::WrongKind {
            expected: std::any::type_name::<T>(),
            offset: data_offset::<T>(),
        };
        if header.elem_size as usize != size_of::<T>()
            || header.elem_align as usize != align_of::<T>()
        {
            return Err(wrong());
        }
        let len = usize::try_from(header.len).map_err(|_| wrong())?;
        let shm = header.shm().clone();
        let lock = Lock::attach(shm.clone(), LOCK_OFFSET)?;
        let data = Self::data(&shm, len)?;
        Ok(Self {
            header,
            lock,
            data,
            len,
        })
    }

    fn guard<'a>(&'a self, guard: LockGuard<'a>) -> PodGuard<'a, T> {
        PodGuard {
            guard,
            data: self.data,
            len: self.len,
            _data: PhantomData,
        }
    }

    fn lock(&self) -> Result<PodGuard<'_, T>, LockError<PodGuard<'_, T>>> {
        self.lock
            .lock()
            .map(|g| self.guard(g))
            .map_err(|e| e.map(|g| self.guard(g)))
    }

    fn try_lock(&self) -> Result<PodGuard<'_, T>, LockError<PodGuard<'_, T>>> {
        self.lock
            .try_lock()
            .map(|g| self.guard(g))
            .map_err(|e| e.map(|g| self.guard(g)))
    }

    fn lock_timeout(
        &self,
        timeout: Duration,
    ) -> Result<PodGuard<'_, T>, LockError<PodGuard<'_, T>>> {
        self.lock
            .lock_timeout(timeout)
            .map(|g| self.guard(g))
            .map_err(|e| e.map(|g| self.guard(g)))
    }
}

impl<T: Pod> Serialize for PodBlock<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.header.serialize(serializer)
    }
}

impl<'de, T: Pod> Deserialize<'de> for PodBlock<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let header = Shared::<PodHeader>::deserialize(deserializer)?;
        Self::attach(header).map_err(serde::de::Error::custom)
    }
}

/// Exclusive access to the data of a [`Value`] or [`Array`] while its lock
/// is held.
struct PodGuard<'a, T: Pod> {
    guard: LockGuard<'a>,
    data: NonNull<T>,
    len: usize,
    _data: PhantomData<&'a mut T>,
}

impl<T: Pod> PodGuard<'_, T> {
    fn slice(&self) -> &[T] {
        // SAFETY: the lock is held (exclusive in every process), the range
        // was bounds- and alignment-checked, and any bits are a valid T.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr(), self.len) }
    }

    fn slice_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `slice`, and `&mut self` makes this access unique
        // within the process.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_ptr(), self.len) }
    }
}

/// A `T` in shared memory with its own lock (Python's
/// `multiprocessing.Value`).
///
/// Clones, and copies passed to child processes, are the same value.
#[derive(Clone, Serialize)]
#[serde(transparent, bound = "")]
pub struct Value<T: Pod> {
    block: PodBlock<T>,
}

impl<'de, T: Pod> Deserialize<'de> for Value<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let block = PodBlock::<T>::deserialize(deserializer)?;
        // A value is exactly one element: every access reads element 0, so a block of
        // another length (an `Array` received as a `Value`, or a corrupted header) would be
        // read out of bounds. Found by the `shm_attach` fuzz target.
        if block.len != 1 {
            return Err(serde::de::Error::custom(ShmError::WrongKind {
                expected: std::any::type_name::<Value<T>>(),
                offset: 0,
            }));
        }
        Ok(Value { block })
    }
}

impl<T: Pod> Value<T> {
    /// A new shared value.
    pub fn new(value: T) -> Result<Self, ShmError> {
        let block = PodBlock::new(1, |ptr: *mut T| {
            // SAFETY: `ptr` points to one aligned, in-bounds, not yet shared T.
            unsafe { ptr.write(value) }
        })?;
        Ok(Self { block })
    }

    /// The lock guarding the value (Python's `get_lock()`).
    pub fn get_lock(&self) -> &Lock {
        &self.block.lock
    }

    /// Locks the value; the guard dereferences to it.
    #[inline]
    pub fn lock(&self) -> Result<ValueGuard<'_, T>, LockError<ValueGuard<'_, T>>> {
        self.block
            .lock()
            .map(ValueGuard)
            .map_err(|e| e.map(ValueGuard))
    }

    /// Locks the value if the lock is free.
    pub fn try_lock(&self) -> Result<ValueGuard<'_, T>, LockError<ValueGuard<'_, T>>> {
        self.block
            .try_lock()
            .map(ValueGuard)
            .map_err(|e| e.map(ValueGuard))
    }

    /// Locks the value, waiting at most `timeout`.
    pub fn lock_timeout(
        &self,
        timeout: Duration,
    ) -> Result<ValueGuard<'_, T>, LockError<ValueGuard<'_, T>>> {
        self.block
            .lock_timeout(timeout)
            .map(ValueGuard)
            .map_err(|e| e.map(ValueGuard))
    }

    /// Reads the value under the lock. If the previous holder died, the error
    /// carries the value as it is.
    pub fn get(&self) -> Result<T, LockError<T>> {
        self.lock().map(|g| *g).map_err(|e| e.map(|g| *g))
    }

    /// Writes the value under the lock (also after
    /// [`OwnerDied`](LockError::OwnerDied), which is still reported).
    pub fn set(&self, value: T) -> Result<(), LockError<()>> {
        match self.lock() {
            Ok(mut guard) => {
                *guard = value;
                Ok(())
            }
            Err(error) => Err(error.map(|mut guard| *guard = value)),
        }
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for Value<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Value");
        match self.try_lock() {
            Ok(guard) => s.field("value", &*guard),
            Err(_) => s.field("value", &format_args!("<locked>")),
        };
        s.finish()
    }
}

/// The locked value of a [`Value`]; dereferences to `T`; unlocks on drop.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ValueGuard<'a, T: Pod>(PodGuard<'a, T>);

impl<T: Pod> Deref for ValueGuard<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: a Value's data is exactly one T, checked at creation or
        // attach; the lock is held.
        unsafe { self.0.data.as_ref() }
    }
}

impl<T: Pod> DerefMut for ValueGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes the access unique.
        unsafe { self.0.data.as_mut() }
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for ValueGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ValueGuard").field(&**self).finish()
    }
}

impl<T: Pod> sealed::HeldLock for ValueGuard<'_, T> {
    fn held_lock(&self) -> &Lock {
        self.0.guard.held_lock()
    }
}
impl<T: Pod> Guard for ValueGuard<'_, T> {}

/// A fixed-length array of `T` in shared memory with its own lock (Python's
/// `multiprocessing.Array`).
///
/// Clones, and copies passed to child processes, are the same array.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent, bound = "")]
pub struct Array<T: Pod> {
    block: PodBlock<T>,
}

impl<T: Pod> Array<T> {
    /// `len` zeroed elements.
    pub fn new(len: usize) -> Result<Self, ShmError> {
        PodBlock::new(len, |_| {}).map(|block| Self { block })
    }

    /// A copy of `items`.
    pub fn from_slice(items: &[T]) -> Result<Self, ShmError> {
        let block = PodBlock::new(items.len(), |ptr| {
            // SAFETY: `ptr` points to `items.len()` aligned, in-bounds,
            // not-yet-shared elements (or is dangling for an empty slice,
            // where nothing is copied).
            unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), ptr, items.len()) }
        })?;
        Ok(Self { block })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.block.len
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.block.len == 0
    }

    /// The lock guarding the array (Python's `get_lock()`).
    pub fn get_lock(&self) -> &Lock {
        &self.block.lock
    }

    /// Locks the array; the guard dereferences to `[T]`.
    pub fn lock(&self) -> Result<ArrayGuard<'_, T>, LockError<ArrayGuard<'_, T>>> {
        self.block
            .lock()
            .map(ArrayGuard)
            .map_err(|e| e.map(ArrayGuard))
    }

    /// Locks the array if the lock is free.
    pub fn try_lock(&self) -> Result<ArrayGuard<'_, T>, LockError<ArrayGuard<'_, T>>> {
        self.block
            .try_lock()
            .map(ArrayGuard)
            .map_err(|e| e.map(ArrayGuard))
    }

    /// Locks the array, waiting at most `timeout`.
    pub fn lock_timeout(
        &self,
        timeout: Duration,
    ) -> Result<ArrayGuard<'_, T>, LockError<ArrayGuard<'_, T>>> {
        self.block
            .lock_timeout(timeout)
            .map(ArrayGuard)
            .map_err(|e| e.map(ArrayGuard))
    }

    /// A copy of the elements, read under the lock.
    pub fn to_vec(&self) -> Result<Vec<T>, LockError<Vec<T>>> {
        self.lock()
            .map(|g| g.to_vec())
            .map_err(|e| e.map(|g| g.to_vec()))
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for Array<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Array");
        s.field("len", &self.len());
        match self.try_lock() {
            Ok(guard) => s.field("items", &&*guard),
            Err(_) => s.field("items", &format_args!("<locked>")),
        };
        s.finish()
    }
}

/// The locked elements of an [`Array`]; dereferences to `[T]`; unlocks on
/// drop.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ArrayGuard<'a, T: Pod>(PodGuard<'a, T>);

impl<T: Pod> Deref for ArrayGuard<'_, T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        self.0.slice()
    }
}

impl<T: Pod> DerefMut for ArrayGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.0.slice_mut()
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for ArrayGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ArrayGuard").field(&&**self).finish()
    }
}

impl<T: Pod> sealed::HeldLock for ArrayGuard<'_, T> {
    fn held_lock(&self) -> &Lock {
        self.0.guard.held_lock()
    }
}
impl<T: Pod> Guard for ArrayGuard<'_, T> {}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn value_get_set_and_guard() {
        let v = Value::new(41i64).unwrap();
        *v.lock().unwrap() += 1;
        assert_eq!(v.get().unwrap(), 42);
        v.set(-7).unwrap();
        assert_eq!(v.clone().get().unwrap(), -7);
        let guard = v.lock().unwrap();
        assert!(matches!(v.get(), Err(LockError::Deadlock)));
        drop(guard);
    }

    #[test]
    fn array_round_trip_and_empty() {
        let a = Array::from_slice(&[[1u8, 2], [3, 4]]).unwrap();
        assert_eq!(a.len(), 2);
        a.lock().unwrap()[1][0] = 9;
        assert_eq!(a.to_vec().unwrap(), vec![[1, 2], [9, 4]]);
        let empty = Array::<u64>::new(0).unwrap();
        assert!(empty.is_empty());
        assert!(empty.to_vec().unwrap().is_empty());
        let zeros = Array::<f64>::new(3).unwrap();
        assert_eq!(zeros.to_vec().unwrap(), vec![0.0; 3]);
    }

    #[test]
    fn huge_arrays_are_an_error_not_a_panic() {
        assert!(matches!(
            Array::<u64>::new(usize::MAX),
            Err(ShmError::InvalidSize(_))
        ));
    }

    #[test]
    fn attach_checks_the_element_type() {
        let v = Value::new(1u32).unwrap();
        let header = v.block.header.clone();
        assert!(PodBlock::<u64>::attach(header.clone()).is_err());
        assert!(PodBlock::<f32>::attach(header).is_ok());
    }

    #[test]
    fn owner_death_is_reported_by_value_access() {
        let v = Value::new(5u32).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| std::mem::forget(v.lock().unwrap()));
        });
        match v.get() {
            Err(LockError::OwnerDied(value)) => assert_eq!(value, 5),
            other => panic!("expected OwnerDied, got {other:?}"),
        }
        assert_eq!(v.get().unwrap(), 5);
    }
}
