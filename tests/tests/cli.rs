//! The `flame` command against live pools: a real nats-server, real
//! runner processes, the built binary.

use std::process::{Output, Stdio};
use std::time::Duration;

use flame::{CallOptions, Flame};
use flame_tests::funcs::*;
use flame_tests::harness::{
    flame_cli, free_port, shared_pool, start_marked_call, wait_for, wait_in_flight, TestEnv,
};
use tokio::io::AsyncBufReadExt;

const LONG: Duration = Duration::from_secs(60);

/// The `flame` command with a clean environment (no NATS variables of the
/// machine running the tests).
fn command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(flame_cli());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in [
        "NATS_URL",
        "NATS_CREDS",
        "NATS_NKEY",
        "NATS_USER",
        "NATS_PASSWORD",
        "NATS_TOKEN",
        "NATS_CA",
        "NATS_CERT",
        "NATS_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `flame --server <env's server> args..` to its end.
async fn flame(env: &TestEnv, args: &[&str]) -> Output {
    let url = env.server.url();
    let mut all = vec!["--server", url.as_str()];
    all.extend_from_slice(args);
    let child = command(&all).spawn().expect("spawn flame");
    let out = tokio::time::timeout(LONG, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("flame {args:?} did not exit"))
        .expect("flame's output");
    // Shown with --nocapture: the README quotes it.
    println!(
        "$ flame {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The whitespace-separated cells of the line whose first cell is `first`.
fn row(stdout: &[u8], first: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(stdout);
    text.lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cells| cells.first().map(String::as_str) == Some(first))
        .unwrap_or_else(|| panic!("no row for {first} in:\n{text}"))
}

#[tokio::test]
async fn pools_lists_a_private_and_a_shared_pool() {
    let env = TestEnv::start().await;
    let second = env.another_parent().await;
    let _private = env
        .pool("cli-priv")
        .min(1)
        .max(2)
        .max_concurrency(4)
        .start()
        .await
        .unwrap();
    let build = |f: &Flame| shared_pool(f, "cli-shared").min(1).max(3);
    let a = build(&env.flame).start().await.unwrap();
    let b = build(&second).start().await.unwrap();
    wait_for("both parents to see the shared runner", LONG, || async {
        (a.status().ready == 1 && b.status().ready == 1).then_some(())
    })
    .await;
    let out = flame(&env, &["pools", "--wait", "1s"]).await;
    assert!(out.status.success(), "{out:?}");
    let header = String::from_utf8_lossy(&out.stdout);
    assert!(
        header.starts_with(
            "POOL        KIND     PARENTS  RUNNERS  READY  LOAD  WAITING  MIN  MAX  SCALER    BUILD"
        ),
        "{header}"
    );
    let private = row(&out.stdout, "cli-priv");
    assert_eq!(
        private,
        [
            "cli-priv",
            "private",
            "1",
            "1",
            "1",
            "0",
            "0",
            "1",
            "2",
            "-",
            "flame-test-b"
        ]
    );
    let shared = row(&out.stdout, "cli-shared");
    assert_eq!(
        shared[..9],
        ["cli-shared", "shared", "2", "1", "1", "0", "0", "1", "3"]
    );
    let parents = [env.flame.parent_id(), second.parent_id()].map(|p| p[..8].to_string());
    assert!(parents.contains(&shared[9]), "scaler {shared:?}");
    assert_eq!(shared[10], "flame-test-b");
}

#[tokio::test]
async fn pools_says_so_when_no_pool_answers() {
    let env = TestEnv::start().await;
    let out = flame(&env, &["pools", "--wait", "200ms"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        "POOL  KIND  PARENTS  RUNNERS  READY  LOAD  WAITING  MIN  MAX  SCALER  BUILD"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no pool answered"), "{stderr}");
}

#[tokio::test]
async fn runners_lists_each_runner_with_its_load() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("cli-run")
        .max(1)
        .max_concurrency(4)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let busy = start_marked_call(&pool, &dir, "m", 60_000, CallOptions::new()).await;
    wait_in_flight(&env, "cli-run", 1, LONG).await;
    let id = pool.runners()[0].id.clone();
    let out = flame(&env, &["runners", "cli-run", "--wait", "1s"]).await;
    assert!(out.status.success(), "{out:?}");
    let cells = row(&out.stdout, &id);
    assert_eq!(cells[1..4], ["ready", "flame-test-b", "1/4"], "{cells:?}");
    assert!(
        cells[4].ends_with('s') || cells[4].ends_with('m'),
        "{cells:?}"
    );
    assert_eq!(cells[6], "0", "errors: {cells:?}");
    busy.call.abort();

    // A shared pool: its runner's state comes from its lease.
    let shared = shared_pool(&env.flame, "cli-run-shared")
        .min(1)
        .max(2)
        .start()
        .await
        .unwrap();
    let id = shared.runners()[0].id.clone();
    let out = flame(&env, &["runners", "cli-run-shared", "--wait", "1s"]).await;
    assert!(out.status.success(), "{out:?}");
    let cells = row(&out.stdout, &id);
    assert_eq!(cells[1..4], ["ready", "flame-test-b", "0/100"], "{cells:?}");

    let out = flame(&env, &["runners", "nosuch"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        "RUNNER  STATE  BUILD  LOAD  UPTIME  REQUESTS  ERRORS"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no runner of pool `nosuch`"), "{stderr}");
}

/// A running `flame watch`, its lines read as they come.
struct Watch {
    _child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Watch {
    /// Starts `flame watch args..` and waits until it is subscribed.
    async fn start(env: &TestEnv, args: &[&str]) -> Watch {
        let url = env.server.url();
        let mut all = vec!["--server", url.as_str(), "watch"];
        all.extend_from_slice(args);
        let mut child = command(&all).spawn().expect("spawn flame watch");
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let first = tokio::time::timeout(LONG, stderr.next_line())
            .await
            .expect("flame watch said nothing")
            .unwrap()
            .expect("flame watch exited");
        assert!(first.starts_with("watching flame."), "{first}");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watch {
            _child: child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most a minute) for a line with all of `words`.
    async fn line_with(&mut self, words: &[&str]) -> String {
        let has = |l: &str| words.iter().all(|w| l.contains(w));
        if let Some(l) = self.seen.iter().find(|l| has(l)) {
            return l.clone();
        }
        let deadline = tokio::time::Instant::now() + LONG;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no line with {words:?}; seen: {:#?}", self.seen))
                .expect("flame watch exited");
            println!("watch: {line}");
            self.seen.push(line.clone());
            if has(&line) {
                return line;
            }
        }
    }
}

#[tokio::test]
async fn watch_prints_a_runner_from_boot_to_idle_exit() {
    let env = TestEnv::start().await;
    let mut watch = Watch::start(&env, &["cli-watch"]).await;
    let mut raw = Watch::start(&env, &["*", "--json"]).await;
    let pool = env
        .pool("cli-watch")
        .max(1)
        .idle_shutdown_after(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    flame::call!(pool, whereabouts()).await.unwrap();
    let booting = watch.line_with(&["cli-watch runner_booting"]).await;
    let id = booting.split_whitespace().nth(3).unwrap().to_string();
    assert!(id.ends_with('…') && id.chars().count() == 9, "{booting}");
    watch
        .line_with(&["cli-watch runner_ready", &id, "runners=1 ready=1"])
        .await;
    watch
        .line_with(&["cli-watch runner_busy", &id, "load=1"])
        .await;
    let gone = watch
        .line_with(&["cli-watch runner_gone", &id, "reason=idle"])
        .await;
    assert!(
        gone.ends_with("detail=\"runner process exited with code 0\""),
        "{gone}"
    );
    // Every line starts with the time of the event: 08:00:00.123.
    let time = gone.split_whitespace().next().unwrap();
    assert!(
        time.len() == 12 && &time[2..3] == ":" && &time[8..9] == ".",
        "{gone}"
    );

    let json = raw
        .line_with(&["\"type\":\"io.flame.pool.v1.runner_ready\"", "cli-watch"])
        .await;
    let event: flame::ops::PoolEventMessage = serde_json::from_str(&json).unwrap();
    assert_eq!(event.pool, "cli-watch");
    assert_eq!(event.parent, env.flame.parent_id());
    assert!(event.runner.unwrap().starts_with(id.trim_end_matches('…')));
}

#[tokio::test]
async fn top_without_a_terminal_says_so_and_exits_2() {
    let env = TestEnv::start().await;
    let out = flame(&env, &["top"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`flame top` needs a terminal"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing drawn");
}

#[tokio::test]
async fn unreachable_nats_is_named_without_credentials() {
    let port = free_port();
    let url = format!("nats://operator:s3cret@127.0.0.1:{port}");
    for args in [vec!["pools"], vec!["watch", "*"], vec!["runners", "x"]] {
        let mut all = vec!["--server", url.as_str()];
        all.extend(args.iter().copied());
        let child = command(&all).spawn().expect("spawn flame");
        let out = tokio::time::timeout(LONG, child.wait_with_output())
            .await
            .expect("flame exits")
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with(&format!(
                "flame: cannot reach NATS at nats://127.0.0.1:{port}"
            )),
            "{stderr}"
        );
        assert!(
            !stderr.contains("s3cret") && !stderr.contains("operator"),
            "{stderr}"
        );
    }
    // NATS_URL is read when --server is not given.
    let child = command(&["pools"])
        .env("NATS_URL", format!("nats://127.0.0.1:{port}"))
        .spawn()
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
}
