//! App state in remote code: a real PostgreSQL pool built in `main` and
//! handed to flame, used on the runner through `State<Db>`.

use std::time::Duration;

use flame::Error;
use flame_tests::funcs::{greet, inline, insert_thumbnails, PG_URL_ENV};
use flame_tests::harness::{run_testapp, runner_backend, TestEnv};
use flame_tests::postgres::PgServer;

async fn thumbnails_table(pg: &PgServer) -> tokio_postgres::Client {
    let client = pg.client().await;
    client
        .batch_execute(
            "CREATE TABLE thumbnails (id serial PRIMARY KEY, name text NOT NULL, made_by text NOT NULL)",
        )
        .await
        .expect("create table");
    client
}

#[tokio::test]
async fn remote_code_writes_through_the_apps_own_database_pool() {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let parent_db = thumbnails_table(&pg).await;
    let env = TestEnv::start().await;
    let pool = env
        .flame
        .pool("dbwork")
        .backend(runner_backend().env(PG_URL_ENV, pg.url()))
        .max(1)
        .timeout(Duration::from_secs(30))
        .start()
        .await
        .unwrap();

    // A named function: the caller leaves the State parameter out.
    let names: Vec<String> = (0..3).map(|i| format!("thumb-{i}.jpg")).collect();
    let inserted = flame::call!(pool, insert_thumbnails(names.clone()))
        .await
        .unwrap()
        .expect("the insert succeeds on the runner");
    assert_eq!(inserted, 3);

    // An inline block with a state clause.
    let inserted = inline::insert_inline(&pool, "inline.jpg".to_string())
        .await
        .unwrap()
        .expect("the inline insert succeeds on the runner");
    assert_eq!(inserted, 1);

    // The parent reads back what the runner wrote.
    let rows = parent_db
        .query("SELECT name, made_by FROM thumbnails ORDER BY id", &[])
        .await
        .unwrap();
    let found: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let runner = pool.runners()[0].id.clone();
    assert_eq!(
        found,
        vec![
            ("thumb-0.jpg".to_string(), runner.clone()),
            ("thumb-1.jpg".to_string(), runner.clone()),
            ("thumb-2.jpg".to_string(), runner),
            ("inline.jpg".to_string(), "inline".to_string()),
        ]
    );
}

#[tokio::test]
async fn state_parameters_mix_with_shipped_arguments_in_plain_functions() {
    let env = TestEnv::start().await;
    let pool = env.pool("greetings").max(1).start().await.unwrap();
    let text = flame::call!(pool, greet("> ".to_string(), "ada".to_string()))
        .await
        .unwrap();
    assert_eq!(text, "> hello, ada");
    let n = inline::greeting_plus(&pool, 2).await.unwrap();
    assert_eq!(n, 7);
}

/// A process that registers functions taking state but gives flame none
/// fails at start-up, naming the function and the type, in the parent and
/// in a runner alike.
#[tokio::test]
async fn missing_state_is_refused_at_start_up() {
    let err = flame::FlameBuilder::new()
        .nats_url("nats://127.0.0.1:1")
        .init()
        .await
        .unwrap_err();
    match &err {
        Error::MissingState { function, state } => {
            assert!(function.starts_with("flame_tests::"), "{function}");
            assert!(
                state.contains("Db") || state.contains("Greeting"),
                "{state}"
            );
        }
        other => panic!("expected MissingState, got {other:?}"),
    }
    assert!(err.to_string().contains("FlameBuilder::state"), "{err}");

    let out = run_testapp(&["no-state"], Duration::from_secs(30)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("takes State<"), "{stdout}");
}
