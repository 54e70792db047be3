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

/// Plain old data that may live in shared memory: `Copy`, valid for every
/// bit pattern (other processes write the bytes), without padding, pointers
/// or interior mutability.
///
/// Implemented automatically for every type with zerocopy's [`FromBytes`],
/// [`IntoBytes`] and [`Immutable`]: integers, floats, arrays of them, and
/// your own `#[repr(C)]` structs through the derives, which check the layout
/// at compile time (no `unsafe` on your side):
///
/// ```
/// use mp_ipc::value::{FromBytes, Immutable, IntoBytes, Value};
///
/// #[derive(Clone, Copy, Debug, PartialEq, FromBytes, IntoBytes, Immutable)]
/// #[zerocopy(crate = "mp_ipc::value::zerocopy")] // no direct zerocopy dependency needed
/// #[repr(C)]
/// struct Point {
///     x: f64,
///     y: f64,
/// }
///
/// let p = Value::new(Point { x: 1.0, y: 2.0 })?;
/// p.lock().unwrap().y = 5.0;
/// assert_eq!(p.get()?, Point { x: 1.0, y: 5.0 });
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Pod: FromBytes + IntoBytes + Immutable + Copy + Send + Sync + 'static {}

impl<T: FromBytes + IntoBytes + Immutable + Copy + Send + Sync + 'static> Pod for T {}

#[doc(no_inline)]
pub use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The zerocopy crate, for `#[zerocopy(crate = "mp_ipc::value::zerocopy")]`
/// on derived [`Pod`] types.
#[doc(no_inline)]
pub use zerocopy;

/// The header of a Value or Array segment.
#[repr(C)]
pub(crate) struct PodHeader {
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
pub(crate) const fn data_offset<T>() -> usize {
    (LOCK_OFFSET + Lock::SIZE).next_multiple_of(align_of::<T>())
}

/// `len` elements of `T` after a [`PodHeader`], in one segment (room for an
/// inline lock is always reserved, so every kind shares one layout).
pub(crate) struct PodData<T: Pod> {
    header: Shared<PodHeader>,
    data: NonNull<T>,
    len: usize,
}

// SAFETY: the pointer stays valid while `header` keeps the segment mapped;
// `T: Send + Sync` (Pod). Who may touch the data when is up to the owners
// (a lock for Value/Array, atomic copies for RawValue/RawArray).
unsafe impl<T: Pod> Send for PodData<T> {}
// SAFETY: as above.
unsafe impl<T: Pod> Sync for PodData<T> {}

impl<T: Pod> Clone for PodData<T> {
    fn clone(&self) -> Self {
        Self {
            header: self.header.clone(),
            data: self.data,
            len: self.len,
        }
    }
}

impl<T: Pod> PodData<T> {
    /// A fresh zeroed segment for `len` elements; `fill` may initialise them
    /// before anybody else can see the segment.
    pub(crate) fn new(len: usize, fill: impl FnOnce(*mut T)) -> Result<Self, ShmError> {
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
        let data = Self::data(&shm, len)?;
        // The segment is zeroed (a valid T, as T is Pod); `fill` may
        // overwrite it before anybody else can see it.
        fill(data.as_ptr());
        Ok(Self { header, data, len })
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

    /// The data of a segment made by [`PodData::new`] for the same `T`.
    pub(crate) fn attach(header: Shared<PodHeader>) -> Result<Self, ShmError> {
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
        let data = Self::data(header.shm(), len)?;
        Ok(Self { header, data, len })
    }

    pub(crate) fn shm(&self) -> &SharedMemory {
        self.header.shm()
    }

    /// The first element (dangling, but aligned, if there are none).
    pub(crate) fn ptr(&self) -> NonNull<T> {
        self.data
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl<T: Pod> Serialize for PodData<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.header.serialize(serializer)
    }
}

impl<'de, T: Pod> Deserialize<'de> for PodData<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let header = Shared::<PodHeader>::deserialize(deserializer)?;
        Self::attach(header).map_err(crate::decode_error::custom)
    }
}

/// `len` elements of `T` and the lock guarding them: the segment's own
/// (inline) lock, or a [`Lock`] given by the user, shared with other data.
struct PodBlock<T: Pod> {
    data: PodData<T>,
    lock: Lock,
    inline_lock: bool,
}

impl<T: Pod> Clone for PodBlock<T> {
    fn clone(&self) -> Self {
        Self {
            data: self.data.clone(),
            lock: self.lock.clone(),
            inline_lock: self.inline_lock,
        }
    }
}

impl<T: Pod> PodBlock<T> {
    /// `lock: None`: a new lock inside the segment.
    fn new(len: usize, lock: Option<&Lock>, fill: impl FnOnce(*mut T)) -> Result<Self, ShmError> {
        let data = PodData::new(len, fill)?;
        Ok(match lock {
            Some(lock) => Self {
                data,
                lock: lock.clone(),
                inline_lock: false,
            },
            None => Self {
                lock: Lock::create_in(data.shm().clone(), LOCK_OFFSET)?,
                data,
                inline_lock: true,
            },
        })
    }

