//! The environment variables flame reads, in one place (and one path:
//! `flame::env::NAME`). Backends document their own (`FLY_API_TOKEN`, ...).

/// The NATS server URL (the `nats` CLI's convention): one URL, or several
/// separated by commas, which may carry a user and password or a token
/// (`nats://user:password@host:4222`). Unset: a private nats-server.
pub const NATS_URL: &str = "NATS_URL";

/// The NATS URL runners connect to, when it differs from the parent's.
pub const RUNNER_NATS_URL: &str = "FLAME_RUNNER_NATS_URL";

/// Through it a parent hands its runners the credentials written in its
/// NATS URL (`user:password` or `token`, as in the URL), so that
/// [`PARENT`] never carries them. Read by runners only; a secret.
pub const NATS_URL_CREDENTIALS: &str = "FLAME_NATS_URL_CREDENTIALS";

/// Makes a process a runner. Its value is the JSON form of
/// [`ParentInfo`](crate::ParentInfo); it holds no secret.
pub const PARENT: &str = "FLAME_PARENT";

/// A shared pool's secret, with which calls are signed: every parent of
/// the pool must have the same. Never logged.
pub const SECRET: &str = "FLAME_SECRET";

/// Overrides the computed build id, e.g. with a commit hash from your
/// deploy pipeline.
pub const BUILD_ID: &str = "FLAME_BUILD_ID";

/// The nats-server binary to run for a private server (default: the one on
/// `PATH`).
pub const NATS_SERVER: &str = "FLAME_NATS_SERVER";

/// Set by the local backend in each runner process it starts, to the
/// runner's id.
pub const RUNNER_ID: &str = flame_core::backend::RUNNER_ID_ENV;

/// NATS credentials, as the `nats` CLI reads them: a `.creds` file
/// (user JWT and NKey seed).
pub const NATS_CREDS: &str = "NATS_CREDS";
/// The path of a file holding an NKey seed (or the seed itself: a
/// secret).
pub const NATS_NKEY: &str = "NATS_NKEY";
/// A user name (with [`NATS_PASSWORD`]).
pub const NATS_USER: &str = "NATS_USER";
/// A password (with [`NATS_USER`]). A secret.
pub const NATS_PASSWORD: &str = "NATS_PASSWORD";
/// A token. A secret.
pub const NATS_TOKEN: &str = "NATS_TOKEN";
/// The path of a root CA (PEM) to trust; turns TLS on.
pub const NATS_CA: &str = "NATS_CA";
/// The path of a client certificate (PEM, with [`NATS_KEY`]); turns TLS
/// on.
pub const NATS_CERT: &str = "NATS_CERT";
/// The path of the client certificate's key (PEM).
pub const NATS_KEY: &str = "NATS_KEY";
/// `true`: the TLS handshake before the NATS greeting (a TLS-first
/// server).
pub const NATS_TLS_FIRST: &str = "NATS_TLS_FIRST";
