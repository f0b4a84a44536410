//! How arguments and results are encoded: MessagePack with named struct
//! fields (so structs may gain fields), through serde. Sequences of bytes
//! (`Vec<u8>`, `&[u8]`, `Box<[u8]>`) travel as MessagePack `bin`, as
//! `bytes::Bytes` does, not as arrays of integers: no `serde_bytes` needed
//! for byte payloads to cost what their length does.
//!
//! Parent and runner must agree on this; it is part of the wire protocol
//! (see `PROTOCOL.md`).
//!
//! Decoding from a message's [`Bytes`] ([`decode_shared`], or [`decode`]
//! inside [`with_source`]) lets a [`SharedBytes`] in the value be a slice
//! of the message instead of a copy: `#[flame::remote]` decodes a
//! parameter or a result written `Bytes` that way.

use std::cell::RefCell;
use std::fmt;

use bytes::Bytes;
use rmp_serde::config::BytesMode;
use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

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

thread_local! {
    /// The message being decoded on this thread, if any (see
    /// [`with_source`]).
    static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Runs `f` (a decoding of bytes within `source`) with `source` as the
/// message that [`SharedBytes`] values borrow from; the previous source is
/// back afterwards, even if `f` panics.
pub fn with_source<R>(source: &Bytes, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Bytes>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            SOURCE.with(|s| *s.borrow_mut() = previous);
        }
    }
    let previous = SOURCE.with(|s| s.borrow_mut().replace(source.clone()));
    let _restore = Restore(previous);
    f()
}

/// Decodes a value from a message: the [`SharedBytes`] in it are slices of
/// `bytes` (no copy), which they keep alive.
pub fn decode_shared<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, DecodeError> {
    with_source(bytes, || decode(bytes))
}

/// A [`Bytes`] that decodes without a copy when it can: as a slice of the
/// message being decoded ([`decode_shared`], [`with_source`]), else as a
/// copy, like `Bytes` itself. It encodes as `Bytes` does (one `bin`).
///
/// The slice keeps the whole received message alive for as long as it is
/// held, as a raw NATS message's payload would.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SharedBytes(pub Bytes);

impl SharedBytes {
    /// The bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.0.len())
    }
}

impl From<Bytes> for SharedBytes {
    fn from(bytes: Bytes) -> SharedBytes {
        SharedBytes(bytes)
    }
}

impl Serialize for SharedBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

/// `bytes` as a slice of the current source when it lies within it, else
/// a copy.
fn borrow_or_copy(bytes: &[u8]) -> Bytes {
    SOURCE.with(|s| match s.borrow().as_ref() {
        Some(source) if within(source, bytes) => source.slice_ref(bytes),
        _ => Bytes::copy_from_slice(bytes),
    })
}

fn within(source: &[u8], part: &[u8]) -> bool {
    let (start, end) = (
        source.as_ptr() as usize,
        source.as_ptr() as usize + source.len(),
    );
    let p = part.as_ptr() as usize;
    !part.is_empty() && p >= start && p + part.len() <= end
}

impl<'de> Deserialize<'de> for SharedBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SharedBytes, D::Error> {
        struct BytesVisitor;

        impl<'de> Visitor<'de> for BytesVisitor {
            type Value = SharedBytes;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }

            fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<SharedBytes, E> {
                Ok(SharedBytes(borrow_or_copy(v)))
            }

            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<SharedBytes, E> {
                Ok(SharedBytes(Bytes::copy_from_slice(v)))
            }

            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<SharedBytes, E> {
                Ok(SharedBytes(Bytes::from(v)))
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<SharedBytes, E> {
                Ok(SharedBytes(borrow_or_copy(v.as_bytes())))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SharedBytes, E> {
                Ok(SharedBytes(Bytes::copy_from_slice(v.as_bytes())))
            }

            // (What `Bytes` itself accepts: an array of integers.)
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SharedBytes, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(SharedBytes(Bytes::from(out)))
            }
        }

        deserializer.deserialize_byte_buf(BytesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_bytes_are_slices_of_the_message_they_decode_from() {
        let data = Bytes::from(vec![9u8; 1000]);
        let message = Bytes::from(encode(&(data.clone(), 7u8)).unwrap());
        let (shared, n): (SharedBytes, u8) = decode_shared(&message).unwrap();
        assert_eq!((&shared.0, n), (&data, 7));
        // The same memory: no copy.
        assert!(within(&message, &shared.0));
        // Without a source (or from other bytes), a copy.
        let (copied, _): (SharedBytes, u8) = decode(&message).unwrap();
        assert_eq!(copied.0, data);
        assert!(!within(&message, &copied.0));
        let other = Bytes::from(encode(&(data.clone(), 1u8)).unwrap());
        let (copied, _): (SharedBytes, u8) = with_source(&other, || decode(&message)).unwrap();
        assert!(!within(&message, &copied.0) && !within(&other, &copied.0));
        // The source is gone afterwards.
        SOURCE.with(|s| assert!(s.borrow().is_none()));
    }

    #[test]
    fn shared_bytes_decode_what_bytes_encode_and_the_reverse() {
        for data in [Bytes::new(), Bytes::from_static(b"abc")] {
            let wire = Bytes::from(encode(&data).unwrap());
            assert_eq!(decode_shared::<SharedBytes>(&wire).unwrap().0, data);
            let shared = encode(&SharedBytes(data.clone())).unwrap();
            assert_eq!(shared, wire.to_vec());
            assert_eq!(decode::<Bytes>(&shared).unwrap(), data);
        }
        // An array of integers, as `Bytes` accepts it.
        let array = encode(&vec![1u16, 2, 3]).unwrap();
        assert_eq!(decode::<SharedBytes>(&array).unwrap().0, &[1u8, 2, 3][..]);
        assert!(decode::<SharedBytes>(&encode(&vec![300u16]).unwrap()).is_err());
    }

    #[test]
    fn the_source_comes_back_after_a_panic() {
        let outer = Bytes::from_static(b"outer");
        with_source(&outer, || {
            let inner = Bytes::from_static(b"inner");
            let _ = std::panic::catch_unwind(|| with_source(&inner, || panic!("decoding")));
            SOURCE.with(|s| assert_eq!(s.borrow().as_ref(), Some(&outer)));
        });
    }

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
