//! The seed's third flow, on one machine: a long-lived worker started
//! beside the caller, which talks to it over channels while it runs.
//! `child_flame.rs` is the same program with the worker placed on a runner
//! (`place_child`); `diff child_local.rs child_flame.rs` shows what flame
//! adds.
//!
//!   cargo run -p flame-examples --example child_local

use tokio::sync::mpsc::{channel, Receiver, Sender};

async fn word_counter(mut lines: Receiver<String>, counts: Sender<usize>) -> usize {
    let mut words = 0;
    while let Some(line) = lines.recv().await {
        words += line.split_whitespace().count();
        counts.send(words).await.ok();
    }
    words
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (to_child, lines) = channel(16);
    let (counts, mut from_child) = channel(16);
    let child = tokio::spawn(word_counter(lines, counts));
    for line in ["the quick brown fox", "jumps over", "the lazy dog"] {
        to_child.send(line.to_string()).await?;
        println!("words so far: {:?}", from_child.recv().await);
    }
    drop(to_child);
    println!("total: {:?}", child.await?);
    Ok(())
}
