//! `--once`: the app's own client. It follows the page's event stream,
//! uploads generated sample videos over HTTP all at once (each streamed as
//! ffmpeg makes it), prints what happens, checks the thumbnails and the
//! rows, and waits until the pool has idled back to zero runners.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{JobSummary, Settings};

/// Length of each sample video.
const SAMPLE_SECS: u32 = 20;

/// One server-sent event.
#[derive(Debug)]
struct Sse {
    name: String,
    data: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct Row {
    at_secs: i32,
    made_by: String,
}

/// Runs the check; `Ok` when every upload made its thumbnails and rows
/// and the pool went back to zero runners.
pub(crate) async fn run(base: &str, uploads: usize, settings: &Settings) -> anyhow::Result<()> {
    let started = Instant::now();
    let http = reqwest::Client::new();
    let mut events = follow_events(http.clone(), format!("{base}events"));
    // The stream's first event tells that we are following it.
    let hello = tokio::time::timeout(Duration::from_secs(30), events.recv())
        .await
        .ok()
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("the app's event stream did not start"))?;
    anyhow::ensure!(hello.name == "hello", "first event: {hello:?}");
    let uploads = uploads.max(1);
    println!(
        "--once: uploading {uploads} generated {SAMPLE_SECS} s sample video(s) at once to {base}upload"
    );

