//! NATS decentralized auth (operator mode) for tests: an operator, a system
//! account and an app account with JetStream, users as `.creds` files, and
//! the nats-server configuration that trusts them.
//!
//! The claims are the few documents `nsc` writes (JSON, signed with the
//! issuer's NKey as `ed25519-nkey` JWTs); written here so that a test can
//! also mint a user that has already expired.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use data_encoding::BASE64URL_NOPAD;
use nkeys::KeyPair;
use serde_json::{json, Value};

/// An operator with a system account and one app account.
pub struct Operator {
    operator: KeyPair,
    system: KeyPair,
    account: KeyPair,
}

impl Default for Operator {
    fn default() -> Self {
        Operator::new()
    }
}

impl Operator {
    /// Fresh keys for the operator and both accounts.
    pub fn new() -> Operator {
        Operator {
            operator: KeyPair::new_operator(),
            system: KeyPair::new_account(),
            account: KeyPair::new_account(),
        }
    }

    /// Writes the server's configuration into `dir` and returns its path
    /// (start nats-server with `-c <path>`): the operator, its system
    /// account, and both accounts preloaded in a memory resolver.
    pub fn server_config(&self, dir: &Path) -> PathBuf {
        let op = self.operator.public_key();
        let operator_jwt = sign(
            &self.operator,
            &op,
            "flame-test-operator",
            json!({"type": "operator", "version": 2, "system_account": self.system.public_key()}),
            None,
        );
        let system_jwt = sign(
            &self.operator,
            &self.system.public_key(),
            "SYS",
            account_claims(false),
            None,
        );
        let account_jwt = sign(
            &self.operator,
            &self.account.public_key(),
            "flame-app",
            account_claims(true),
            None,
        );
        let config = format!(
            "operator: {operator_jwt}\n\
             system_account: {sys}\n\
             resolver: MEMORY\n\
             resolver_preload: {{\n  {sys}: {system_jwt}\n  {acc}: {account_jwt}\n}}\n",
            sys = self.system.public_key(),
            acc = self.account.public_key(),
        );
        let path = dir.join("operator.conf");
        std::fs::write(&path, config).unwrap();
        path
    }

    /// A user of the app account with every permission, as the text of a
    /// `.creds` file; `expires`: the JWT's `exp`, if any.
    pub fn user_creds(&self, name: &str, expires: Option<SystemTime>) -> String {
        let user = KeyPair::new_user();
        let claims = json!({
            "type": "user", "version": 2,
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        });
        let jwt = sign(&self.account, &user.public_key(), name, claims, expires);
        let seed = user.seed().unwrap();
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        )
    }
}

/// The claims of an account without limits; `jetstream`: with unlimited
/// JetStream storage (an account gets JetStream only when its limits say
/// so).
fn account_claims(jetstream: bool) -> Value {
    let storage = if jetstream { -1 } else { 0 };
    json!({
        "type": "account", "version": 2,
        "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": storage, "disk_storage": storage,
            "streams": -1, "consumer": -1, "max_ack_pending": -1,
        },
        "default_permissions": {"pub": {}, "sub": {}},
    })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A JWT of `claims` about `subject`, issued and signed by `issuer`.
fn sign(
    issuer: &KeyPair,
    subject: &str,
    name: &str,
    claims: Value,
    expires: Option<SystemTime>,
) -> String {
    let mut body = json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": unix(SystemTime::now()),
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": claims,
    });
    if let Some(at) = expires {
        body["exp"] = json!(unix(at));
    }
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = BASE64URL_NOPAD.encode(body.to_string().as_bytes());
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature))
}
