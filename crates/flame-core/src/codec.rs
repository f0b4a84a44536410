//! How arguments and results are encoded: MessagePack with named struct
//! fields (so structs may gain fields), through serde. Sequences of bytes
//! (`Vec<u8>`, `&[u8]`, `Box<[u8]>`) travel as MessagePack `bin`, as
//! `bytes::Bytes` does, not as arrays of integers: no `serde_bytes` needed
//! for byte payloads to cost what their length does.
//!
//! Parent and runner must agree on this; it is part of the wire protocol
//! (see `PROTOCOL.md`).

use rmp_serde::config::BytesMode;
use serde::{de::DeserializeOwned, Serialize};

/// Encodes a value.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let mut buf = Vec::new();
    let mut serializer = rmp_serde::Serializer::new(&mut buf)
        .with_struct_map()
        .with_bytes(BytesMode::ForceIterables);
    value.serialize(&mut serializer)?;
    Ok(buf)
}

/// Encodes a value like [`encode`], appending to `out` (which may already
/// hold, say, room for a header).
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let mut serializer = rmp_serde::Serializer::new(out)
        .with_struct_map()
        .with_bytes(BytesMode::ForceIterables);
    value.serialize(&mut serializer)
}

/// Why a value did not encode (MessagePack).
pub type EncodeError = rmp_serde::encode::Error;

/// Why bytes did not decode (MessagePack).
pub type DecodeError = rmp_serde::decode::Error;

/// Decodes a value.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    rmp_serde::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Tile {
        x: u32,
        name: String,
    }

    #[test]
    fn values_round_trip_with_named_fields() {
        let tile = Tile {
            x: 7,
            name: "a".into(),
        };
        let bytes = encode(&(tile, 3u8)).unwrap();
        // Field names travel, so a reader with more optional fields copes.
        assert!(bytes.windows(4).any(|w| w == b"name"));
        let (back, n): (Tile, u8) = decode(&bytes).unwrap();
        assert_eq!((back.x, back.name.as_str(), n), (7, "a", 3));
        assert!(decode::<(Tile, u8)>(b"\xc1").is_err());
    }

    #[test]
    fn byte_vectors_travel_as_bin_and_other_vectors_as_arrays() {
        let data = vec![200u8; 1000];
        let bytes = encode(&(data.clone(), "x")).unwrap();
        // array(2), bin16 header (3 bytes), 1000 bytes, "x" (2 bytes).
        assert_eq!(bytes.len(), 1 + 3 + 1000 + 2);
        assert_eq!(bytes[1], 0xc5, "bin16");
        let (back, s): (Vec<u8>, String) = decode(&bytes).unwrap();
        assert_eq!((back, s.as_str()), (data, "x"));
        let slice: &[u8] = &[1, 2, 3];
        assert_eq!(
            decode::<Vec<u8>>(&encode(slice).unwrap()).unwrap(),
            [1, 2, 3]
        );
        assert_eq!(
            decode::<Vec<u8>>(&encode(&Vec::<u8>::new()).unwrap()).unwrap(),
            []
        );
        // Not bytes: unchanged.
        let bools = vec![true, false];
        assert_eq!(
            decode::<Vec<bool>>(&encode(&bools).unwrap()).unwrap(),
            bools
        );
        let small = vec![-1i8, 2];
        assert_eq!(decode::<Vec<i8>>(&encode(&small).unwrap()).unwrap(), small);
        let wide = vec![1u16, 300];
        assert_eq!(decode::<Vec<u16>>(&encode(&wide).unwrap()).unwrap(), wide);
        let arr = [7u8; 4];
        assert_eq!(decode::<[u8; 4]>(&encode(&arr).unwrap()).unwrap(), arr);
        let b = bytes::Bytes::from_static(b"abc");
        assert_eq!(decode::<bytes::Bytes>(&encode(&b).unwrap()).unwrap(), b);
    }
}
