//! Finding why bytes failed to decode.
//!
//! postcard drops the message of `serde::de::Error::custom`, and with it everything serde's
//! derives say through it: "invalid value: integer `7`, expected variant index 0 <= i < 3",
//! "invalid length 2, expected a tuple of size 3", or a user's own "port must be below 1024".
//! When a decode fails, [`decode_failure_cause`] reads the same bytes again with a second,
//! minimal reader of postcard's wire format whose error keeps the message. It runs only on
//! the failure path, reads only (no allocation beyond what the value's own `Deserialize`
//! does), and never panics on any input; where its reading differs from postcard's (a
//! failure of the format itself: a truncated input, an overlong varint), it gives no cause and
//! postcard's own error stands.
//!
//! A `Deserialize` with side effects (mp-ipc's handles claim descriptors) must not run twice:
//! it asks [`replaying_decode`] and, during the second reading, gives it up with
//! [`abandon_replay`] (no cause is then reported, as before).

use std::cell::Cell;
use std::fmt::{self, Display};

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// The message a `Deserialize` impl (serde's derives included) gave `serde::de::Error::custom`
/// while decoding a `T` from `bytes`, postcard-encoded; `None` if the bytes decode, or fail
/// for a reason of the format itself.
pub fn decode_failure_cause<T: DeserializeOwned>(bytes: &[u8]) -> Option<String> {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            REPLAYING.with(|replaying| replaying.set(self.0));
        }
    }
    let _restore = Restore(REPLAYING.with(|replaying| replaying.replace(true)));
    ABANDONED.with(|abandoned| abandoned.set(false));
    let mut replay = Replay { input: bytes };
    let result = T::deserialize(&mut replay);
    if ABANDONED.with(|abandoned| abandoned.replace(false)) {
        return None;
    }
    match result {
        Ok(_) => None,
        Err(Cause(message)) => message,
    }
}

thread_local! {
    static REPLAYING: Cell<bool> = const { Cell::new(false) };
    static ABANDONED: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is inside [`decode_failure_cause`]'s second reading: a `Deserialize`
/// with side effects (claiming descriptors) should then return [`abandon_replay`]'s error.
pub fn replaying_decode() -> bool {
    REPLAYING.with(Cell::get)
}

/// Ends the second reading without a cause (for a `Deserialize` with side effects, see
/// [`replaying_decode`]).
pub fn abandon_replay<E: de::Error>() -> E {
    ABANDONED.with(|abandoned| abandoned.set(true));
    E::custom("the second reading stops at a handle")
}

/// `Some(message)`: a `Deserialize` impl's own message; `None`: the format failed.
#[derive(Debug)]
struct Cause(Option<String>);

impl Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_deref().unwrap_or("malformed input"))
    }
}

impl std::error::Error for Cause {}

impl de::Error for Cause {
    fn custom<M: Display>(message: M) -> Self {
        Cause(Some(message.to_string()))
    }
}

/// A failure of the format (postcard's own error says it better).
fn malformed<T>() -> Result<T, Cause> {
    Err(Cause(None))
}

/// postcard's wire format, read from a slice.
struct Replay<'de> {
    input: &'de [u8],
}

impl<'de> Replay<'de> {
    fn take(&mut self, n: usize) -> Result<&'de [u8], Cause> {
        if n > self.input.len() {
            return malformed();
        }
        let (taken, rest) = self.input.split_at(n);
        self.input = rest;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, Cause> {
        Ok(self.take(1)?[0])
    }

    /// An unsigned LEB128 varint of at most `bits` bits (checked by [`Self::unsigned`]).
    fn varint(&mut self, bits: u32) -> Result<u128, Cause> {
        let mut value: u128 = 0;
        for i in 0..bits.div_ceil(7) {
            let byte = self.byte()?;
            // At most 19 bytes for 128 bits: the shift stays below 128.
            value |= u128::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        malformed()
    }

    fn unsigned(&mut self, bits: u32) -> Result<u128, Cause> {
        let value = self.varint(bits)?;
        if bits < 128 && value >> bits != 0 {
            return malformed();
        }
        Ok(value)
    }

    fn signed(&mut self, bits: u32) -> Result<i128, Cause> {
        let zigzag = self.unsigned(bits)?;
        Ok(((zigzag >> 1) as i128) ^ -((zigzag & 1) as i128))
    }

    fn length(&mut self) -> Result<usize, Cause> {
        usize::try_from(self.unsigned(64)?).or_else(|_| malformed())
    }

    fn bytes(&mut self) -> Result<&'de [u8], Cause> {
        let len = self.length()?;
        self.take(len)
    }

