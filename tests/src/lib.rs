//! Shared pieces of flame's integration tests.
//!
//! Tests run as the parent; runners are the `flame-testapp` binary, which
//! links this library and so registers the same remote functions under the
//! same names. Both sides use the build id [`TEST_BUILD`] (the two
//! executables differ, so hashes would not match).

pub mod docker;
pub mod fake_fly;
pub mod fake_k8s;
pub mod funcs;
pub mod harness;
pub mod jwt;
pub mod nats_config;
pub mod nats_proxy;
pub mod platform;
pub mod real_k8s;
pub mod spans;

/// A private PostgreSQL per test (shared with the examples).
pub use flame_examples::postgres;

/// Build id shared by the test parent and the test runners.
pub const TEST_BUILD: &str = "flame-test-build";
