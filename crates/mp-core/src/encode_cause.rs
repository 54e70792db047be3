//! Finding why a value failed to encode.
//!
//! postcard, the format of every message, drops the message of `serde::ser::Error::custom`:
//! a user's `Serialize` that refuses a value ("a Mutex that is poisoned", "a path that is not
//! UTF-8") reaches the caller as a bare "Serde Serialization Error". When an encode fails,
//! [`encode_failure_cause`] serializes the same value again into a serializer that writes
//! nothing and keeps the custom message, so the error the caller sees can say what refused.
//! This runs only on the failure path: a successful encode pays nothing.
//!
//! A handle's `Serialize` (mp-ipc's queues, pipes, shared memory) lends descriptors as a side
//! effect; during the second pass it must not (nothing will ever claim them), and asks
//! [`finding_encode_cause`] first.

use std::cell::Cell;
use std::fmt::{self, Display};

use serde::Serialize;
use serde::ser;

/// The message a `Serialize` impl gave `serde::ser::Error::custom` while encoding `value`, if
/// it gave one (a failure of the format itself, such as a sequence of unknown length, has
/// none here: the format's own error says it).
pub fn encode_failure_cause<T: Serialize + ?Sized>(value: &T) -> Option<String> {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FINDING.with(|finding| finding.set(self.0));
        }
    }
    let _restore = Restore(FINDING.with(|finding| finding.replace(true)));
    value
        .serialize(CauseFinder)
        .err()
        .map(|Cause(message)| message)
}

thread_local! {
    static FINDING: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is inside [`encode_failure_cause`]'s second pass: a `Serialize` with
/// side effects (lending descriptors, counting handles) should then serialize a unit and do
/// nothing else, since what it writes is thrown away.
pub fn finding_encode_cause() -> bool {
    FINDING.with(Cell::get)
}

/// The custom message a `Serialize` impl failed with.
#[derive(Debug)]
struct Cause(String);

impl Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Cause {}

impl ser::Error for Cause {
    fn custom<M: Display>(message: M) -> Self {
        Cause(message.to_string())
    }
}

/// A serializer that accepts every value, writes nothing, and reports the first custom
/// error. It is not human-readable, as postcard is not, so types that serialize differently
/// for humans take the same path as they did under postcard.
#[derive(Clone, Copy)]
struct CauseFinder;

macro_rules! accept {
    ($($method:ident($($arg:ty),*);)*) => {
        $(fn $method(self, $(_: $arg),*) -> Result<(), Cause> { Ok(()) })*
    };
}

/// Compound forms begin by returning the finder itself (their parts are serialized into it).
macro_rules! begin {
    ($($method:ident($($arg:ty),*);)*) => {
        $(fn $method(self, $(_: $arg),*) -> Result<Self, Cause> { Ok(self) })*
    };
}

impl ser::Serializer for CauseFinder {
    type Ok = ();
    type Error = Cause;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    accept! {
        serialize_bool(bool);
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_i128(i128);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
        serialize_u64(u64);
        serialize_u128(u128);
        serialize_f32(f32);
        serialize_f64(f64);
        serialize_char(char);
        serialize_str(&str);
        serialize_bytes(&[u8]);
        serialize_none();
        serialize_unit();
        serialize_unit_struct(&'static str);
        serialize_unit_variant(&'static str, u32, &'static str);
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Cause> {
        value.serialize(self)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Cause> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), Cause> {
        value.serialize(self)
    }

    begin! {
        serialize_seq(Option<usize>);
        serialize_tuple(usize);
        serialize_tuple_struct(&'static str, usize);
        serialize_tuple_variant(&'static str, u32, &'static str, usize);
        serialize_map(Option<usize>);
        serialize_struct(&'static str, usize);
        serialize_struct_variant(&'static str, u32, &'static str, usize);
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// Every compound form serializes its parts into another `CauseFinder`.
macro_rules! compound {
    ($($trait:ident :: $method:ident ($($name:ty)?);)*) => {
        $(impl ser::$trait for CauseFinder {
            type Ok = ();
            type Error = Cause;
            fn $method<T: Serialize + ?Sized>(
                &mut self,
                $(_: $name,)?
                value: &T,
            ) -> Result<(), Cause> {
                value.serialize(CauseFinder)
            }
            fn end(self) -> Result<(), Cause> {
                Ok(())
            }
        })*
    };
}

compound! {
    SerializeSeq::serialize_element();
    SerializeTuple::serialize_element();
    SerializeTupleStruct::serialize_field();
    SerializeTupleVariant::serialize_field();
    SerializeStruct::serialize_field(&'static str);
    SerializeStructVariant::serialize_field(&'static str);
}

impl ser::SerializeMap for CauseFinder {
    type Ok = ();
    type Error = Cause;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Cause> {
        key.serialize(CauseFinder)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Cause> {
        value.serialize(CauseFinder)
    }
    fn end(self) -> Result<(), Cause> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Refuses(&'static str);

    impl Serialize for Refuses {
        fn serialize<S: ser::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(ser::Error::custom(self.0))
        }
    }

    #[derive(Serialize)]
    struct Deep {
        fine: Vec<u32>,
        nested: BTreeMap<String, (u8, Option<Refuses>)>,
    }

    #[test]
    fn the_custom_message_is_found_wherever_the_refusal_sits() {
        let mut nested = BTreeMap::new();
        nested.insert("a".to_owned(), (1, None));
        nested.insert("b".to_owned(), (2, Some(Refuses("the lock is poisoned"))));
        let value = Deep {
            fine: vec![1, 2, 3],
            nested,
        };
        // postcard itself loses the message ...
        let postcard = postcard::to_allocvec(&value).unwrap_err().to_string();
        assert!(!postcard.contains("poisoned"), "{postcard}");
        // ... which the second pass finds.
        assert_eq!(
            encode_failure_cause(&value).as_deref(),
            Some("the lock is poisoned")
        );
    }

    #[test]
    fn the_second_pass_is_marked_for_serializers_with_side_effects() {
        struct Observes(Cell<Option<bool>>);
        impl Serialize for Observes {
            fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.0.set(Some(finding_encode_cause()));
                s.serialize_unit()
            }
        }
        let seen = Observes(Cell::new(None));
        assert_eq!(
            encode_failure_cause(&(&seen, Refuses("x"))).as_deref(),
            Some("x")
        );
        assert_eq!(seen.0.get(), Some(true));
        assert!(!finding_encode_cause(), "the mark ends with the pass");
    }

    #[test]
    fn a_value_that_encodes_has_no_cause() {
        let value = (1u8, "two", vec![3.0f64], Some(BTreeMap::from([(4u16, ())])));
        assert!(postcard::to_allocvec(&value).is_ok());
        assert_eq!(encode_failure_cause(&value), None);
        assert_eq!(encode_failure_cause(&Refuses("no")).as_deref(), Some("no"));
    }
}
