//! A parameter or a result written `Bytes` decodes as a slice of the
//! message it came in, not as a copy (`flame_core::codec::SharedBytes`).

use bytes::Bytes;
use flame::RemoteFn;
use flame_core::codec::{self, with_source};
use flame_core::registry::{Invocation, Registry};
use flame_core::state::States;

/// Where its argument's bytes are, and how many.
#[flame::remote]
async fn where_is(data: Bytes) -> (usize, usize) {
    (data.as_ptr() as usize, data.len())
}

#[flame::remote]
async fn echo(data: Bytes) -> Bytes {
    data
}

#[flame::remote]
fn checked(data: Bytes) -> Result<Bytes, String> {
    Ok(data)
}

/// Whether `len` bytes at `addr` lie within `outer`.
fn within(outer: &[u8], addr: usize, len: usize) -> bool {
    let start = outer.as_ptr() as usize;
    addr >= start && addr + len <= start + outer.len()
}

#[tokio::test]
async fn a_bytes_argument_is_a_slice_of_the_call() {
    let data = Bytes::from(vec![7u8; 64 << 10]);
    let mut body = Vec::new();
    where_is::encode_args(&(data.clone(),), &mut body).unwrap();
    let message = Bytes::from(body);
    let handler = Registry::global()
        .unwrap()
        .get(where_is::NAME)
        .expect("registered");
    let Invocation::Async(run) = handler(message.clone(), &States::default()) else {
        panic!("an async function");
    };
    let (addr, len): (usize, usize) = codec::decode(&run.await.unwrap()).unwrap();
    assert_eq!(len, data.len());
    assert!(within(&message, addr, len), "a copy, not a slice");
}

#[test]
fn a_bytes_result_is_a_slice_of_the_reply() {
    let data = Bytes::from(vec![7u8; 64 << 10]);
    let reply = Bytes::from(codec::encode(&data).unwrap());
    let out = with_source(&reply, || echo::decode_output(&reply)).unwrap();
    assert_eq!(out, data);
    assert!(within(&reply, out.as_ptr() as usize, out.len()));

    let reply = Bytes::from(codec::encode(&Ok::<_, String>(data.clone())).unwrap());
    let out = with_source(&reply, || checked::decode_output(&reply))
        .unwrap()
        .unwrap();
    assert_eq!(out, data);
    assert!(within(&reply, out.as_ptr() as usize, out.len()));
    let reply = codec::encode(&Err::<Bytes, _>("no".to_string())).unwrap();
    assert_eq!(
        checked::decode_output(&reply).unwrap(),
        Err("no".to_string())
    );
}
