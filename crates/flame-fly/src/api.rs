//! The Machines API client ([`Api`]): requests with retries, and the waits
//! on a Machine's state (started, destroyed, exited) built on them.

use std::time::Duration;

use reqwest::StatusCode;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::FlyError;
use crate::retry::{pause, transient, ATTEMPTS};

/// Longest single wait for a Machine to start: a Machine that fails
/// while a wait is held may only be answered at the wait's timeout (Fly
/// does not document what it answers then), so the state is read at least
/// this often.
const WAIT_SLICE: Duration = Duration::from_secs(5);

/// Pause before asking again after a wait that answered at once with an
/// error (not a timeout).
const WAIT_AGAIN_PAUSE: Duration = Duration::from_millis(250);

/// Whole seconds for a wait's `timeout` parameter: `left` rounded up (a
/// wait never ends before what it stands for), within Fly's 1 to 60.
fn wait_secs(left: Duration) -> u64 {
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    secs.clamp(1, 60)
}

/// One app's Machines endpoint and the token to speak to it with.
#[derive(Clone)]
pub(crate) struct Api {
    http: reqwest::Client,
    /// `<api>/v1/apps/<app>/machines`
    base: String,
    token: String,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Api {
    /// The client for `<api_url>/v1/apps/<app>/machines`.
    pub(crate) fn new(http: reqwest::Client, api_url: &str, app: &str, token: String) -> Self {
        Api {
            http,
            base: format!("{}/v1/apps/{app}/machines", api_url.trim_end_matches('/')),
            token,
        }
    }

    /// Sends a request. Transient failures (rate limits, no capacity,
    /// 5xx, the API unreachable) are retried with exponential backoff and
    /// jitter, honouring `Retry-After`; any other error is returned at once
    /// with the API's status and message.
    pub(crate) async fn send<F>(&self, make: F) -> Result<reqwest::Response, FlyError>
    where
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        self.send_until(make, None).await
    }

