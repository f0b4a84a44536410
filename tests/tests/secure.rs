//! Secured NATS: credentials and TLS from the conventional environment (in
//! runners) and from `FlameBuilder::nats_options` (in the parent), against
//! real nats-server configurations. Secrets stay out of errors and Debug.

use std::path::Path;
use std::time::Duration;

use flame::embedded::NatsServer;
use flame::{Error, Flame, LocalBackend, Pool, PoolBuilder};
use flame_tests::funcs::add;
use flame_tests::harness::{builder, init_tracing, runner_backend};

const LONG: Duration = Duration::from_secs(30);

/// Connects a parent to `server` with `options`, which the server must
/// accept.
async fn connected(
    server: &NatsServer,
    options: impl Fn(async_nats::ConnectOptions) -> async_nats::ConnectOptions + Send + Sync + 'static,
) -> Flame {
    builder()
        .nats_url(server.url())
        .nats_options(options)
        .init()
        .await
        .expect("the server accepts the parent")
}

/// Starts `pool` with runners of `backend`, at most one, and calls that
/// time out after [`LONG`].
async fn one_runner(pool: PoolBuilder, backend: LocalBackend) -> Pool {
    pool.backend(backend)
        .max(1)
        .timeout(LONG)
        .start()
        .await
        .unwrap()
}

/// Connects a parent to `server` with `options`, which the server must
/// refuse: returns the error, a `NatsUnreachable`.
async fn refused(
    server: &NatsServer,
    options: impl Fn(async_nats::ConnectOptions) -> async_nats::ConnectOptions + Send + Sync + 'static,
) -> Error {
    let err = builder()
        .nats_url(server.url())
        .nats_options(options)
        .connect_timeout(Duration::from_secs(3))
        .init()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NatsUnreachable { .. }), "{err:?}");
    err
}

#[tokio::test]
async fn user_and_password_from_the_hook_and_the_environment() {
    init_tracing();
    let server = NatsServer::builder()
        .arg("--user")
        .arg("flame")
        .arg("--pass")
        .arg("s3cret-pw")
        .start()
        .unwrap();
    let flame = connected(&server, |o| {
        o.user_and_password("flame".into(), "s3cret-pw".into())
    })
    .await;
    // Runners read NATS_USER and NATS_PASSWORD.
    let backend = runner_backend()
        .env("NATS_USER", "flame")
        .env("NATS_PASSWORD", "s3cret-pw");
    let pool = one_runner(flame.pool("authed"), backend).await;
    assert_eq!(flame::call!(pool, add(2, 3)).await.unwrap(), 5);

    // A wrong password is refused, and the error does not show it.
    let err = refused(&server, |o| {
        o.user_and_password("flame".into(), "wrong-pw".into())
    })
    .await;
    assert!(!format!("{err} {err:?}").contains("wrong-pw"), "{err:?}");

    // Credentials in a URL reach neither Debug output nor errors.
    let port = server.port();
    let with_secret = format!("nats://flame:s3cret-pw@127.0.0.1:{port}");
    let shown = format!("{:?}", builder().nats_url(with_secret));
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    pool.shutdown().await;
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as
/// PEM files in `dir`.
fn certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["flame-client".to_string()])
        .unwrap()
        .signed_by(&client_key, &ca, &ca_key)
        .unwrap();
    for (name, pem) in [
        ("ca.pem", ca.pem()),
        ("server.pem", server.pem()),
        ("server.key", server_key.serialize_pem()),
        ("client.pem", client.pem()),
        ("client.key", client_key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
}

#[tokio::test]
async fn calls_run_over_tls_with_client_certificates() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let server = NatsServer::builder()
        .arg("--tls")
        .arg("--tlscert")
        .arg(path("server.pem"))
        .arg("--tlskey")
        .arg(path("server.key"))
        .arg("--tlsverify")
        .arg("--tlscacert")
        .arg(path("ca.pem"))
        .start()
        .unwrap();
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let flame = connected(&server, {
        let (ca, cert, key) = (ca.clone(), cert.clone(), key.clone());
        move |o| {
            o.add_root_certificates(ca.clone().into())
                .add_client_certificate(cert.clone().into(), key.clone().into())
                .require_tls(true)
        }
    })
    .await;
    // Runners read NATS_CA, NATS_CERT and NATS_KEY.
    let backend = runner_backend()
        .env("NATS_CA", &ca)
        .env("NATS_CERT", &cert)
        .env("NATS_KEY", &key);
    let pool = one_runner(flame.pool("tls"), backend).await;
    assert_eq!(flame::call!(pool, add(20, 22)).await.unwrap(), 42);

    // Without a client certificate the server refuses the connection.
    refused(&server, move |o| {
        o.add_root_certificates(ca.clone().into()).require_tls(true)
    })
    .await;
    pool.shutdown().await;
}

