//! `flame pools`: every pool whose parents answer on `flame.pools.info`,
//! one row per pool (a shared pool's parents merged, a private pool per
//! parent).

use std::collections::BTreeMap;
use std::time::Duration;

use flame_nats::ops::{PoolInfo, POOLS_INFO_SUBJECT};

use crate::connection::Connection;
use crate::error::CliError;
use crate::gather::{decoded, gather};
use crate::table::{render, short};

/// Columns of the table.
pub(crate) const HEADER: [&str; 11] = [
    "POOL", "KIND", "PARENTS", "RUNNERS", "READY", "LOAD", "WAITING", "MIN", "MAX", "SCALER",
    "BUILD",
];

/// One pool, merged over the parents that answered for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolRow {
    pub(crate) pool: String,
    pub(crate) shared: bool,
    pub(crate) parents: usize,
    pub(crate) runners: usize,
    pub(crate) ready: usize,
    pub(crate) load: usize,
    pub(crate) waiting: usize,
    pub(crate) min: usize,
    pub(crate) max: usize,
    /// Parent ids of the scalers (one per build).
    pub(crate) scalers: Vec<String>,
    pub(crate) builds: Vec<String>,
}

impl PoolRow {
    /// The row's cells, in [`HEADER`]'s order.
    pub(crate) fn cells(&self) -> Vec<String> {
        let list = |ids: &[String], n: usize| {
            if ids.is_empty() {
                "-".to_string()
            } else {
                ids.iter()
                    .map(|id| short(id, n))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        vec![
            self.pool.clone(),
            if self.shared { "shared" } else { "private" }.to_string(),
            self.parents.to_string(),
            self.runners.to_string(),
            self.ready.to_string(),
            self.load.to_string(),
            self.waiting.to_string(),
            self.min.to_string(),
            self.max.to_string(),
            list(&self.scalers, 8),
            list(&self.builds, 12),
        ]
    }
}

/// Merges the answers: a shared pool is one row whatever the number of
/// its parents (runners, ready and load as the best-informed parent sees
/// them, every parent's waiting callers, the limits of its scaler); a
/// private pool is one row per parent. Sorted by pool, then parent.
pub(crate) fn merge(infos: Vec<PoolInfo>) -> Vec<PoolRow> {
    let mut groups: BTreeMap<(String, String), Vec<PoolInfo>> = BTreeMap::new();
    for info in infos {
        let owner = if info.shared {
            String::new()
        } else {
            info.parent.clone()
        };
        groups
            .entry((info.pool.clone(), owner))
            .or_default()
            .push(info);
    }
    groups
        .into_values()
        .map(|infos| {
            let first = &infos[0];
            let limits = infos.iter().find(|i| i.scaler).unwrap_or(first);
            let mut scalers: Vec<String> = infos
                .iter()
                .filter(|i| i.scaler)
                .map(|i| i.parent.clone())
                .collect();
            scalers.sort();
            let mut builds: Vec<String> = infos.iter().map(|i| i.build.clone()).collect();
            builds.sort();
            builds.dedup();
            let mut parents: Vec<&str> = infos.iter().map(|i| i.parent.as_str()).collect();
            parents.sort();
            parents.dedup();
            PoolRow {
                pool: first.pool.clone(),
                shared: first.shared,
                parents: parents.len(),
                runners: infos.iter().map(|i| i.runners).max().unwrap_or(0),
                ready: infos.iter().map(|i| i.ready).max().unwrap_or(0),
                load: infos.iter().map(|i| i.load).max().unwrap_or(0),
                waiting: infos.iter().map(|i| i.waiting).sum(),
                min: limits.min,
                max: limits.max,
                scalers,
                builds,
            }
        })
        .collect()
}

/// Asks every parent for its pools, for `wait`.
pub(crate) async fn gather_rows(
    client: &async_nats::Client,
    wait: Duration,
) -> Result<Vec<PoolRow>, CliError> {
    let answers = gather(client, POOLS_INFO_SUBJECT.to_string(), wait).await?;
    Ok(merge(decoded(&answers)))
}

/// `flame pools`.
pub(crate) async fn run(connection: &Connection, wait: Duration) -> Result<(), CliError> {
    let client = &connection.client;
    let rows = connection
        .refusals
        .guard(client, gather_rows(client, wait))
        .await?;
    if rows.is_empty() {
        eprintln!(
            "no pool answered on {POOLS_INFO_SUBJECT} within {wait:?} (no parent with a started pool is connected)"
        );
    }
    let cells: Vec<Vec<String>> = rows.iter().map(PoolRow::cells).collect();
    print!("{}", render(&HEADER, &cells));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pool: &str, parent: &str, shared: bool, scaler: bool) -> PoolInfo {
        serde_json::from_value(serde_json::json!({
            "pool": pool, "parent": parent, "build": format!("build-{parent}"), "shared": shared,
            "min": if scaler { 1 } else { 0 }, "max": 8, "max_concurrency": 4,
            "runners": if scaler { 3 } else { 2 }, "ready": 2, "load": 5, "waiting": 1,
            "scaler": scaler, "started": "2026-11-22T08:00:00.000Z"
        }))
        .unwrap()
    }

    #[test]
    fn shared_pools_merge_and_private_pools_stay_apart() {
        let rows = merge(vec![
            info("thumbs", "p2", true, false),
            info("thumbs", "p1", true, true),
            info("mail", "p1", false, false),
            info("mail", "p3", false, false),
        ]);
        assert_eq!(rows.len(), 3);
        let shared = rows.iter().find(|r| r.shared).unwrap();
        assert_eq!(
            (shared.parents, shared.runners, shared.waiting, shared.min),
            (2, 3, 2, 1)
        );
        assert_eq!(shared.scalers, vec!["p1".to_string()]);
        assert_eq!(shared.builds.len(), 2);
        assert_eq!(
            rows[0].cells(),
            ["mail", "private", "1", "2", "2", "5", "1", "0", "8", "-", "build-p1"]
        );
    }
}
