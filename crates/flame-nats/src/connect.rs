//! Connecting to NATS: server lists, timeouts, and the connection events a
//! parent reacts to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{watch, Notify};

use flame_core::{Error, Source};

/// True when every server of `url` is on this machine (`localhost`,
/// `127.x.y.z`, `::1`): an address other machines cannot reach.
pub(crate) fn only_loopback(url: &str) -> bool {
    let servers = server_list(url);
    !servers.is_empty()
        && servers.iter().all(|server| {
            let rest = server.split_once("://").map_or(server.as_str(), |(_, r)| r);
            let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
            let host = if let Some(v6) = rest.strip_prefix('[') {
                v6.split(']').next().unwrap_or("")
            } else {
                rest.split(':').next().unwrap_or("")
            };
            host == "localhost"
                || host == "::1"
                || host
                    .parse::<std::net::Ipv4Addr>()
                    .is_ok_and(|ip| ip.is_loopback())
        })
}

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

/// `url` with any `user:password@` or `token@` taken out, for logs,
/// errors and what runners are told.
pub fn without_credentials(url: &str) -> String {
    server_list(url)
        .iter()
        .map(|server| match (server.find("://"), server.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}{}", &server[..scheme + 3], &server[at + 1..])
            }
            (None, Some(at)) => server[at + 1..].to_string(),
            _ => server.clone(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

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
    fn apply(&self, options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        match &self.secret {
            UrlSecret::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            UrlSecret::Token(token) => options.token(token.clone()),
        }
    }

    /// Where the credentials a server refused came from, for its error.
    fn origin(&self) -> String {
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

/// How many permission violations [`Permissions`] keeps.
const KEEP_VIOLATIONS: usize = 16;

/// The permission violations the NATS server reported on one connection
/// (`-ERR 'Permissions Violation for ...'`). The server reports them
/// asynchronously, and the client only through its event callback, so a
/// refused subscription or publish shows here, not where it was made.
#[derive(Debug, Clone, Default)]
pub(crate) struct Permissions {
    inner: Arc<PermissionsInner>,
}

#[derive(Default)]
struct PermissionsInner {
    /// How many violations so far, and the latest ones, numbered from 1.
    seen: Mutex<(u64, std::collections::VecDeque<(u64, String)>)>,
    /// How many times the connection was lost (or dropped on purpose).
    disconnects: std::sync::atomic::AtomicU64,
    /// Woken on every violation and every disconnection.
    reported: Notify,
    /// Told of every violation as it is reported (see
    /// [`Permissions::on_violation`]).
    listeners: Mutex<Vec<ViolationListener>>,
}

/// See [`Permissions::on_violation`].
type ViolationListener = Box<dyn Fn(&str) + Send + Sync>;

impl std::fmt::Debug for PermissionsInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PermissionsInner")
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl Permissions {
    /// Takes note of a connection event: a permission violation, or a
    /// disconnection.
    fn record(&self, event: &async_nats::Event) {
        match event {
            async_nats::Event::ServerError(error) => self.record_error(error),
            async_nats::Event::Disconnected => {
                self.inner.disconnects.fetch_add(1, Ordering::SeqCst);
                self.inner.reported.notify_waiters();
            }
            _ => {}
        }
    }

    /// Records a server error if it is a permission violation.
    fn record_error(&self, error: &async_nats::ServerError) {
        let async_nats::ServerError::Other(text) = error else {
            return;
        };
        if !text
            .to_ascii_lowercase()
            .starts_with("permissions violation")
        {
            return;
        }
        {
            let mut seen = self.inner.seen.lock().unwrap();
            seen.0 += 1;
            let n = seen.0;
            seen.1.push_back((n, text.clone()));
            if seen.1.len() > KEEP_VIOLATIONS {
                seen.1.pop_front();
            }
        }
        self.inner.reported.notify_waiters();
        tracing::warn!("the NATS server refused: {text}");
        for listener in self.inner.listeners.lock().unwrap().iter() {
            listener(text);
        }
    }

    /// Calls `listener` with the text of every violation reported from now
    /// on (on the client's event task: it must not block).
    pub(crate) fn on_violation(&self, listener: impl Fn(&str) + Send + Sync + 'static) {
        self.inner
            .listeners
            .lock()
            .unwrap()
            .push(Box::new(listener));
    }

    /// A mark for the violations reported from now on that name one of
    /// `about` (parts of subjects, e.g. `flame.thumbs.`): what concerns an
    /// operation starting now, not a late report of an earlier one.
    pub(crate) fn mark_about(&self, about: Vec<String>) -> Mark {
        Mark {
            after: self.inner.seen.lock().unwrap().0,
            about,
        }
    }

    /// The first violation that `mark` covers, as an error.
    pub(crate) fn since(&self, mark: &Mark) -> Option<Error> {
        let seen = self.inner.seen.lock().unwrap();
        seen.1
            .iter()
            .find(|(n, text)| mark.covers(*n, text))
            .map(|(_, reason)| Error::PermissionDenied {
                reason: reason.clone(),
            })
    }

    /// Resolves with the first violation that `mark` covers.
    async fn violated(&self, mark: &Mark) -> Error {
        loop {
            let reported = self.inner.reported.notified();
            tokio::pin!(reported);
            reported.as_mut().enable();
            if let Some(e) = self.since(mark) {
                return e;
            }
            reported.await;
        }
    }

    /// Runs `work`, but fails at once with [`Error::PermissionDenied`] when
    /// the server reports a violation after `mark` meanwhile (a refused
    /// request would otherwise only time out).
    pub(crate) async fn guard<T>(
        &self,
        mark: &Mark,
        work: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::select! {
            biased;
            e = self.violated(mark) => Err(e),
            result = work => result,
        }
    }

    /// A request that only this client answers: to a fresh inbox of its
    /// own, which it subscribes to and answers itself. The server deals
    /// with a client's messages in order, so once the request comes back,
    /// the server has reported every violation of what was sent before,
    /// and the client has read those reports.
    ///
    /// Another client of the account subscribed to `_INBOX.>` (or `>`) sees
    /// the request too, but cannot keep it from coming back, nor answer in
    /// our place before our own subscription has it: asking for "no
    /// responders" instead, as this did before, waited the whole timeout
    /// whenever such a client was there. A connection without echo (a
    /// hook's `no_echo`) never hears itself: then the server's
    /// no-responders answer ends the wait, as long as nobody else listens.
    async fn round_trip(
        &self,
        client: &async_nats::Client,
        mark: &Mark,
        timeout: Duration,
    ) -> Result<(), Error> {
        let probe = async {
            let subject = client.new_inbox();
            let mut own = client
                .subscribe(subject.clone())
                .await
                .map_err(|e| Error::nats("cannot subscribe to this connection's inbox", e))?;
            let answer = async {
                while let Some(message) = own.next().await {
                    if let Some(reply) = message.reply {
                        let _ = client.publish(reply, bytes::Bytes::new()).await;
                    }
                }
                std::future::pending::<()>().await
            };
            let request = async_nats::Request::new().timeout(Some(timeout));
            tokio::select! {
                // Any end will do: our own answer, no responders, or the
                // timeout (a slow server).
                _ = client.send_request(subject, request) => {}
                _ = answer => {}
            }
            Ok(())
        };
        self.guard(mark, probe).await
    }

    /// Fails with the first violation after `mark` that the server
    /// reported for what was sent on `client` so far, if the client has
    /// passed it on by the end of two round trips (the client hands reports
    /// to the event callback on a task of its own, which may run late on a
    /// busy machine: a report that comes later is still logged, and still
    /// fails a [`Permissions::guard`] in progress).
    pub(crate) async fn check(
        &self,
        client: &async_nats::Client,
        mark: &Mark,
        timeout: Duration,
    ) -> Result<(), Error> {
        for _ in 0..2 {
            self.round_trip(client, mark, timeout).await?;
        }
        match self.since(mark) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Like [`Permissions::check`], but certain to see every violation of
    /// what was sent on `client` so far: after a round trip it drops the
    /// connection and waits for the client to report that, which the
    /// client does after every report it read before (its events come in
    /// order). The client reconnects at once and makes its subscriptions
    /// again, before anything sent later. Costs a reconnection: for a
    /// runner's start, where a refused subscription would leave a runner
    /// its parents cannot reach.
    pub(crate) async fn settle(
        &self,
        client: &async_nats::Client,
        deadline: tokio::time::Instant,
    ) -> Result<(), Error> {
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let all = Mark::default();
        self.round_trip(client, &all, left().min(Duration::from_secs(2)))
            .await?;
        let disconnects = self.inner.disconnects.load(Ordering::SeqCst);
        client
            .force_reconnect()
            .await
            .map_err(|e| Error::nats("cannot reconnect to NATS", e))?;
        let dropped = async {
            loop {
                let reported = self.inner.reported.notified();
                tokio::pin!(reported);
                reported.as_mut().enable();
                if self.inner.disconnects.load(Ordering::SeqCst) > disconnects {
                    return Ok(());
                }
                reported.await;
            }
        };
        tokio::time::timeout(left(), self.guard(&all, dropped))
            .await
            .map_err(|_| {
                Error::RunnerStart("failsafe: the NATS client did not reconnect in time".into())
            })??;
        match self.since(&all) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Which violations an operation counts as its own (see
/// [`Permissions::mark_about`]). The default covers every violation of the
/// connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct Mark {
    /// Violations numbered higher than this.
    after: u64,
    /// Naming one of these; all when empty.
    about: Vec<String>,
}

impl Mark {
    fn covers(&self, n: u64, text: &str) -> bool {
        n > self.after && (self.about.is_empty() || self.about.iter().any(|a| text.contains(a)))
    }
}

/// What a parent learns about its connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionEvents {
    /// Counts disconnections: calls in flight when it changes fail at once
    /// (their replies are lost) instead of waiting for their deadline.
    pub(crate) disconnects: watch::Receiver<u64>,
    /// Woken on every (re)connection, e.g. to recreate KV watches or to
    /// restart heartbeat clocks.
    pub(crate) connected: Arc<Notify>,
    /// Set when this side closes the connection on purpose: losing it is
    /// then expected and not worth a warning.
    pub(crate) closing: Arc<AtomicBool>,
    /// When the connection was last (re)established.
    pub(crate) last_connected: Arc<Mutex<Option<Instant>>>,
    /// Subscriptions and publishes the server refused.
    pub(crate) permissions: Permissions,
    /// Outages of the connection so far.
    pub(crate) outages: Arc<Mutex<Outages>>,
}

/// A connection's outages: how many, and the last one.
///
/// An outage ends when the connection's owner says the server has its
/// subscriptions again ([`Outages::resubscribed`]), not when the
/// connection is back: the client sends its subscriptions after
/// reconnecting, and messages published to them before the server has
/// them are dropped. A connection whose owner never says so (a parent's)
/// counts no outage.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Outages {
    /// Outages that ended.
    pub(crate) count: u64,
    /// The last one that ended: when it started and when it ended.
    pub(crate) last: Option<(Instant, Instant)>,
    /// When the current one started, while it lasts.
    pub(crate) down_since: Option<Instant>,
    /// Whether the connection is back (its subscriptions on their way).
    back: bool,
}

impl Outages {
    fn disconnected(&mut self) {
        self.back = false;
        self.down_since.get_or_insert_with(Instant::now);
    }

    fn reconnected(&mut self) {
        self.back = self.down_since.is_some();
    }

    /// The server has this connection's subscriptions (a flush after the
    /// reconnection came back): the current outage, if any, ends `at`.
    pub(crate) fn resubscribed(&mut self, at: Instant) {
        if !std::mem::take(&mut self.back) {
            return;
        }
        if let Some(since) = self.down_since.take() {
            self.count += 1;
            self.last = Some((since, at));
        }
    }

    /// Whether an outage is over but for its subscriptions.
    pub(crate) fn awaiting_subscriptions(&self) -> bool {
        self.back
    }

    /// Which stretch of connection this is: the same number before and
    /// after a round trip means no outage began or ended meanwhile; `None`
    /// during one.
    pub(crate) fn stretch(&self) -> Option<u64> {
        (self.down_since.is_none() && !self.back).then_some(self.count)
    }
}

/// Whether a variable's value can be a file's path rather than what the
/// file holds (a JWT, a seed, several lines).
fn looks_like_a_path(value: &str) -> bool {
    value.len() <= 4096 && !value.contains('\n') && !value.contains("-----BEGIN")
}

/// The servers of a URL list: `nats://a:4222, nats://b:4222`.
pub(crate) fn server_list(url: &str) -> Vec<String> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// Connects with `options`, turning failures into
/// [`Error::NatsUnreachable`]; reports connection events and outages, and
/// watches for permission violations.
pub(crate) async fn connect_watched(
    url: &str,
    name: String,
    timeout: Duration,
    options: async_nats::ConnectOptions,
    url_credentials: Option<&UrlCredentials>,
) -> Result<(async_nats::Client, ConnectionEvents), Error> {
    let (tx, disconnects) = watch::channel(0u64);
    let connected = Arc::new(Notify::new());
    let closing = Arc::new(AtomicBool::new(false));
    let last_connected = Arc::new(Mutex::new(None));
    let outages = Arc::new(Mutex::new(Outages::default()));
    let permissions = Permissions::default();
    let (notify, quiet, at) = (connected.clone(), closing.clone(), last_connected.clone());
    let outs = outages.clone();
    let watch = permissions.clone();
    let options = options.event_callback(move |event| {
        // Read first, before the event is recorded: a reconnection made on
        // purpose (the runner's start) clears the flag as soon as it is.
        let on_purpose = quiet.load(Ordering::SeqCst);
        watch.record(&event);
        if matches!(event, async_nats::Event::Disconnected) && !on_purpose {
            // Not an outage when dropped on purpose: calls were not lost.
            outs.lock().unwrap().disconnected();
        }
        let (tx, notify, at) = (tx.clone(), notify.clone(), at.clone());
        let outs = outs.clone();
        async move {
            match event {
                async_nats::Event::Disconnected => {
                    if on_purpose {
                        tracing::debug!("disconnected from NATS");
                    } else {
                        tracing::warn!("lost the connection to NATS; reconnecting");
                    }
                    tx.send_modify(|n| *n += 1);
                }
                async_nats::Event::Connected => {
                    tracing::info!("connected to NATS");
                    let now = Instant::now();
                    *at.lock().unwrap() = Some(now);
                    outs.lock().unwrap().reconnected();
                    notify.notify_waiters();
                }
                _ => {}
            }
        }
    });
    let client = connect_with(url, name, timeout, options, url_credentials).await?;
    Ok((
        client,
        ConnectionEvents {
            disconnects,
            connected,
            closing,
            last_connected,
            outages,
            permissions,
        },
    ))
}

/// `url_credentials`: those `options` hold, if they came from a URL (to
/// say so when the server refuses them).
async fn connect_with(
    url: &str,
    name: String,
    timeout: Duration,
    options: async_nats::ConnectOptions,
    url_credentials: Option<&UrlCredentials>,
) -> Result<async_nats::Client, Error> {
    let unreachable = |reason: String, source: Option<Source>| Error::NatsUnreachable {
        url: without_credentials(url),
        reason,
        source,
    };
    // The client ignores a URL's credentials (they are in `options`):
    // keep them out of everything it logs.
    let servers = server_list(&without_credentials(url));
    if servers.is_empty() {
        return Err(Error::Config(format!(
            "no NATS server in `{url}`; give one URL or a comma-separated list"
        )));
    }
    let options = options
        .name(name)
        .reconnect_delay_callback(reconnect_delay)
        .connection_timeout(timeout)
        // Keep requests bounded by our own deadlines, not the client's 10 s.
        .request_timeout(None);
    tokio::time::timeout(timeout, options.connect(servers))
        .await
        .map_err(|_| unreachable(format!("no connection within {timeout:?}"), None))?
        .map_err(|e| {
            let mut reason = e.to_string();
            if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation {
                // The server does not say why; where the credentials came
                // from, or an expired user, the client can say.
                if let Some(credentials) = url_credentials {
                    reason = format!("{reason} ({})", credentials.origin());
                } else if let Some(expired) = expired_credentials(std::time::SystemTime::now()) {
                    reason = format!("{reason} ({expired})");
                }
            }
            unreachable(reason, Some(Source::new(e)))
        })
}

/// Says so when the user JWT of the `NATS_CREDS` file expired before `now`
/// (its `exp` claim): a server refuses such a user with a bare
/// "authorization violation". Names the file, never its contents.
fn expired_credentials(now: std::time::SystemTime) -> Option<String> {
    let path = std::env::var("NATS_CREDS").ok().filter(|p| !p.is_empty())?;
    let creds = std::fs::read_to_string(&path).ok()?;
    let expires = jwt_expiry(&creds)?;
    (expires <= now).then(|| {
        format!(
            "the user JWT in NATS_CREDS ({path}) expired at {}; issue new credentials",
            crate::protocol::pool_events::format_time(expires)
        )
    })
}

/// The `exp` claim of the user JWT in the text of a `.creds` file.
fn jwt_expiry(creds: &str) -> Option<std::time::SystemTime> {
    let mut lines = creds.lines().map(str::trim);
    lines.find(|l| l.contains("BEGIN NATS USER JWT"))?;
    let jwt = lines.next()?;
    let claims = jwt.split('.').nth(1)?;
    // JWTs are base64url without padding; some writers pad anyway.
    let claims = data_encoding::BASE64URL_NOPAD
        .decode(claims.trim_end_matches('=').as_bytes())
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&claims).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(exp))
}

/// Connects a tool (not a parent, not a runner) to `url`, one server or a
/// comma-separated list, with the options of the conventional environment
/// (see [`options_from_env`]), within `timeout`. Credentials written in
/// the URL (`user:password@`, `token@`) take the place of `NATS_USER`/
/// `NATS_PASSWORD` and `NATS_TOKEN`. Fails with [`Error::NatsUnreachable`]
/// naming the URL without credentials (and, when the server refuses
/// credentials from the URL, saying that they came from it).
pub async fn connect_tool(
    url: &str,
    name: &str,
    timeout: Duration,
) -> Result<async_nats::Client, Error> {
    connect_tool_with(url, name, timeout, |options| options).await
}

/// [`connect_tool`], with `adjust` applied to the options last, before
/// flame sets the name, timeouts and reconnect pacing: e.g. an
/// `event_callback` to learn what the server refuses (the `flame` command
/// says `permission denied on <subject>` that way), or a
/// `custom_inbox_prefix`.
pub async fn connect_tool_with(
    url: &str,
    name: &str,
    timeout: Duration,
    adjust: impl FnOnce(async_nats::ConnectOptions) -> async_nats::ConnectOptions,
) -> Result<async_nats::Client, Error> {
    let credentials = UrlCredentials::from_url(url)?;
    let options = adjust(options_from_env_and(credentials.as_ref()).await?);
    connect_with(
        url,
        name.to_string(),
        timeout,
        options,
        credentials.as_ref(),
    )
    .await
}

/// Pause before a connection attempt: none for the first, then 100 ms more
/// per attempt up to 1 s. (The client's default grows to 4 s; flame wants
/// parents and runners back within a second of the server's return, as
/// they judge each other's silence.)
fn reconnect_delay(attempts: usize) -> Duration {
    let waits = attempts.saturating_sub(1) as u64;
    Duration::from_millis(waits.saturating_mul(100).min(1_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_split_on_commas() {
        assert_eq!(server_list("nats://a:1"), vec!["nats://a:1"]);
        assert_eq!(
            server_list(" nats://a:1 ,nats://b:2,, "),
            vec!["nats://a:1", "nats://b:2"]
        );
        assert!(server_list(" , ").is_empty());
    }

    #[test]
    fn loopback_urls_are_told_apart() {
        assert!(only_loopback("nats://127.0.0.1:4222"));
        assert!(only_loopback("localhost:4222, nats://[::1]:4222"));
        assert!(only_loopback("nats://u:p@127.0.0.2:1"));
        assert!(!only_loopback("nats://127.0.0.1:4222,nats://10.0.0.5:4222"));
        assert!(!only_loopback("tls://nats.internal:4222"));
        assert!(!only_loopback("nats://[fdaa::3]:4222"));
    }

    #[test]
    fn the_expiry_of_a_creds_files_jwt_is_read() {
        use data_encoding::BASE64URL_NOPAD as B64;
        let jwt = |claims: &str| {
            format!(
                "{}.{}.c2ln",
                B64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
                B64.encode(claims.as_bytes())
            )
        };
        let creds = |jwt: String| {
            format!("-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\nSUAB\n------END USER NKEY SEED------\n")
        };
        let at = jwt_expiry(&creds(jwt(r#"{"sub":"U","exp":1700000000}"#)));
        assert_eq!(
            at,
            Some(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(jwt_expiry(&creds(jwt(r#"{"sub":"U"}"#))), None);
        assert_eq!(jwt_expiry("not a creds file"), None);
        assert_eq!(jwt_expiry(&creds("a.%%%.b".into())), None);
    }

    #[test]
    fn a_creds_files_contents_are_not_taken_for_its_path() {
        assert!(looks_like_a_path("/run/secrets/app.creds"));
        assert!(!looks_like_a_path(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.c2ln\n------END NATS USER JWT------"
        ));
        assert!(!looks_like_a_path("-----BEGIN NATS USER JWT----- eyJ0eXAi"));
    }

    #[test]
    fn credentials_are_taken_out_of_urls() {
        assert_eq!(
            without_credentials("nats://user:s3cret@a:4222, tls://tok@b:4223,nats://c:1"),
            "nats://a:4222,tls://b:4223,nats://c:1"
        );
        assert_eq!(without_credentials("u:p@host:4222"), "host:4222");
    }

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

    #[test]
    fn the_first_attempt_does_not_wait_and_later_ones_wait_at_most_a_second() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(500), Duration::from_secs(1));
    }
}
