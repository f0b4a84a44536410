//! The seed's third flow with flame: the long-lived worker is placed on a
//! runner (`place_child`), and the caller talks to it over channels whose
//! ends travel. `diff child_local.rs child_flame.rs` shows what flame
//! adds.
//!
//!   cargo run -p flame-examples --example child_flame

use flame::{channel, Sender, Stream};
use futures::StreamExt;

#[flame::remote]
async fn word_counter(mut lines: Stream<String>, counts: Sender<usize>) -> usize {
    let mut words = 0;
    while let Some(Ok(line)) = lines.next().await {
        words += line.split_whitespace().count();
        counts.send(words).await.ok();
    }
    words
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flame = flame::init().await?;
    let pool = flame.pool("words").max(1).start().await?;
    let (to_child, lines) = channel();
    let (counts, mut from_child) = channel();
    let child = flame::place_child!(pool, word_counter(lines, counts))?;
    for line in ["the quick brown fox", "jumps over", "the lazy dog"] {
        to_child.send(line.to_string()).await?;
        println!("words so far: {:?}", from_child.next().await.transpose()?);
    }
    drop(to_child);
    println!("total: {:?}", child.exit().await);
    Ok(())
}
