//! `nats-lite`: a stand-in for a few commands of the `nats` CLI (natscli),
//! for the compose test's tools image, which cannot download natscli
//! (no package registry ships it). The compose file's own tools image,
//! `natsio/nats-box`, has the real CLI; installed as `nats` in the test's
//! image, this answers the same commands the README shows:
//!
//! ```text
//! nats micro ls                 services and their instances
//! nats micro info NAME          each instance, with its metadata
//! nats micro stats NAME         requests, errors and processing time per instance
//! nats sub SUBJECT [--count N]  messages with their headers
//! nats kv ls [BUCKET]           buckets, or a bucket's keys
//! nats kv get BUCKET KEY        a value
//! nats kv watch BUCKET          values as they change
//! ```
//!
//! The server is `--server URL` (or `-s URL`), else `NATS_URL`, else
//! `nats://127.0.0.1:4222`.

use std::time::Duration;

use futures::StreamExt;

/// How long `micro` commands wait for the answers of every instance.
const GATHER: Duration = Duration::from_millis(1000);

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut server = std::env::var("NATS_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or("nats://127.0.0.1:4222".into());
    if let Some(i) = args.iter().position(|a| a == "--server" || a == "-s") {
        anyhow::ensure!(i + 1 < args.len(), "--server takes a URL");
        server = args.remove(i + 1);
        args.remove(i);
    }
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let usage = "usage: nats [--server URL] (micro ls | micro info NAME | micro stats NAME | \
                 sub SUBJECT [--count N] | kv ls [BUCKET] | kv get BUCKET KEY | kv watch BUCKET)";
    if words.is_empty() || words[0] == "--help" || words[0] == "-h" {
        println!("{usage}");
        return Ok(());
    }
    let client = async_nats::connect(&server)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {server}: {e}"))?;
    match words.as_slice() {
        ["micro", "ls" | "list"] => micro_ls(&client).await,
        ["micro", "info", name] => micro_info(&client, name).await,
        ["micro", "stats", name] => micro_stats(&client, name).await,
        ["sub", subject, rest @ ..] => {
            let count = match rest {
                ["--count", n] => Some(n.parse::<usize>()?),
                [] => None,
                _ => anyhow::bail!("{usage}"),
            };
            sub(&client, subject, count).await
        }
        ["kv", "ls"] => kv_buckets(&client).await,
        ["kv", "ls", bucket] => kv_keys(&client, bucket).await,
        ["kv", "get", bucket, key] => kv_get(&client, bucket, key).await,
        ["kv", "watch", bucket] => kv_watch(&client, bucket).await,
        _ => anyhow::bail!("{usage}"),
    }
}

/// Sends a request to every instance behind `subject` and gathers the
/// answers for [`GATHER`].
async fn gather(
    client: &async_nats::Client,
    subject: String,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(subject, inbox, Default::default())
        .await?;
    client.flush().await?;
    let mut all = Vec::new();
    let deadline = tokio::time::Instant::now() + GATHER;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await {
        if let Ok(value) = serde_json::from_slice(&msg.payload) {
            all.push(value);
        }
    }
    all.sort_by_key(|v| (s(v, "name"), s(v, "id")));
    Ok(all)
}

