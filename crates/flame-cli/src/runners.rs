//! `flame runners <pool>`: each runner of a pool, from the `$SRV.INFO` and
//! `$SRV.STATS` answers of its micro service (`flame-<pool>`), joined with
//! the leases of the pool's bucket when it is a shared pool.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;

use crate::connection::Connection;
use crate::error::CliError;
use crate::gather::{decoded, gather};
use crate::table::{render, short};
use crate::time::since;

/// Columns of the table.
pub(crate) const HEADER: [&str; 7] = [
    "RUNNER", "STATE", "BUILD", "LOAD", "UPTIME", "REQUESTS", "ERRORS",
];

/// A micro service's `$SRV.INFO` answer (what is used of it).
#[derive(Debug, Deserialize)]
struct Info {
    id: String,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

/// A micro service's `$SRV.STATS` answer (what is used of it).
#[derive(Debug, Deserialize)]
struct Stats {
    id: String,
    #[serde(default)]
    started: String,
    #[serde(default)]
    endpoints: Vec<EndpointStats>,
}

#[derive(Debug, Deserialize)]
struct EndpointStats {
    #[serde(default)]
    num_requests: u64,
    #[serde(default)]
    num_errors: u64,
    #[serde(default)]
    data: serde_json::Value,
}

/// A runner lease of a shared pool (what is used of it).
#[derive(Debug, Deserialize)]
struct Lease {
    runner: String,
    state: String,
    #[serde(default)]
    build: String,
    #[serde(default)]
    capacity: usize,
    #[serde(default)]
    load: usize,
}

/// One runner, from whatever answered about it.
#[derive(Debug, Default)]
struct Runner {
    info: Option<Info>,
    stats: Option<Stats>,
    lease: Option<Lease>,
}

impl Runner {
    fn cells(&self, id: &str) -> Vec<String> {
        let meta = |key: &str| {
            self.info
                .as_ref()
                .and_then(|i| i.metadata.get(key).cloned())
        };
        let endpoint = self.stats.as_ref().and_then(|s| s.endpoints.first());
        let state = match &self.lease {
            Some(lease) => lease.state.clone(),
            None => "ready".to_string(),
        };
        let build = meta("build")
            .or_else(|| self.lease.as_ref().map(|l| l.build.clone()))
            .map(|b| short(&b, 12))
            .unwrap_or_else(|| "-".into());
        let load = match (endpoint, &self.lease) {
            (Some(e), _) => format!(
                "{}/{}",
                e.data["in_flight"].as_u64().unwrap_or(0),
                e.data["max_concurrency"].as_u64().unwrap_or(0)
            ),
            (None, Some(l)) => format!("{}/{}", l.load, l.capacity),
            (None, None) => "-".into(),
        };
        let dash = || "-".to_string();
        vec![
            id.to_string(),
            state,
            build,
            load,
            self.stats
                .as_ref()
                .and_then(|s| since(&s.started))
                .unwrap_or_else(dash),
            // The runner's own counts take in the calls that came in
            // batches, which the micro service does not see one by one.
            endpoint.map_or_else(dash, |e| {
                e.data["calls"]
                    .as_u64()
                    .unwrap_or(e.num_requests)
                    .to_string()
            }),
            endpoint.map_or_else(dash, |e| {
                e.data["errors"]
                    .as_u64()
                    .unwrap_or(e.num_errors)
                    .to_string()
            }),
        ]
    }
}

/// The runner leases in the bucket `flame-<pool>`, if the pool is shared
/// (no bucket, or no JetStream: none).
async fn leases(client: &async_nats::Client, pool: &str, wait: Duration) -> Vec<Lease> {
    let read = async {
        let js = async_nats::jetstream::new(client.clone());
        let store = js.get_key_value(format!("flame-{pool}")).await.ok()?;
        let keys: Vec<String> = store
            .keys()
            .await
            .ok()?
            .filter_map(|k| async move { k.ok().filter(|k| k.starts_with("runners.")) })
            .collect()
            .await;
        let mut leases = Vec::new();
        for key in keys {
            if let Ok(Some(value)) = store.get(&key).await {
                if let Ok(lease) = serde_json::from_slice::<Lease>(&value) {
                    leases.push(lease);
                }
            }
        }
        Some(leases)
    };
    tokio::time::timeout(wait.max(Duration::from_secs(2)), read)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// `flame runners <pool>`.
pub(crate) async fn run(
    connection: &Connection,
    pool: &str,
    wait: Duration,
) -> Result<(), CliError> {
    let client = &connection.client;
    let service = format!("flame-{pool}");
    let asked = async {
        let (infos, stats, leases) = tokio::join!(
            gather(client, format!("$SRV.INFO.{service}"), wait),
            gather(client, format!("$SRV.STATS.{service}"), wait),
            leases(client, pool, wait),
        );
        Ok((infos?, stats?, leases))
    };
    let (infos, stats, leases) = connection.refusals.guard(client, asked).await?;
    let infos: Vec<Info> = decoded(&infos);
    let mut stats: HashMap<String, Stats> = decoded::<Stats>(&stats)
        .into_iter()
        .map(|s| (s.id.clone(), s))
        .collect();
    let mut runners: BTreeMap<String, Runner> = BTreeMap::new();
    for info in infos {
        let id = info
            .metadata
            .get("runner")
            .cloned()
            .unwrap_or_else(|| info.id.clone());
        let entry = runners.entry(id).or_default();
        entry.stats = stats.remove(&info.id);
        entry.info = Some(info);
    }
    for lease in leases {
        let id = lease.runner.clone();
        runners.entry(id).or_default().lease = Some(lease);
    }
    if runners.is_empty() {
        eprintln!(
            "no runner of pool `{pool}` answered on $SRV.INFO.{service} within {wait:?}, and it has no leases (is the pool's name right, and does it have runners now?)"
        );
    }
    let rows: Vec<Vec<String>> = runners.iter().map(|(id, r)| r.cells(id)).collect();
    print!("{}", render(&HEADER, &rows));
    Ok(())
}
