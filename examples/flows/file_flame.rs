//! The seed's second flow with flame: the file streams to a runner, which
//! writes it to a temporary file there, runs a command on it and returns
//! what it printed. `diff file_local.rs file_flame.rs` shows what flame
//! adds to the local version.
//!
//!   cargo run -p flame-examples --example file_flame [FILE]

use std::error::Error;

use flame::{RemoteError, Stream};
use tokio::io::AsyncWriteExt;

#[flame::remote]
async fn checksum(input: Stream<bytes::Bytes>) -> Result<String, RemoteError> {
    let mut input = input.into_reader();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("input");
    let mut file = tokio::fs::File::create(&path).await?;
    tokio::io::copy(&mut input, &mut file).await?;
    file.flush().await?;
    let out = tokio::process::Command::new("cksum")
        .arg(&path)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let flame = flame::init().await?;
    let pool = flame.pool("checksum").max(2).start().await?;
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/etc/hostname".into());
    let file = tokio::fs::File::open(&path).await?;
    let sum = flame::call!(pool, checksum(Stream::from_reader(file))).await??;
    println!("{path}: cksum {sum}");
    Ok(())
}
