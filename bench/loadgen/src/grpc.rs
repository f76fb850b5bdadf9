//! Just enough gRPC and protobuf for `echo.v1.Echo/Unary` (protos/echo/v1/echo.proto):
//! length-prefixed message framing and field 1 (`message`, a string) of `EchoRequest` and
//! `EchoReply`. Hand-encoded so the load generator needs no code generation.

use bytes::{BufMut, Bytes, BytesMut};

/// The method the gRPC mode calls.
pub const UNARY_PATH: &str = "/echo.v1.Echo/Unary";

/// A gRPC message frame: compressed flag 0, 4-byte big-endian length, the message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// The first message of a gRPC body, if it is complete and uncompressed.
pub fn unframe(body: &[u8]) -> Option<&[u8]> {
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    body.get(5..5 + len)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// A protobuf message holding only a length-delimited field `field` (a string or bytes).
pub fn encode_bytes_field(field: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    put_varint(&mut out, (u64::from(field) << 3) | 2);
    put_varint(&mut out, value.len() as u64);
    out.extend_from_slice(value);
    out
}

/// The last value of length-delimited field `field` in a protobuf message (proto3: last wins);
/// `Some(empty)` when absent, `None` when the message is malformed.
pub fn bytes_field(mut msg: &[u8], field: u32) -> Option<Vec<u8>> {
    let mut found = Vec::new();
    while !msg.is_empty() {
        let key = get_varint(&mut msg)?;
        let (number, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                get_varint(&mut msg)?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                msg = msg.get(n..)?;
            }
            2 => {
                let len = usize::try_from(get_varint(&mut msg)?).ok()?;
                let value = msg.get(..len)?;
                if number == u64::from(field) {
                    found = value.to_vec();
                }
                msg = &msg[len..];
            }
            _ => return None,
        }
    }
    Some(found)
}

/// The framed `EchoRequest { message }` body of a unary call.
pub fn echo_request(message: &[u8]) -> Bytes {
    frame(&encode_bytes_field(1, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let body = echo_request(b"hello");
        assert_eq!(&body[..], b"\x00\x00\x00\x00\x07\x0a\x05hello");
        let msg = unframe(&body).unwrap();
        assert_eq!(bytes_field(msg, 1).unwrap(), b"hello");
    }

    #[test]
    fn skips_other_fields_and_long_lengths() {
        let long = vec![b'x'; 300];
        let mut msg = vec![0x10, 0x96, 0x01]; // count = 150
        msg.extend(encode_bytes_field(3, b"peer"));
        msg.extend(encode_bytes_field(1, &long));
        msg.extend([0x25, 1, 2, 3, 4]); // fixed32 field 4
        assert_eq!(bytes_field(&msg, 1).unwrap(), long);
        assert_eq!(bytes_field(&msg, 3).unwrap(), b"peer");
        assert_eq!(bytes_field(&msg, 7).unwrap(), b"");
    }

    #[test]
    fn rejects_malformed() {
        assert!(bytes_field(&[0x0a, 0x05, b'a'], 1).is_none());
        assert!(unframe(&[0, 0, 0, 0, 9, 1]).is_none());
        assert!(unframe(&[1, 0, 0, 0, 0]).is_none());
    }
}
