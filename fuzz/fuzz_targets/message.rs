//! A message type with every shape serde and postcard decode differently: varints, floats,
//! strings (UTF-8 checked), byte strings, options, sequences, maps, enums, nesting.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub enum Message {
    Unit,
    Number(u64),
    Signed(i32, i128),
    Float(f64),
    Text(String),
    Bytes(multiproc::Bytes),
    Flag(bool, char),
    Nested(Option<Box<Message>>),
    List(Vec<Message>),
    Map(BTreeMap<String, u16>),
    Record {
        id: u32,
        tags: Vec<String>,
        payload: Option<Vec<u8>>,
    },
}
