//! How arguments and results are encoded: MessagePack with named struct
//! fields (so structs may gain fields), through serde.
//!
//! Parent and runner must agree on this; it is part of the wire protocol
//! (see `PROTOCOL.md`).

use serde::{de::DeserializeOwned, Serialize};

/// Encodes a value.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(value)
}

/// Decodes a value.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
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
}
