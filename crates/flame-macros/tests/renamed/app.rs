//! An app that calls the facade `fire`: every macro form, by that name.

use fire::State;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Tile {
    n: u32,
}

#[fire::remote]
fn bytes_of(tile: Tile, extra: Vec<u8>) -> Vec<u8> {
    let mut out = tile.n.to_le_bytes().to_vec();
    out.extend(extra);
    out
}

#[fire::remote]
async fn offset(State(base): State<u32>, x: u32) -> Result<Vec<u8>, String> {
    Ok(vec![(base + x) as u8])
}

#[allow(dead_code)]
async fn on_a_pool(pool: fire::Pool) -> Result<(), fire::Error> {
    let _: Vec<u8> = fire::call!(pool, bytes_of(Tile { n: 1 }, vec![2])).await?;
    let _: Result<Vec<u8>, String> = fire::call!(pool, offset(3)).await?;
    // Inline blocks ship the listed variables of the enclosing scope.
    let x = 1u32;
    let _: u32 = fire::call!(pool, |x: u32| -> u32 { x + 1 }).await?;
    let x = 2u32;
    fire::cast!(pool, async |x: u32| {
        let _ = x;
    })?;
    Ok(())
}

fn main() {
    assert_eq!(
        <bytes_of as fire::RemoteFn>::NAME,
        concat!(module_path!(), "::bytes_of")
    );
    assert_eq!(bytes_of(Tile { n: 1 }, vec![2]), vec![1, 0, 0, 0, 2]);
}
