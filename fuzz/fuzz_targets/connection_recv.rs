//! Garbage bytes written by a peer (`send_bytes`) and read as a typed message (`recv::<T>`):
//! every input must come back as a value or a typed `ConnectionError`, never a panic, a hang
//! or a lost message (the next message still arrives intact).
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiproc::{ConnectionError, Pipe};

#[path = "message.rs"]
mod message;
use message::Message;

fuzz_target!(|data: &[u8]| {
    let (reader, writer) = Pipe::duplex().expect("a pipe");
    writer.send_bytes(data).expect("send_bytes");
    writer.send(Message::Number(7)).expect("send");
    match reader.recv::<Message>() {
        Ok(message) => {
            // Whatever decoded re-encodes, and that encoding is a fixed point (compared as
            // bytes: a NaN is not equal to itself).
            let again = postcard::to_allocvec(&message).expect("a decoded message encodes");
            let decoded = postcard::from_bytes::<Message>(&again).expect("re-decodes");
            assert_eq!(postcard::to_allocvec(&decoded).unwrap(), again);
        }
        Err(ConnectionError::Decode(_)) => {}
        Err(other) => panic!("garbage must be a decode error, got {other:?}"),
    }
    // The message after the garbage is intact: nothing was lost or mis-framed.
    assert_eq!(
        reader.recv::<Message>().expect("the next message"),
        Message::Number(7)
    );

    // recv_bytes_into with a short buffer keeps Python's BufferTooShort.
    writer.send_bytes(data).expect("send_bytes");
    let mut short = [0u8; 8];
    match reader.recv_bytes_into(&mut short) {
        Ok(n) => assert_eq!(&short[..n], data),
        Err(ConnectionError::BufferTooShort { message }) => {
            assert!(data.len() > short.len());
            assert_eq!(message, data, "the whole message comes back");
        }
        Err(other) => panic!("recv_bytes_into: {other:?}"),
    }
});