    fn str(&mut self) -> Result<&'de str, Cause> {
        std::str::from_utf8(self.bytes()?).or_else(|_| malformed())
    }
}

macro_rules! unsigned {
    ($($method:ident $visit:ident $ty:ty, $bits:expr;)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
            let value = self.unsigned($bits)?;
            visitor.$visit(<$ty>::try_from(value).or_else(|_| malformed())?)
        })*
    };
}

macro_rules! signed {
    ($($method:ident $visit:ident $ty:ty, $bits:expr;)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
            let value = self.signed($bits)?;
            visitor.$visit(<$ty>::try_from(value).or_else(|_| malformed())?)
        })*
    };
}

impl<'de> de::Deserializer<'de> for &mut Replay<'de> {
    type Error = Cause;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Cause> {
        // postcard is not self-describing and refuses this too.
        malformed()
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        match self.byte()? {
            0 => visitor.visit_bool(false),
            1 => visitor.visit_bool(true),
            _ => malformed(),
        }
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        visitor.visit_i8(self.byte()? as i8)
    }

    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        visitor.visit_u8(self.byte()?)
    }

    unsigned! {
        deserialize_u16 visit_u16 u16, 16;
        deserialize_u32 visit_u32 u32, 32;
        deserialize_u64 visit_u64 u64, 64;
        deserialize_u128 visit_u128 u128, 128;
    }

    signed! {
        deserialize_i16 visit_i16 i16, 16;
        deserialize_i32 visit_i32 i32, 32;
        deserialize_i64 visit_i64 i64, 64;
        deserialize_i128 visit_i128 i128, 128;
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        let bytes = self.take(4)?;
        visitor.visit_f32(f32::from_le_bytes(
            bytes.try_into().or_else(|_| malformed())?,
        ))
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        let bytes = self.take(8)?;
        visitor.visit_f64(f64::from_le_bytes(
            bytes.try_into().or_else(|_| malformed())?,
        ))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        let text = self.str()?;
        let mut chars = text.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => visitor.visit_char(c),
            _ => malformed(),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        visitor.visit_borrowed_str(self.str()?)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        visitor.visit_borrowed_bytes(self.bytes()?)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        match self.byte()? {
            0 => visitor.visit_none(),
            1 => visitor.visit_some(self),
            _ => malformed(),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Cause> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Cause> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        let left = self.length()?;
        visitor.visit_seq(Counted { replay: self, left })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Cause> {
        visitor.visit_seq(Counted {
            replay: self,
            left: len,
        })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Cause> {
        self.deserialize_tuple(len, visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        let left = self.length()?;
        visitor.visit_map(Counted { replay: self, left })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Cause> {
        self.deserialize_tuple(fields.len(), visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Cause> {
        visitor.visit_enum(self)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Cause> {
        // As postcard: a variant index (struct fields are positional and never asked for).
        let index = self.unsigned(32)?;
        visitor.visit_u32(u32::try_from(index).or_else(|_| malformed())?)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Cause> {
        malformed()
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// A sequence or map of a known number of elements.
struct Counted<'a, 'de> {
    replay: &'a mut Replay<'de>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Counted<'_, 'de> {
    type Error = Cause;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, Cause> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.replay).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        // Bounded by what the input could hold (one byte an element at least), so that a
        // forged length does not make a visitor reserve absurd amounts.
        Some(self.left.min(self.replay.input.len()))
    }
}

impl<'de> de::MapAccess<'de> for Counted<'_, 'de> {
    type Error = Cause;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Cause> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.replay).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Cause> {
        seed.deserialize(&mut *self.replay)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left.min(self.replay.input.len()))
    }
}

impl<'de> de::EnumAccess<'de> for &mut Replay<'de> {
    type Error = Cause;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), Cause> {
        let index = u32::try_from(self.unsigned(32)?).or_else(|_| malformed())?;
        let variant = seed.deserialize(index.into_deserializer())?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for &mut Replay<'de> {
    type Error = Cause;

    fn unit_variant(self) -> Result<(), Cause> {
        Ok(())
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, Cause> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Cause> {
        de::Deserializer::deserialize_tuple(self, len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Cause> {
        de::Deserializer::deserialize_tuple(self, fields.len(), visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    /// A port that refuses privileged numbers, in its own words.
    #[derive(Debug, Serialize)]
    struct Port(u16);

    impl<'de> Deserialize<'de> for Port {
        fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let port = u16::deserialize(deserializer)?;
            if port < 1024 {
                return Err(de::Error::custom(format!("port {port} is privileged")));
            }
            Ok(Port(port))
        }
    }

    #[derive(Debug, Serialize, Deserialize)]
    enum Shape {
        Dot,
        Circle { radius: f64 },
        Polygon(Vec<(i32, i32)>),
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct Config {
        name: String,
        tags: BTreeMap<String, Option<i64>>,
        shapes: Vec<Shape>,
        first: char,
        ports: (u8, Port),
    }

    fn config(port: u16) -> Config {
        Config {
            name: "ünïcode".into(),
            tags: BTreeMap::from([("a".into(), Some(-5)), ("b".into(), None)]),
            shapes: vec![
                Shape::Dot,
                Shape::Circle { radius: 2.5 },
                Shape::Polygon(vec![(1, -1), (i32::MIN, i32::MAX)]),
            ],
            first: 'ж',
            ports: (9, Port(port)),
        }
    }

    #[test]
    fn a_message_postcard_drops_is_read_again_through_every_form() {
        let bytes = postcard::to_allocvec(&config(80)).unwrap();
        let postcard = postcard::from_bytes::<Config>(&bytes)
            .unwrap_err()
            .to_string();
        assert!(!postcard.contains("privileged"), "{postcard}");
        assert_eq!(
            decode_failure_cause::<Config>(&bytes).as_deref(),
            Some("port 80 is privileged")
        );
        // The same bytes with a valid port decode in both readers.
        let good = postcard::to_allocvec(&config(8080)).unwrap();
        assert!(postcard::from_bytes::<Config>(&good).is_ok());
        assert_eq!(decode_failure_cause::<Config>(&good), None);
    }

    #[test]
    fn a_handle_abandons_the_second_reading() {
        struct Handle;
        impl<'de> Deserialize<'de> for Handle {
            fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if replaying_decode() {
                    return Err(abandon_replay());
                }
                u8::deserialize(d).map(|_| Handle)
            }
        }
        let bytes = postcard::to_allocvec(&(1u8, Port(80))).unwrap();
        assert!(decode_failure_cause::<(Handle, Port)>(&bytes).is_none());
        assert_eq!(
            decode_failure_cause::<(u8, Port)>(&bytes).as_deref(),
            Some("port 80 is privileged")
        );
        assert!(!replaying_decode());
    }

    #[test]
    fn serdes_own_messages_come_through_too() {
        // Variant index 7 of a three-variant enum.
        let cause = decode_failure_cause::<Shape>(&[7]).unwrap();
        assert!(cause.contains("variant index"), "{cause}");
    }

    #[test]
    fn malformed_input_gives_no_cause_and_never_panics() {
        assert_eq!(decode_failure_cause::<u32>(&[0xff; 12]), None);
        assert_eq!(decode_failure_cause::<String>(&[5, b'a']), None);
        assert_eq!(
            decode_failure_cause::<Vec<u64>>(&[0xff, 0xff, 0xff, 0xff, 0x0f]),
            None
        );
        // Every prefix and every one-byte corruption of a real encoding.
        let bytes = postcard::to_allocvec(&config(8080)).unwrap();
        for end in 0..bytes.len() {
            let _ = decode_failure_cause::<Config>(&bytes[..end]);
        }
        for i in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut corrupted = bytes.clone();
                corrupted[i] ^= flip;
                let _ = decode_failure_cause::<Config>(&corrupted);
            }
        }
    }

    #[test]
    fn integers_read_as_postcard_writes_them() {
        for value in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let bytes = postcard::to_allocvec(&value).unwrap();
            let mut replay = Replay { input: &bytes };
            assert_eq!(u64::deserialize(&mut replay).unwrap(), value);
        }
        for value in [0i64, -1, 1, -64, 64, i64::MIN, i64::MAX] {
            let bytes = postcard::to_allocvec(&value).unwrap();
            let mut replay = Replay { input: &bytes };
            assert_eq!(i64::deserialize(&mut replay).unwrap(), value);
        }
        for value in [0u128, u128::MAX, 1 << 100] {
            let bytes = postcard::to_allocvec(&value).unwrap();
            let mut replay = Replay { input: &bytes };
            assert_eq!(u128::deserialize(&mut replay).unwrap(), value);
        }
    }
}
