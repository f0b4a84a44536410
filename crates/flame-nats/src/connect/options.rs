//! The connection options of the conventional environment (`NATS_CREDS`,
//! `NATS_USER`, `NATS_CA`, ...: the names the `nats` tools use), and the
//! app's hook that adjusts them ([`ConnectHook`]).

use std::sync::Arc;

use flame_core::Error;

use crate::connect::credentials::UrlCredentials;

/// Adjusts the NATS connection of parent and runners alike: credentials,
/// TLS, reconnect settings. See [`crate::FlameBuilder::nats_options`].
pub type ConnectHook =
    Arc<dyn Fn(async_nats::ConnectOptions) -> async_nats::ConnectOptions + Send + Sync>;

/// The connection options the conventional environment asks for (the
/// names the `nats` tools use), read in parent and runner alike:
///
/// | variable | meaning |
/// |---|---|
/// | `NATS_CREDS` | path of a credentials file (JWT and NKey seed) |
/// | `NATS_NKEY` | path of a file holding an NKey seed (or the seed itself) |
/// | `NATS_USER`, `NATS_PASSWORD` | user and password |
/// | `NATS_TOKEN` | token |
/// | `NATS_CA` | path of a root CA (PEM) to trust; turns TLS on |
/// | `NATS_CERT`, `NATS_KEY` | paths of a client certificate and its key (PEM); turn TLS on |
/// | `NATS_TLS_FIRST` | `true`: TLS handshake before the NATS greeting |
///
/// Values are never logged or put in error messages; paths are.
///
/// Public (as [`crate::tool::connect_options_from_env`]) so that tools such
/// as the `flame` command connect the way parents and runners do.
pub async fn options_from_env() -> Result<async_nats::ConnectOptions, Error> {
    options_from_env_and(None).await
}

/// [`options_from_env`], with the credentials of a NATS URL, if any, in
/// place of `NATS_USER`/`NATS_PASSWORD` and `NATS_TOKEN`.
pub(crate) async fn options_from_env_and(
    url_credentials: Option<&UrlCredentials>,
) -> Result<async_nats::ConnectOptions, Error> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut options = async_nats::ConnectOptions::new();
    if let Some(path) = var("NATS_CREDS") {
        if !looks_like_a_path(&path) {
            // The file's contents, say: a secret, not echoed back.
            return Err(Error::Config(
                "NATS_CREDS must be the path of a .creds file, not its contents".into(),
            ));
        }
        options = options.credentials_file(&path).await.map_err(|e| {
            Error::Config(format!(
                "NATS_CREDS names {path}, which cannot be used: {e}"
            ))
        })?;
    }
    if let Some(nkey) = var("NATS_NKEY") {
        // A seed itself starts with "S"; anything else is a file holding one.
        let seed = if nkey.starts_with('S') && !std::path::Path::new(&nkey).exists() {
            nkey
        } else {
            // Not echoed back: a mistyped seed is still a secret.
            std::fs::read_to_string(&nkey)
                .map_err(|e| {
                    Error::Config(format!(
                        "NATS_NKEY is neither an NKey seed nor a readable file ({e})"
                    ))
                })?
                .trim()
                .to_string()
        };
        options = options.nkey(seed);
    }
    if let Some(credentials) = url_credentials {
        // As the `nats` tools do: the URL's credentials win.
        options = credentials.apply(options);
    } else {
        match (var("NATS_USER"), var("NATS_PASSWORD")) {
            (Some(user), Some(password)) => options = options.user_and_password(user, password),
            (Some(_), None) => {
                return Err(Error::Config(
                    "NATS_USER is set but NATS_PASSWORD is not".into(),
                ))
            }
            _ => {}
        }
        if let Some(token) = var("NATS_TOKEN") {
            options = options.token(token);
        }
    }
    if let Some(ca) = var("NATS_CA") {
        options = options
            .add_root_certificates(readable("NATS_CA", &ca)?)
            .require_tls(true);
    }
    match (var("NATS_CERT"), var("NATS_KEY")) {
        (Some(cert), Some(key)) => {
            options = options
                .add_client_certificate(readable("NATS_CERT", &cert)?, readable("NATS_KEY", &key)?)
                .require_tls(true);
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::Config(
                "NATS_CERT and NATS_KEY go together: set both or neither".into(),
            ))
        }
        _ => {}
    }
    if var("NATS_TLS_FIRST").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        options = options.tls_first();
    }
    Ok(options)
}

fn readable(var: &str, path: &str) -> Result<std::path::PathBuf, Error> {
    let path = std::path::PathBuf::from(path);
    std::fs::metadata(&path).map_err(|e| {
        Error::Config(format!(
            "{var} names {}, which cannot be read: {e}",
            path.display()
        ))
    })?;
    Ok(path)
}

/// Whether a variable's value can be a file's path rather than what the
/// file holds (a JWT, a seed, several lines).
fn looks_like_a_path(value: &str) -> bool {
    value.len() <= 4096 && !value.contains('\n') && !value.contains("-----BEGIN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_creds_files_contents_are_not_taken_for_its_path() {
        assert!(looks_like_a_path("/run/secrets/app.creds"));
        assert!(!looks_like_a_path(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.c2ln\n------END NATS USER JWT------"
        ));
        assert!(!looks_like_a_path("-----BEGIN NATS USER JWT----- eyJ0eXAi"));
    }
}