    fn attach(data: PodData<T>, lock: Option<Lock>) -> Result<Self, ShmError> {
        Ok(match lock {
            Some(lock) => Self {
                data,
                lock,
                inline_lock: false,
            },
            None => Self {
                lock: Lock::attach(data.shm().clone(), LOCK_OFFSET)?,
                data,
                inline_lock: true,
            },
        })
    }

    fn guard<'a>(&'a self, guard: LockGuard<'a>) -> PodGuard<'a, T> {
        PodGuard {
            guard,
            data: self.data.data,
            len: self.data.len,
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
        // The inline lock travels with the segment; a given lock separately.
        let lock = (!self.inline_lock).then_some(&self.lock);
        (&self.data, lock).serialize(serializer)
    }
}

impl<'de, T: Pod> Deserialize<'de> for PodBlock<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (data, lock) = <(PodData<T>, Option<Lock>)>::deserialize(deserializer)?;
        Self::attach(data, lock).map_err(crate::decode_error::custom)
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
        if block.data.len() != 1 {
            return Err(crate::decode_error::custom(ShmError::WrongKind {
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
        Self::create(value, None)
    }

    /// A new shared value guarded by `lock` (Python's `Value(..., lock=lock)`):
    /// several values (and arrays) can share one lock, and a
    /// [`Condition`](crate::condition::Condition) on that lock waits with
    /// this value's guard.
    pub fn with_lock(value: T, lock: &Lock) -> Result<Self, ShmError> {
        Self::create(value, Some(lock))
    }

    fn create(value: T, lock: Option<&Lock>) -> Result<Self, ShmError> {
        let block = PodBlock::new(1, lock, |ptr: *mut T| {
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
    fn held(&self) -> sealed::Held<'_> {
        self.0.guard.held()
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
        PodBlock::new(len, None, |_| {}).map(|block| Self { block })
    }

    /// A copy of `items`.
    pub fn from_slice(items: &[T]) -> Result<Self, ShmError> {
        Self::create(items, None)
    }

    /// `len` zeroed elements guarded by `lock` (Python's
    /// `Array(..., lock=lock)`); see [`Value::with_lock`].
    pub fn with_lock(len: usize, lock: &Lock) -> Result<Self, ShmError> {
        PodBlock::new(len, Some(lock), |_| {}).map(|block| Self { block })
    }

    /// A copy of `items` guarded by `lock`.
    pub fn from_slice_with_lock(items: &[T], lock: &Lock) -> Result<Self, ShmError> {
        Self::create(items, Some(lock))
    }

    fn create(items: &[T], lock: Option<&Lock>) -> Result<Self, ShmError> {
        let block = PodBlock::new(items.len(), lock, |ptr| {
            // SAFETY: `ptr` points to `items.len()` aligned, in-bounds,
            // not-yet-shared elements (or is dangling for an empty slice,
            // where nothing is copied).
            unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), ptr, items.len()) }
        })?;
        Ok(Self { block })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.block.data.len
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.block.data.len == 0
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
    fn held(&self) -> sealed::Held<'_> {
        self.0.guard.held()
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
    fn values_and_arrays_share_a_given_lock() {
        let lock = Lock::new().unwrap();
        let count = Value::with_lock(0u32, &lock).unwrap();
        let items = Array::<u64>::with_lock(2, &lock).unwrap();
        let copy = Array::from_slice_with_lock(&[7u8], &lock).unwrap();
        let guard = count.lock().unwrap();
        // One lock: holding it through the Value excludes the Array.
        assert!(matches!(items.lock(), Err(LockError::Deadlock)));
        assert!(matches!(copy.try_lock(), Err(LockError::Deadlock)));
        assert!(matches!(lock.try_lock(), Err(LockError::Deadlock)));
        drop(guard);
        items.lock().unwrap()[1] = 3;
        assert_eq!(items.to_vec().unwrap(), [0, 3]);
        assert_eq!(copy.to_vec().unwrap(), [7]);
        assert_eq!(count.get_lock().id(), lock.id());
    }

    #[derive(Clone, Copy, Debug, PartialEq, FromBytes, IntoBytes, Immutable)]
    #[repr(C)]
    struct Particle {
        position: [f32; 3],
        mass: f32,
        id: u64,
    }

    #[test]
    fn derived_structs_are_pod() {
        let p = Particle {
            position: [1.0, 2.0, 3.0],
            mass: 0.5,
            id: 9,
        };
        let v = Value::new(p).unwrap();
        v.lock().unwrap().id += 1;
        assert_eq!(v.get().unwrap(), Particle { id: 10, ..p });
        let a = Array::<Particle>::new(2).unwrap();
        assert_eq!(a.to_vec().unwrap()[1].id, 0);
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
        let header = v.block.data.header.clone();
        assert!(PodData::<u64>::attach(header.clone()).is_err());
        assert!(PodData::<f32>::attach(header).is_ok());
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