fn s(v: &serde_json::Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

async fn micro_ls(client: &async_nats::Client) -> anyhow::Result<()> {
    let all = gather(client, "$SRV.INFO".into()).await?;
    if all.is_empty() {
        println!("No results");
        return Ok(());
    }
    println!("{:<24} {:<8} {:<24} Description", "Name", "Version", "ID");
    for v in &all {
        println!(
            "{:<24} {:<8} {:<24} {}",
            s(v, "name"),
            s(v, "version"),
            s(v, "id"),
            s(v, "description")
        );
    }
    println!("{} instance(s)", all.len());
    Ok(())
}

async fn micro_info(client: &async_nats::Client, name: &str) -> anyhow::Result<()> {
    let all = gather(client, format!("$SRV.INFO.{name}")).await?;
    anyhow::ensure!(!all.is_empty(), "no instance of {name} answered");
    for v in &all {
        println!(
            "{} {} (version {})",
            s(v, "name"),
            s(v, "id"),
            s(v, "version")
        );
        if let Some(meta) = v["metadata"].as_object() {
            for (k, val) in meta {
                println!("  {k}: {}", val.as_str().unwrap_or_default());
            }
        }
        for e in v["endpoints"].as_array().into_iter().flatten() {
            println!("  endpoint {} on {}", s(e, "name"), s(e, "subject"));
        }
    }
    Ok(())
}

async fn micro_stats(client: &async_nats::Client, name: &str) -> anyhow::Result<()> {
    let all = gather(client, format!("$SRV.STATS.{name}")).await?;
    anyhow::ensure!(!all.is_empty(), "no instance of {name} answered");
    println!(
        "{:<34} {:>9} {:>7} {:>14}  Data",
        "ID", "Requests", "Errors", "Avg time (ms)"
    );
    for v in &all {
        for e in v["endpoints"].as_array().into_iter().flatten() {
            let avg_ns = e["average_processing_time"].as_f64().unwrap_or(0.0);
            println!(
                "{:<34} {:>9} {:>7} {:>14.3}  {}",
                s(v, "id"),
                e["num_requests"],
                e["num_errors"],
                avg_ns / 1e6,
                e["data"]
            );
        }
    }
    Ok(())
}

async fn sub(
    client: &async_nats::Client,
    subject: &str,
    count: Option<usize>,
) -> anyhow::Result<()> {
    let mut messages = client.subscribe(subject.to_string()).await?;
    let mut n = 0;
    while let Some(msg) = messages.next().await {
        n += 1;
        println!("[#{n}] Received on \"{}\"", msg.subject);
        if let Some(headers) = &msg.headers {
            for (name, values) in headers.iter() {
                for value in values {
                    println!("{name}: {value}");
                }
            }
        }
        println!("{}\n", String::from_utf8_lossy(&msg.payload));
        if count.is_some_and(|c| n >= c) {
            break;
        }
    }
    Ok(())
}

async fn kv_buckets(client: &async_nats::Client) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let mut names = js.stream_names();
    let mut buckets = Vec::new();
    while let Some(name) = names.next().await {
        if let Some(bucket) = name?.strip_prefix("KV_") {
            buckets.push(bucket.to_string());
        }
    }
    buckets.sort();
    if buckets.is_empty() {
        println!("No Key-Value buckets found");
    }
    for b in buckets {
        println!("{b}");
    }
    Ok(())
}

async fn kv_keys(client: &async_nats::Client, bucket: &str) -> anyhow::Result<()> {
    let kv = async_nats::jetstream::new(client.clone())
        .get_key_value(bucket)
        .await?;
    let mut keys: Vec<String> = kv
        .keys()
        .await?
        .filter_map(|k| async { k.ok() })
        .collect()
        .await;
    keys.sort();
    for k in keys {
        println!("{k}");
    }
    Ok(())
}

async fn kv_get(client: &async_nats::Client, bucket: &str, key: &str) -> anyhow::Result<()> {
    let kv = async_nats::jetstream::new(client.clone())
        .get_key_value(bucket)
        .await?;
    match kv.get(key).await? {
        Some(value) => println!("{}", String::from_utf8_lossy(&value)),
        None => anyhow::bail!("{bucket} > {key}: no such key"),
    }
    Ok(())
}

async fn kv_watch(client: &async_nats::Client, bucket: &str) -> anyhow::Result<()> {
    let kv = async_nats::jetstream::new(client.clone())
        .get_key_value(bucket)
        .await?;
    let mut entries = kv.watch_all().await?;
    while let Some(entry) = entries.next().await {
        let entry = entry?;
        println!(
            "[{}] {:?} {} > {}: {}",
            entry.created,
            entry.operation,
            bucket,
            entry.key,
            String::from_utf8_lossy(&entry.value)
        );
    }
    Ok(())
}