    /// [`Api::send`], retrying only while a pause still ends before
    /// `until`.
    pub(crate) async fn send_until<F>(
        &self,
        make: F,
        until: Option<Instant>,
    ) -> Result<reqwest::Response, FlyError>
    where
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        let mut attempt = 1;
        loop {
            let (error, retry_after) = match self.once(&make).await {
                Ok(response) => return Ok(response),
                Err(failed) => failed,
            };
            let worth_it = match &error {
                FlyError::Transport(e) => e.is_connect() || e.is_timeout(),
                FlyError::Api { status, .. } => StatusCode::from_u16(*status)
                    .map(transient)
                    .unwrap_or(false),
                _ => false,
            };
            let wait = pause(attempt, retry_after);
            let in_time = until.is_none_or(|at| Instant::now() + wait < at);
            if !(worth_it && attempt < ATTEMPTS && in_time) {
                return Err(error);
            }
            debug!(attempt, "Machines API asks to try again: {error}");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// One request: the response when it succeeded, else the error with
    /// the `Retry-After` the API asked for.
    async fn once<F>(&self, make: &F) -> Result<reqwest::Response, (FlyError, Option<Duration>)>
    where
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        let response = make(&self.http, &self.base)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| (FlyError::Transport(e), None))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let message = response.text().await.unwrap_or_default();
        Err((
            FlyError::Api {
                status: status.as_u16(),
                message,
            },
            retry_after,
        ))
    }

    /// The Machine's state (`started`, `failed`, ...), `destroyed` when the
    /// API no longer knows it.
    async fn state(&self, id: &str, until: Option<Instant>) -> Result<String, FlyError> {
        let shown = self
            .send_until(|http, base| http.get(format!("{base}/{id}")), until)
            .await;
        let shown = match shown {
            Ok(shown) => shown,
            Err(FlyError::Api { status: 404, .. }) => return Ok("destroyed".into()),
            Err(e) => return Err(e),
        };
        let machine: serde_json::Value = shown.json().await.map_err(FlyError::Transport)?;
        Ok(machine["state"].as_str().unwrap_or("unknown").to_string())
    }

    /// Waits until the Machine has started, at most until `deadline`; an
    /// error when it cannot (it failed, or was destroyed or stopped
    /// first), or when time runs out while it is still `created` or
    /// `starting`.
    ///
    /// Fly does not document what a wait answers once the Machine has
    /// failed (its CLI matches the words "machine failed to reach desired
    /// state"); so after any wait that does not say "started", the Machine
    /// is read (`GET`) before waiting again, and a Machine in any state
    /// but `created` or `starting` ends the boot at once.
    pub(crate) async fn wait_started(
        &self,
        id: &str,
        instance: Option<&str>,
        deadline: Option<Instant>,
    ) -> Result<(), FlyError> {
        let instance = instance
            .map(|i| format!("instance_id={i}&"))
            .unwrap_or_default();
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let secs = wait_secs(left.unwrap_or(WAIT_SLICE).min(WAIT_SLICE));
            let asked = Instant::now();
            let make = |http: &reqwest::Client, base: &str| {
                http.get(format!(
                    "{base}/{id}/wait?{instance}state=started&timeout={secs}"
                ))
            };
            let wait = self.once(&make);
            let waited = match deadline {
                Some(at) => tokio::time::timeout_at(at, wait).await.ok(),
                None => Some(wait.await),
            };
            let message = match waited {
                Some(Ok(_)) => return Ok(()),
                Some(Err((e, _))) => e.to_string(),
                None => "the boot timeout ran out while waiting".to_string(),
            };
            let state = self.state(id, deadline).await?;
            match state.as_str() {
                "started" => return Ok(()),
                "created" | "starting" if deadline.is_none_or(|at| Instant::now() < at) => {
                    debug!(machine = %id, %state, "Machine not started yet: {message}");
                    // A wait refused at once (a rate limit, say) is not
                    // asked again in a tight loop.
                    if asked.elapsed() < WAIT_AGAIN_PAUSE {
                        tokio::time::sleep(WAIT_AGAIN_PAUSE).await;
                    }
                }
                _ => {
                    return Err(FlyError::NotStarted {
                        machine: id.to_string(),
                        state,
                        message,
                    })
                }
            }
        }
    }

    /// Waits until the Machine is destroyed, at most until `until` (a wait
    /// answered otherwise than "destroyed" or its timeout is followed by a
    /// read of the Machine's state).
    pub(crate) async fn wait_destroyed(&self, id: &str, until: Instant) {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let secs = wait_secs(left);
            let asked = Instant::now();
            let make = |http: &reqwest::Client, base: &str| {
                http.get(format!("{base}/{id}/wait?state=destroyed&timeout={secs}"))
            };
            let wait = self.once(&make);
            match tokio::time::timeout_at(until, wait).await {
                Err(_) => return,
                Ok(Ok(_)) => return,
                Ok(Err((FlyError::Api { status: 408, .. }, _))) => continue,
                Ok(Err((FlyError::Api { status: 404, .. }, _))) => return,
                Ok(Err((e, _))) => {
                    debug!(machine = %id, "cannot wait for the Machine's end: {e}");
                    if matches!(
                        self.state(id, Some(until)).await.as_deref(),
                        Ok("destroyed" | "destroying")
                    ) {
                        return;
                    }
                    if asked.elapsed() < WAIT_AGAIN_PAUSE {
                        tokio::time::sleep(WAIT_AGAIN_PAUSE).await;
                    }
                }
            }
        }
    }

    /// Resolves when the Machine is destroyed (its runner exited; Machines
    /// are made with `auto_destroy`), with a reason for the pool, and makes
    /// sure it is gone.
    pub(crate) async fn watch_exit(self, id: String, instance: Option<String>) -> String {
        let instance = instance
            .map(|i| format!("instance_id={i}&"))
            .unwrap_or_default();
        let reason = loop {
            let waited = self
                .http
                .get(format!(
                    "{}/{id}/wait?{instance}state=destroyed&timeout=60",
                    self.base
                ))
                .bearer_auth(&self.token)
                .send()
                .await;
            match waited.map(|r| r.status()) {
                Ok(s) if s.is_success() => {
                    break match self.exit_of(&id).await {
                        Some(exit) => exit,
                        None => format!("Fly Machine {id} was destroyed (its runner exited)"),
                    }
                }
                Ok(StatusCode::NOT_FOUND) => break format!("Fly Machine {id} is gone"),
                // 408: still running after the wait's limit; wait again.
                Ok(StatusCode::REQUEST_TIMEOUT) => {}
                Ok(s) => {
                    debug!(machine = %id, status = %s, "cannot wait for the Machine's end");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    debug!(machine = %id, "cannot wait for the Machine's end: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        // Destroyed already, normally; make sure nothing is left.
        if let Err(e) = self.destroy(&id).await {
            warn!(machine = %id, "cannot destroy Fly Machine: {e}");
        }
        reason
    }

    /// How the Machine's runner ended, from its latest `exit` event (`GET`
    /// of the Machine lists its events): out of memory when the kernel's
    /// OOM killer ended it, else its exit code. `None` when the API does
    /// not say.
    async fn exit_of(&self, id: &str) -> Option<String> {
        let shown = self
            .send(|http, base| http.get(format!("{base}/{id}")))
            .await
            .ok()?;
        let machine: serde_json::Value = shown.json().await.ok()?;
        let exit = machine["events"]
            .as_array()?
            .iter()
            .filter(|e| e["type"] == "exit")
            .max_by_key(|e| e["timestamp"].as_i64().unwrap_or(0))?;
        let exit = &exit["request"]["exit_event"];
        // (No code, no claim: "exited with code 0" would read as a clean
        // stop.)
        let code = exit["exit_code"].as_i64()?;
        Some(if exit["oom_killed"].as_bool() == Some(true) {
            format!(
                "Fly Machine {id}: runner process ran out of memory (killed by the OOM killer, exit code {code})"
            )
        } else {
            format!("Fly Machine {id}: runner process exited with code {code}")
        })
    }

    /// Destroys a Machine, running or not. Gone already counts as done.
    pub(crate) async fn destroy(&self, id: &str) -> Result<(), FlyError> {
        let response = self
            .http
            .delete(format!("{}/{id}?force=true", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(FlyError::Transport)?;
        match response.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(FlyError::Api {
                status: s.as_u16(),
                message: response.text().await.unwrap_or_default(),
            }),
        }
    }
}
