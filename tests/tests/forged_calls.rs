//! Calls are signed: a client of the NATS account that may publish to a
//! runner's subject, but holds no key, cannot make the runner run anything
//! (PROTOCOL.md 4.1.2 and 9). Only the wire is used here, so these tests
//! also run against a flame that does not sign.

use std::time::Duration;

use bytes::Bytes;
use flame_tests::funcs::*;
use flame_tests::harness::{file_exists, path_in, round_trip, runner_stats, wait_for, TestEnv};
use flame_tests::TEST_BUILD;
use futures::StreamExt;

const LONG: Duration = Duration::from_secs(30);

/// A call of `write_file(path, "forged")` built from PROTOCOL.md 4.1, as
/// anyone could: envelope, then the MessagePack argument tuple.
fn forged_call(path: &str) -> Vec<u8> {
    let function = "flame_tests::funcs::write_file";
    let mut body = vec![0xF1, 0x00, 0xb0, 0xea, 0x01]; // 30000 ms
    body.push(TEST_BUILD.len() as u8);
    body.extend_from_slice(TEST_BUILD.as_bytes());
    body.extend_from_slice(&(function.len() as u16).to_be_bytes());
    body.extend_from_slice(function.as_bytes());
    let args = rmp_serde::to_vec(&(path, "forged")).unwrap();
    body.extend_from_slice(&args);
    body
}

/// The runner's id, as anyone reads it: from `$SRV.INFO`.
async fn runner_id(client: &async_nats::Client, pool: &str) -> String {
    let info = client
        .request(format!("$SRV.INFO.flame-{pool}"), Bytes::new())
        .await
        .expect("a runner answers $SRV.INFO");
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    info["metadata"]["runner"].as_str().unwrap().to_string()
}

fn error_kind(msg: &async_nats::Message) -> Option<String> {
    msg.headers
        .as_ref()?
        .get("Flame-Error")
        .map(|v| v.as_str().to_string())
}

#[tokio::test]
async fn a_forged_call_is_refused_and_the_runner_serves_on() {
    let env = TestEnv::start().await;
    let pool = env.pool("forged").min(1).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = env.client().await;
    let runner = runner_id(&client, "forged").await;
    let subject = format!("flame.forged.runner.{runner}");

    // Unsigned, as PROTOCOL.md 4.1 shows it.
    let unsigned = path_in(&dir, "unsigned");
    let started = std::time::Instant::now();
    let reply = tokio::time::timeout(
        LONG,
        client.request(subject.clone(), forged_call(&unsigned).into()),
    )
    .await
    .expect("an answer")
    .expect("a reply");
    eprintln!("unsigned call answered in {:?}", started.elapsed());
    assert_eq!(
        error_kind(&reply).as_deref(),
        Some("unauthenticated"),
        "the unsigned call was not refused as unauthenticated"
    );
    let status = reply.headers.as_ref().unwrap();
    assert_eq!(
        status.get("Nats-Service-Error-Code").unwrap().as_str(),
        "401"
    );

    // Signed with a key of its own making.
    let wrong = path_in(&dir, "wrong");
    let mut body = vec![0xF4];
    body.extend_from_slice(&[7u8; 32]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    body.extend_from_slice(&now.to_be_bytes());
    body.extend_from_slice(&forged_call(&wrong));
    let reply = client.request(subject.clone(), body.into()).await.unwrap();
    assert_eq!(error_kind(&reply).as_deref(), Some("unauthenticated"));

    // A forged cancellation changes nothing either (its body is only the
    // reply subject of some call).
    client
        .publish(format!("{subject}.cancel"), "_INBOX.x.1".into())
        .await
        .unwrap();
    client.flush().await.unwrap();

    // Nothing ran; the runner serves on, and counts what it refused.
    let real = path_in(&dir, "real");
    flame::call!(pool, write_file(real.clone(), "real".to_string()))
        .await
        .unwrap();
    assert!(file_exists(&real).await.is_some());
    for path in [&unsigned, &wrong] {
        assert!(
            !std::path::Path::new(path).exists(),
            "a forged call ran: {path} exists"
        );
    }
    let refused = wait_for("the refusals counted", LONG, || async {
        let stats = runner_stats(&env, "forged").await?;
        let n = stats["unauthenticated"].as_u64()?;
        (n >= 3).then_some(n)
    })
    .await;
    assert_eq!(refused, 3);
    pool.shutdown().await;
}

#[tokio::test]
async fn a_replayed_signed_call_is_refused() {
    let env = TestEnv::start().await;
    let pool = env.pool("replayed").min(1).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Another client of the account records a real call on the wire...
    let sniffer = env.client().await;
    let mut calls = sniffer.subscribe("flame.replayed.runner.*").await.unwrap();
    round_trip(&sniffer).await;
    let path = path_in(&dir, "once");
    flame::call!(pool, write_file(path.clone(), "once".to_string()))
        .await
        .unwrap();
    let recorded = tokio::time::timeout(LONG, calls.next())
        .await
        .expect("the call was seen")
        .unwrap();
    std::fs::remove_file(&path).unwrap();

    // ... and sends it again, as it was, listening for the answer.
    let reply_to = recorded.reply.clone().expect("a call has a reply subject");
    let mut answers = sniffer.subscribe(reply_to.clone()).await.unwrap();
    round_trip(&sniffer).await;
    sniffer
        .publish_with_reply(recorded.subject.clone(), reply_to, recorded.payload.clone())
        .await
        .unwrap();
    let answer = tokio::time::timeout(LONG, answers.next())
        .await
        .expect("an answer to the replay")
        .unwrap();
    assert_eq!(
        error_kind(&answer).as_deref(),
        Some("unauthenticated"),
        "the replayed call was not refused"
    );
    assert!(
        !std::path::Path::new(&path).exists(),
        "the replayed call ran again"
    );
    // The pool's own calls still run.
    assert_eq!(flame::call!(pool, add(2, 3)).await.unwrap(), 5);
    pool.shutdown().await;
}