/// Decentralized auth (operator mode, as `nsc` sets up): parent and runners
/// connect with `.creds` files; an expired user is refused with an error
/// that says so, in a parent and in a runner's boot.
#[tokio::test]
async fn users_of_an_operator_connect_with_creds_and_expired_ones_are_refused() {
    use std::time::SystemTime;
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let operator = flame_tests::jwt::Operator::new();
    let config = operator.server_config(dir.path());
    let server = NatsServer::builder()
        .arg("-c")
        .arg(config.to_str().unwrap())
        .start()
        .unwrap();
    let write = |name: &str, creds: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, creds).unwrap();
        path
    };
    let parent_creds = operator.user_creds("parent", None);
    let runner_creds = write("runner.creds", operator.user_creds("runner", None));
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let expired_text = operator.user_creds("expired", Some(an_hour_ago));
    let expired = write("expired.creds", expired_text.clone());
    let seed = expired_text
        .lines()
        .find(|l| l.starts_with("SU"))
        .unwrap()
        .to_string();

    let flame = connected(&server, move |o| {
        o.credentials(&parent_creds).expect("valid creds")
    })
    .await;
    // A shared pool: JetStream in the operator's account works too.
    let backend = runner_backend().env("NATS_CREDS", runner_creds.to_str().unwrap());
    let pool = one_runner(flame.pool("jwt").shared(true), backend).await;
    assert_eq!(flame::call!(pool, add(2, 3)).await.unwrap(), 5);
    pool.shutdown().await;

    // Runners whose user has expired fail their boot, and say why.
    let err = flame
        .pool("jwt-expired")
        .backend(runner_backend().env("NATS_CREDS", expired.to_str().unwrap()))
        .min(1)
        .max(1)
        .boot_timeout(LONG)
        .start()
        .await
        .unwrap_err();
    let Error::BootFailed { reason, .. } = &err else {
        panic!("expected BootFailed, got {err:?}");
    };
    assert!(reason.contains("expired"), "{reason}");
    assert!(reason.contains("expired.creds"), "{reason}");
    assert!(!format!("{err} {err:?}").contains(&seed), "{err:?}");

    // A parent with an expired user: the server refuses it.
    let err = refused(&server, move |o| {
        o.credentials(&expired_text).expect("valid creds")
    })
    .await;
    assert!(err.to_string().contains("authorization violation"), "{err}");
    assert!(!format!("{err} {err:?}").contains(&seed), "{err:?}");
}

/// A token (`NATS_TOKEN`) and an NKey seed (`NATS_NKEY`, the seed itself or
/// a file holding it) reach runners from the environment.
#[tokio::test]
async fn runners_connect_with_a_token_or_an_nkey_from_the_environment() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::builder()
        .arg("--auth")
        .arg("s3cret-token")
        .start()
        .unwrap();
    let flame = connected(&server, |o| o.token("s3cret-token".into())).await;
    let backend = runner_backend().env("NATS_TOKEN", "s3cret-token");
    let pool = one_runner(flame.pool("token"), backend).await;
    assert_eq!(flame::call!(pool, add(1, 2)).await.unwrap(), 3);
    pool.shutdown().await;
    let err = refused(&server, |o| o.token("wrong-token".into())).await;
    assert!(!format!("{err} {err:?}").contains("wrong-token"), "{err:?}");

    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let config = dir.path().join("nkey.conf");
    std::fs::write(
        &config,
        format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let server = NatsServer::builder()
        .arg("-c")
        .arg(config.to_str().unwrap())
        .start()
        .unwrap();
    let parent_seed = seed.clone();
    let flame = connected(&server, move |o| o.nkey(parent_seed.clone())).await;
    let seed_file = dir.path().join("user.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).unwrap();
    for (name, value) in [
        ("nkey-seed", seed.clone()),
        ("nkey-file", seed_file.display().to_string()),
    ] {
        let backend = runner_backend().env("NATS_NKEY", value);
        let pool = one_runner(flame.pool(name), backend).await;
        assert_eq!(flame::call!(pool, add(2, 2)).await.unwrap(), 4, "{name}");
        pool.shutdown().await;
    }
    // Another user's seed is refused, and the error does not show it.
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let shown = stranger.clone();
    let err = refused(&server, move |o| o.nkey(stranger.clone())).await;
    assert!(!format!("{err} {err:?}").contains(&shown), "{err:?}");
}