    let mut sending = Vec::new();
    for i in 1..=uploads {
        let http = http.clone();
        let url = format!("{base}upload?name=sample-{i}.ts");
        sending.push(tokio::spawn(async move {
            let video = flame_examples::video::sample_video(SAMPLE_SECS, false)?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(video));
            let response = http.post(url).body(body).send().await?;
            let status = response.status();
            let text = response.text().await?;
            anyhow::ensure!(status.is_success(), "upload failed ({status}): {text}");
            Ok::<JobSummary, anyhow::Error>(serde_json::from_str(&text)?)
        }));
    }
    let all_sent = futures::future::join_all(sending);
    tokio::pin!(all_sent);

    let mut log = Log::new(started);
    let sent = loop {
        tokio::select! {
            done = &mut all_sent => break done,
            event = events.recv() => match event {
                Some(event) => log.show(&event),
                None => anyhow::bail!("the app's event stream ended"),
            },
        }
    };
    let mut summaries = Vec::new();
    for result in sent {
        summaries.push(result??);
    }

    // Every upload made its thumbnails, and the page was told each.
    let expected = SAMPLE_SECS.div_ceil(settings.every) as usize;
    let mut total = 0;
    for s in &summaries {
        anyhow::ensure!(
            s.thumbnails == expected,
            "{} made {} thumbnails, expected {expected}",
            s.job,
            s.thumbnails
        );
        total += s.thumbnails;
    }

    // The pool idles back to zero.
    let deadline = Duration::from_secs(settings.idle_secs + 60);
    let waited = tokio::time::timeout(deadline, async {
        while !log.active.is_empty() || log.max_active == 0 {
            match events.recv().await {
                Some(event) => log.show(&event),
                None => return false,
            }
        }
        true
    })
    .await;
    anyhow::ensure!(
        waited == Ok(true),
        "the pool did not idle back to zero runners within {deadline:?} (still up: {:?})",
        log.active
    );
    for s in &summaries {
        anyhow::ensure!(
            log.thumbs.get(&s.job).copied().unwrap_or(0) == s.thumbnails,
            "the page was told {} thumbnails of {}, the upload made {}",
            log.thumbs.get(&s.job).copied().unwrap_or(0),
            s.job,
            s.thumbnails
        );
    }

    // A row per thumbnail in PostgreSQL, written by the runner that made it.
    println!("rows in PostgreSQL:");
    let mut rows_total = 0;
    for s in &summaries {
        let rows: Vec<Row> = http
            .get(format!("{base}api/jobs/{}/rows", s.job))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let by: BTreeSet<String> = rows.iter().map(|r| short(&r.made_by)).collect();
        let at: Vec<String> = rows.iter().map(|r| r.at_secs.to_string()).collect();
        println!(
            "  {} ({}): {} rows, at {} s, made by runner {}",
            s.job,
            s.name,
            rows.len(),
            at.join(" "),
            by.into_iter().collect::<Vec<_>>().join(", ")
        );
        anyhow::ensure!(
            rows.len() == s.thumbnails,
            "{} rows for {} thumbnails",
            rows.len(),
            s.thumbnails
        );
        anyhow::ensure!(
            rows.iter().all(|r| s.runners.contains(&r.made_by)),
            "rows of {} name a runner that sent none of its thumbnails",
            s.job
        );
        rows_total += rows.len();
    }
    println!(
        "ok: {} uploads, {total} thumbnails, {rows_total} rows, {} runners booted (at most {} at once), pool back to 0 runners, {:.1} s",
        summaries.len(),
        log.booted.len(),
        log.max_active,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the event stream showed so far, and its printing.
struct Log {
    started: Instant,
    active: BTreeSet<String>,
    booted: BTreeSet<String>,
    max_active: usize,
    thumbs: BTreeMap<String, usize>,
    waiting: u64,
    /// Runners last seen idle.
    idle: BTreeSet<String>,
}

impl Log {
    fn new(started: Instant) -> Log {
        Log {
            started,
            active: BTreeSet::new(),
            booted: BTreeSet::new(),
            max_active: 0,
            thumbs: BTreeMap::new(),
            waiting: 0,
            idle: BTreeSet::new(),
        }
    }

    fn show(&mut self, event: &Sse) {
        let d = &event.data;
        let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
        let line = match event.name.as_str() {
            "runner" => {
                let runner = s("runner");
                let kind = s("kind");
                let was_idle = self.idle.contains(&runner);
                if kind == "runner_idle" || kind == "runner_ready" {
                    self.idle.insert(runner.clone());
                } else if kind != "runner_draining" {
                    self.idle.remove(&runner);
                }
                if kind == "runner_gone" || kind == "boot_failed" {
                    self.active.remove(&runner);
                } else {
                    self.active.insert(runner.clone());
                    self.booted.insert(runner.clone());
                }
                self.max_active = self.max_active.max(self.active.len());
                let what = match kind.as_str() {
                    "runner_booting" => "booting".to_string(),
                    "runner_ready" => "ready".to_string(),
                    "runner_busy" => format!("busy ({} running)", d["load"]),
                    "runner_idle" => "idle".to_string(),
                    "runner_draining" => "leaving".to_string(),
                    "runner_gone" if was_idle => format!("idled down ({})", s("reason")),
                    "runner_gone" => format!("gone ({})", s("reason")),
                    _ => format!("boot failed: {}", s("reason")),
                };
                format!(
                    "runner {:<8}  {what}   [{} in the pool]",
                    short(&runner),
                    self.active.len()
                )
            }
            "job" => {
                let job = s("job");
                match s("status").as_str() {
                    "started" => format!("{job}  upload of {} started", s("name")),
                    "done" => format!(
                        "{job}  done: {} thumbnails in {:.2} s",
                        d["thumbnails"],
                        d["secs"].as_f64().unwrap_or(0.0)
                    ),
                    _ => format!("{job}  failed: {}", s("error")),
                }
            }
            "pool" => {
                let waiting = d["waiting"].as_u64().unwrap_or(0);
                if waiting == self.waiting {
                    return;
                }
                self.waiting = waiting;
                format!("pool: {waiting} upload(s) waiting for a runner")
            }
            "thumb" => {
                let job = s("job");
                *self.thumbs.entry(job.clone()).or_default() += 1;
                format!(
                    "{job}  thumbnail at {:>2} s ({} bytes) from runner {}",
                    d["at_secs"],
                    d["bytes"],
                    short(&s("runner"))
                )
            }
            _ => return,
        };
        println!("{:>8.3} s  {line}", self.started.elapsed().as_secs_f64());
    }
}

fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

/// Follows `GET url` (server-sent events) in a task; events arrive on the
/// channel, which closes when the stream ends.
fn follow_events(http: reqwest::Client, url: String) -> mpsc::UnboundedReceiver<Sse> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let Ok(response) = http.get(&url).send().await else {
            return;
        };
        let mut body = response.bytes_stream();
        let mut pending = String::new();
        let (mut name, mut data) = (String::new(), String::new());
        while let Some(Ok(chunk)) = body.next().await {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                let line = line.trim_end_matches(['\r', '\n']);
                if line.is_empty() {
                    if !data.is_empty() {
                        let event = Sse {
                            name: std::mem::take(&mut name),
                            data: serde_json::from_str(&data).unwrap_or_default(),
                        };
                        data.clear();
                        if tx.send(event).is_err() {
                            return;
                        }
                    }
                } else if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
        }
    });
    rx
}
