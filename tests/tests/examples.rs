//! The examples run end to end, as a user would run them.

use std::time::Duration;

use flame_tests::harness::{example, example_program};

/// Runs an example on the embedded defaults (no NATS URL, no database
/// URL unless the command sets one), killed if the test ends first; asserts it exits 0 within
/// 3 minutes and returns its standard output.
async fn run_to_success(command: &mut tokio::process::Command) -> String {
    // (A database URL the test gives is kept.)
    let given_database = command
        .as_std()
        .get_envs()
        .any(|(key, value)| key == "DATABASE_URL" && value.is_some());
    if !given_database {
        command.env_remove("DATABASE_URL");
    }
    let child = command
        .env_remove("NATS_URL")
        .env_remove(flame::env::PARENT)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the example");
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("the example finished in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout
}

/// The seed's flow: a video streamed to a runner, thumbnails back as they
/// are made, a row per thumbnail in PostgreSQL (a private server the
/// example starts), on a private nats-server.
#[tokio::test]
async fn video_thumbnails_streams_a_video_and_stores_a_row_per_thumbnail() {
    let mut command = tokio::process::Command::new(example("video_thumbnails"));
    let stdout = run_to_success(&mut command).await;
    // A 20 s test video, a thumbnail every 2 s.
    let thumbs = stdout
        .lines()
        .filter(|l| l.contains("thumbnail at"))
        .count();
    assert_eq!(thumbs, 10, "{stdout}");
    assert!(stdout.contains("10 thumbnails in"), "{stdout}");
    let rows = stdout
        .lines()
        .filter(|l| l.contains("testsrc.ts  at"))
        .count();
    assert_eq!(rows, 10, "one row per thumbnail: {stdout}");
}

/// The web demo's `--once`: two generated samples uploaded over HTTP at
/// once, thumbnails relayed to the page's event stream, a row per
/// thumbnail, and the pool back to zero runners, on a private nats-server
/// and PostgreSQL.
#[tokio::test]
async fn web_thumbnails_once_runs_two_uploads_end_to_end() {
    let mut command = tokio::process::Command::new(example("web_thumbnails"));
    command
        .arg("--once")
        .env_remove("LISTEN")
        .env("THUMBS_IDLE_SECS", "2");
    let stdout = run_to_success(&mut command).await;
    let thumbs = stdout
        .lines()
        .filter(|l| l.contains("thumbnail at"))
        .count();
    assert_eq!(thumbs, 20, "{stdout}");
    assert!(
        stdout.contains("ok: 2 uploads, 20 thumbnails, 20 rows"),
        "{stdout}"
    );
    assert!(stdout.contains("pool back to 0 runners"), "{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.contains(": 10 rows")).count(),
        2,
        "{stdout}"
    );
}

/// The seed's file flow: the local program and its flame version
/// (`examples/flows/`) print the same checksum of the same file, the
/// flame one computed on a runner.
#[tokio::test]
async fn the_file_flow_gives_the_local_programs_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.bin");
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let local =
        run_to_success(tokio::process::Command::new(example_program("file_local")).arg(&path))
            .await;
    let flame =
        run_to_success(tokio::process::Command::new(example_program("file_flame")).arg(&path))
            .await;
    assert!(local.contains(" 1000000\n"), "{local}");
    assert_eq!(local, flame);
}

/// The seed's first flow: the local program and its flame version cut the
/// same thumbnails of a test video and write a row for each; the flame
/// version's rows are made by a runner, through its own database pool.
#[tokio::test]
async fn the_thumbnail_flow_writes_the_same_rows_from_a_runner() {
    let pg = tokio::task::spawn_blocking(flame_examples::postgres::PgServer::start)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let video = flame_examples::video::make_test_video(dir.path(), 10)
        .await
        .unwrap();
    let mut outputs = Vec::new();
    for program in ["thumbs_local", "thumbs_flame"] {
        let mut command = tokio::process::Command::new(example_program(program));
        command.arg(&video).env("DATABASE_URL", pg.url());
        outputs.push(run_to_success(&mut command).await);
    }
    let expected = format!("5 thumbnails of {}\n", video.display());
    assert_eq!(outputs, [expected.clone(), expected]);
    let client = pg.client().await;
    let rows = client
        .query(
            "SELECT made_by, count(*) FROM thumbnails GROUP BY made_by",
            &[],
        )
        .await
        .unwrap();
    let counts: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
    // Two processes made five rows each: the local program, then a runner.
    assert_eq!(counts, [5, 5], "{rows:?}");
}

/// The seed's third flow: a worker talked to over channels while it runs,
/// as a local task and as a child placed on a runner.
#[tokio::test]
async fn the_child_flow_gives_the_local_programs_answers() {
    let local = run_to_success(&mut tokio::process::Command::new(example_program(
        "child_local",
    )))
    .await;
    let flame = run_to_success(&mut tokio::process::Command::new(example_program(
        "child_flame",
    )))
    .await;
    let so_far = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.starts_with("words so far"))
            .map(String::from)
            .collect()
    };
    assert_eq!(
        so_far(&local),
        [
            "words so far: Some(4)",
            "words so far: Some(6)",
            "words so far: Some(9)"
        ]
    );
    assert_eq!(so_far(&local), so_far(&flame));
    assert!(local.contains("total: 9"), "{local}");
    assert!(flame.contains("total: Finished(9)"), "{flame}");
}
