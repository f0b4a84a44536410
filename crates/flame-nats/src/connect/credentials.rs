//! Credentials written in a NATS URL ([`UrlCredentials`]): read from the
//! URL or handed over by a parent, used in place of the environment's,
//! and never shown.

use flame_core::Error;

use crate::connect::urls::{server_list, without_credentials};

/// Credentials written in a NATS URL, `nats://user:password@host` or
/// `nats://token@host` (the `nats` tools' convention), and where they came
/// from. `Debug` shows neither secret nor user.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct UrlCredentials {
    /// As written in the URL (still percent-encoded): what runners are
    /// handed.
    written: String,
    secret: UrlSecret,
    /// Handed over by a parent ([`crate::env::NATS_URL_CREDENTIALS`]) rather than read
    /// from this process's own URL.
    handed_over: bool,
}

#[derive(Clone, PartialEq, Eq)]
enum UrlSecret {
    UserPassword { user: String, password: String },
    Token(String),
}

impl std::fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.secret {
            UrlSecret::UserPassword { .. } => "user and password",
            UrlSecret::Token(_) => "token",
        };
        f.debug_struct("UrlCredentials")
            .field("kind", &kind)
            .field("handed_over", &self.handed_over)
            .finish_non_exhaustive()
    }
}

impl UrlCredentials {
    /// The credentials written in `url` (one server or a comma-separated
    /// list); `None` when no server carries any. Servers of a list that
    /// carry credentials must carry the same (one set is used for all,
    /// and servers without any get it too). Errors name no secret.
    pub(crate) fn from_url(url: &str) -> Result<Option<UrlCredentials>, Error> {
        let mut found: Option<UrlCredentials> = None;
        for server in server_list(url) {
            let Some(written) = userinfo(&server) else {
                continue;
            };
            let credentials = UrlCredentials::parse(written, false)?;
            match &found {
                Some(first) if first.secret != credentials.secret => {
                    return Err(Error::Config(format!(
                        "the servers of the NATS URL {} carry different credentials; flame connects to \
                         every server with one set: write the same `user:password@` (or `token@`) in \
                         each, or in one only",
                        without_credentials(url)
                    )))
                }
                Some(_) => {}
                None => found = Some(credentials),
            }
        }
        if found.is_some() {
            // Two ways of giving credentials, one of which the server would
            // ignore: refuse rather than guess.
            for var in ["NATS_CREDS", "NATS_NKEY"] {
                if std::env::var(var).is_ok_and(|v| !v.is_empty()) {
                    return Err(Error::Config(format!(
                        "the NATS URL {} carries credentials and {var} is set too: give the \
                         credentials one way",
                        without_credentials(url)
                    )));
                }
            }
        }
        Ok(found)
    }

    /// The credentials a parent handed this runner in
    /// [`crate::env::NATS_URL_CREDENTIALS`], if any.
    pub(crate) fn handed_over() -> Result<Option<UrlCredentials>, Error> {
        match std::env::var(crate::env::NATS_URL_CREDENTIALS) {
            Ok(written) if !written.is_empty() => UrlCredentials::parse(&written, true).map(Some),
            _ => Ok(None),
        }
    }

    /// Reads `user:password` or `token` (percent-encoded, as in a URL).
    fn parse(written: &str, handed_over: bool) -> Result<UrlCredentials, Error> {
        let decode = |part: &str, what: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| {
                    Error::Config(format!(
                        "the {what} in the NATS URL is not valid UTF-8 once its %-escapes are decoded"
                    ))
                })
        };
        let secret = match written.split_once(':') {
            Some((user, password)) => {
                if user.is_empty() {
                    return Err(Error::Config(
                        "the NATS URL has a password but no user before it (`nats://user:password@host`)"
                            .into(),
                    ));
                }
                UrlSecret::UserPassword {
                    user: decode(user, "user")?,
                    password: decode(password, "password")?,
                }
            }
            None => UrlSecret::Token(decode(written, "token")?),
        };
        Ok(UrlCredentials {
            written: written.to_string(),
            secret,
            handed_over,
        })
    }

    /// These credentials, marked as handed over by a parent.
    pub(crate) fn for_runners(&self) -> UrlCredentials {
        UrlCredentials {
            handed_over: true,
            ..self.clone()
        }
    }

    /// The variable and value that hand these credentials to a runner.
    pub(crate) fn handover(&self) -> (String, String) {
        (
            crate::env::NATS_URL_CREDENTIALS.to_string(),
            self.written.clone(),
        )
    }

    /// `options` with these credentials (in place of any user, password or
    /// token set before).
    pub(super) fn apply(&self, options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        match &self.secret {
            UrlSecret::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            UrlSecret::Token(token) => options.token(token.clone()),
        }
    }

    /// Where the credentials a server refused came from, for its error.
    pub(super) fn origin(&self) -> String {
        let what = match self.secret {
            UrlSecret::UserPassword { .. } => "the user and password",
            UrlSecret::Token(_) => "the token",
        };
        if self.handed_over {
            format!(
                "{what} came from the URL the parent was given (its NATS URL, or the runners'), \
                 handed to this runner in FLAME_NATS_URL_CREDENTIALS"
            )
        } else {
            format!("{what} came from the URL")
        }
    }
}

/// The `user:password` or `token` of one server's URL, if it has any.
fn userinfo(server: &str) -> Option<&str> {
    let rest = server.split_once("://").map_or(server, |(_, r)| r);
    let (userinfo, _) = rest.rsplit_once('@')?;
    (!userinfo.is_empty()).then_some(userinfo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_read_from_urls_and_never_shown() {
        let read = |url: &str| UrlCredentials::from_url(url).unwrap();
        assert!(read("nats://a:4222, nats://b:4222").is_none());
        let user = read("nats://app:p%40ss@a:4222").unwrap();
        // (Compared with `==`: the secret has no Debug to print.)
        assert!(
            user.secret
                == UrlSecret::UserPassword {
                    user: "app".into(),
                    password: "p@ss".into()
                }
        );
        // Handed to runners as written.
        assert_eq!(
            user.handover(),
            (
                crate::env::NATS_URL_CREDENTIALS.to_string(),
                "app:p%40ss".to_string()
            )
        );
        let token = read("tls://s3cret@a:4222").unwrap();
        assert!(token.secret == UrlSecret::Token("s3cret".into()));
        // A list: one set for all servers, some may leave it out.
        assert!(
            read("nats://app:pw@a:1,nats://b:2,app:pw@c:3").map(|c| c.secret)
                == Some(UrlSecret::UserPassword {
                    user: "app".into(),
                    password: "pw".into()
                })
        );
        let err = UrlCredentials::from_url("nats://app:pw1@a:1,nats://app:pw2@b:2").unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        assert!(!err.to_string().contains("pw1") && !err.to_string().contains("pw2"));
        assert!(err.to_string().contains("nats://a:1,nats://b:2"), "{err}");
        assert!(UrlCredentials::from_url("nats://:pw@a:1").is_err());
        let shown = format!("{user:?} {token:?}");
        assert!(!shown.contains("p@ss") && !shown.contains("p%40ss") && !shown.contains("s3cret"));
        assert!(user.origin().contains("came from the URL"));
        assert!(token
            .for_runners()
            .origin()
            .contains(crate::env::NATS_URL_CREDENTIALS));
    }
}
