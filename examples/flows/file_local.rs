//! The seed's second flow, on one machine: write a file to a temporary
//! file, run a command on it, return what it printed. `file_flame.rs` is
//! the same program with the work on a runner; `diff file_local.rs
//! file_flame.rs` shows what flame adds.
//!
//!   cargo run -p flame-examples --example file_local [FILE]

use std::error::Error;
use std::io;

use tokio::io::{AsyncRead, AsyncWriteExt};

async fn checksum(mut input: impl AsyncRead + Unpin) -> io::Result<String> {
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
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/etc/hostname".into());
    let file = tokio::fs::File::open(&path).await?;
    let sum = checksum(file).await?;
    println!("{path}: cksum {sum}");
    Ok(())
}
