//! A build that registers one name twice is refused at startup, naming both
//! places. (Its own test binary: the duplicate would break every other test.)

use flame::__private::{inventory, Registration};

fn handler(_: bytes::Bytes, _: &flame::__private::States) -> flame::__private::Invocation {
    flame::__private::Invocation::Blocking(Box::new(|| Ok(Vec::new())))
}

inventory::submit! { Registration::new("app::resize", handler, "src/a.rs", 10) }
inventory::submit! { Registration::new("app::resize", handler, "src/b.rs", 20) }

#[tokio::test]
async fn duplicate_names_are_refused_at_startup() {
    let err = flame::FlameBuilder::new()
        .nats_url("nats://127.0.0.1:1")
        .init()
        .await
        .unwrap_err();
    match &err {
        flame::Error::DuplicateFunction {
            name,
            first,
            second,
        } => {
            assert_eq!(name, "app::resize");
            assert_eq!(first, "src/a.rs:10");
            assert_eq!(second, "src/b.rs:20");
        }
        other => panic!("expected DuplicateFunction, got {other:?}"),
    }
}
