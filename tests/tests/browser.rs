//! The web demo in a real browser: headless Chromium driven through
//! chromedriver (WebDriver), against the real app (`web_thumbnails`) on a
//! private PostgreSQL and a private nats-server, with runners as real
//! processes.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/test`
//! installs them through `scripts/install-chromium`), and ffmpeg. On
//! failure a screenshot of the page is saved beside the test's output
//! (`target/tmp/browser/`), and its path is printed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use fantoccini::{Client, Locator};
use flame_examples::postgres::PgServer;
use flame_tests::harness::example;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Settles most waits; a loaded 2-core machine is slow, not stuck.
const DEADLINE: Duration = Duration::from_secs(120);

/// Runners idle down after this long in the app under test.
const IDLE_SECS: u64 = 3;

/// Where screenshots go.
fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The app under test: killed (with its runners, nats-server included)
/// when dropped.
struct AppUnderTest {
    _child: tokio::process::Child,
    url: String,
    log: tokio::sync::watch::Receiver<String>,
}

impl AppUnderTest {
    async fn start(database_url: &str) -> AppUnderTest {
        let mut child = tokio::process::Command::new(example("web_thumbnails"))
            .env_remove("NATS_URL")
            .env_remove(flame::env::PARENT)
            .env("DATABASE_URL", database_url)
            .env("LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("THUMBS_MAX", "2")
            .env("THUMBS_IDLE_SECS", IDLE_SECS.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start web_thumbnails");
        // Keep everything it prints, for failure messages.
        let (log_tx, log) = tokio::sync::watch::channel(String::new());
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log_tx = log_tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log_tx.send_modify(|log| {
                        log.push_str(&line);
                        log.push('\n');
                    });
                }
            });
        }
        let mut app = AppUnderTest {
            _child: child,
            url: String::new(),
            log,
        };
        let mut log = app.log.clone();
        let url = tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(url) = log
                    .borrow_and_update()
                    .lines()
                    .find_map(|l| l.strip_prefix("open ").and_then(|l| l.split(' ').next()))
                {
                    return url.to_string();
                }
                if log.changed().await.is_err() {
                    panic!("the app exited: {}", log.borrow().as_str());
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the app did not serve in time: {}", app.output()));
        app.url = url;
        app
    }

    fn output(&self) -> String {
        self.log.borrow().clone()
    }
}

/// chromedriver on a free port, killed when dropped.
struct Driver {
    _child: tokio::process::Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let chromedriver = ["/usr/bin/chromedriver", "chromedriver"]
            .into_iter()
            .find(|p| {
                std::process::Command::new(p)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .expect("chromedriver not found: run scripts/install-chromium (Debian packages chromium, chromium-driver)");
        let port = free_port();
        let child = tokio::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + DEADLINE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Driver { _child: child, url }
    }

    /// A headless Chromium session with a fresh profile in `profile`.
    async fn session(&self, profile: &Path) -> Client {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let mut caps = serde_json::Map::new();
        let mut chrome = serde_json::json!({ "args": args });
        if Path::new("/usr/bin/chromium").exists() {
            chrome["binary"] = "/usr/bin/chromium".into();
        }
        caps.insert("goog:chromeOptions".into(), chrome);
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        fantoccini::ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session through chromedriver")
    }
}

/// Polls `check` until it returns `Some`, or fails after `limit` saying
/// what it waited for.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        anyhow::ensure!(Instant::now() < deadline, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn attr(client: &Client, css: &str, name: &str) -> anyhow::Result<Option<String>> {
    match client.find(Locator::Css(css)).await {
        Ok(el) => Ok(el.attr(name).await?),
        Err(e) if e.is_no_such_element() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Two generated videos uploaded at once through the page: thumbnails
/// appear on the page and decode, a row per thumbnail is in PostgreSQL
/// naming the runner the page showed, and the runners panel showed
/// runners, then none once they idled down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_in_the_browser_show_thumbnails_rows_and_the_pool() {
    let work = tempfile::tempdir().unwrap();
    let pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let app = AppUnderTest::start(&pg.url()).await;
    let driver = Driver::start().await;
    let client = driver.session(&work.path().join("profile")).await;

    let mut videos = Vec::new();
    for name in ["first", "second"] {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let video = flame_examples::video::make_test_video(&dir, 20)
            .await
            .expect("a test video");
        let named = dir.join(format!("{name}.ts"));
        std::fs::rename(&video, &named).unwrap();
        videos.push(named);
    }

    let result = scenario(&client, &app, &pg, &videos).await;
    let shot = output_dir().join(if result.is_ok() {
        "web-thumbnails-idle.png"
    } else {
        "web-thumbnails-FAILED.png"
    });
    let saved = match client.screenshot().await {
        Ok(png) => std::fs::write(&shot, png).map_err(anyhow::Error::from),
        Err(e) => Err(e.into()),
    };
    let _ = client.close().await;
    match (result, saved) {
        (Ok(()), Ok(())) => println!("screenshot: {}", shot.display()),
        (Ok(()), Err(e)) => panic!("the test passed but its screenshot failed: {e}"),
        (Err(e), saved) => panic!(
            "{e:#}\nscreenshot: {}\napp output:\n{}",
            match saved {
                Ok(()) => shot.display().to_string(),
                Err(e) => format!("none ({e})"),
            },
            app.output()
        ),
    }
}

async fn scenario(
    client: &Client,
    app: &AppUnderTest,
    pg: &PgServer,
    videos: &[PathBuf],
) -> anyhow::Result<()> {
    client.goto(&app.url).await?;
    wait_for("the page's event stream", DEADLINE, || async {
        Ok(attr(client, "body", "data-connected")
            .await?
            .filter(|c| c == "true"))
    })
    .await?;
    anyhow::ensure!(
        attr(client, "#pool-summary", "data-active")
            .await?
            .as_deref()
            == Some("0"),
        "the pool should start at zero runners"
    );

    // Both files at once, through the file input and the Upload button.
    let paths: Vec<String> = videos.iter().map(|p| p.display().to_string()).collect();
    client
        .find(Locator::Id("file"))
        .await?
        .send_keys(&paths.join("\n"))
        .await?;
    client.find(Locator::Id("upload")).await?.click().await?;

    // Thumbnails appear as the runners make them; each upload ends done.
    wait_for("a first thumbnail on the page", DEADLINE, || async {
        let thumbs = client.find_all(Locator::Css("img.thumb")).await?;
        Ok((!thumbs.is_empty()).then_some(()))
    })
    .await?;
    let jobs: Vec<(String, String)> = wait_for("both uploads done", DEADLINE, || async {
        let mut done = Vec::new();
        for job in client.find_all(Locator::Css(".job")).await? {
            let status = job.attr("data-status").await?.unwrap_or_default();
            anyhow::ensure!(
                status != "failed",
                "an upload failed: {}",
                job.text().await?
            );
            if status == "done" {
                let id = job.attr("data-job").await?.unwrap_or_default();
                let name = job.find(Locator::Css(".name")).await?.text().await?;
                done.push((id, name));
            }
        }
        Ok((done.len() == 2).then_some(done))
    })
    .await?;
    // A picture of the page with its thumbnails, for people.
    if let Ok(png) = client.screenshot().await {
        let path = output_dir().join("web-thumbnails-done.png");
        if std::fs::write(&path, png).is_ok() {
            println!("screenshot: {}", path.display());
        }
    }
    let mut names: Vec<&str> = jobs.iter().map(|(_, n)| n.as_str()).collect();
    names.sort();
    anyhow::ensure!(
        names == ["first.ts", "second.ts"],
        "uploads shown: {names:?}"
    );

    for (job, name) in &jobs {
        // Ten thumbnails (20 s, one every 2 s), each decoded by the browser
        // at the size the runner made (160 pixels wide).
        let images: Vec<(u64, String)> = serde_json::from_value(
            client
                .execute(
                    "return [...document.querySelectorAll(`.job[data-job=\"${arguments[0]}\"] img.thumb`)]
                        .map(i => [i.complete ? i.naturalWidth : 0, i.dataset.runner]);",
                    vec![job.clone().into()],
                )
                .await?,
        )?;
        anyhow::ensure!(
            images.len() == 10,
            "{name}: {} thumbnails on the page, expected 10",
            images.len()
        );
        anyhow::ensure!(
            images.iter().all(|(w, _)| *w == 160),
            "{name}: an image did not decode: widths {:?}",
            images.iter().map(|(w, _)| w).collect::<Vec<_>>()
        );
        // A row per thumbnail, by the runner the page named.
        let rows = pg
            .client()
            .await
            .query(
                "SELECT at_secs, made_by FROM thumbnails WHERE video = $1 ORDER BY at_secs",
                &[job],
            )
            .await?;
        let at: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        anyhow::ensure!(
            at == (0..10).map(|i| i * 2).collect::<Vec<_>>(),
            "{name}: rows at {at:?}"
        );
        let shown: std::collections::BTreeSet<&str> =
            images.iter().map(|(_, r)| r.as_str()).collect();
        for row in &rows {
            let by: String = row.get(1);
            anyhow::ensure!(
                shown.contains(by.as_str()),
                "{name}: a row names runner {by}, the page showed {shown:?}"
            );
        }
    }

    // The runners panel showed at least one runner, and once they idled
    // down, none.
    let max_seen: usize = attr(client, "#pool-summary", "data-max-seen")
        .await?
        .unwrap_or_default()
        .parse()?;
    anyhow::ensure!(
        (1..=2).contains(&max_seen),
        "the panel showed {max_seen} runners at most (max 2)"
    );
    wait_for(
        "the runners panel at zero runners",
        Duration::from_secs(IDLE_SECS) + DEADLINE,
        || async {
            let active = attr(client, "#pool-summary", "data-active").await?;
            Ok((active.as_deref() == Some("0")).then_some(()))
        },
    )
    .await?;
    let gone = client
        .find_all(Locator::Css(".runner[data-state=\"gone\"]"))
        .await?
        .len();
    anyhow::ensure!(gone >= 1, "no runner shown as gone");
    let summary = client
        .find(Locator::Id("pool-summary"))
        .await?
        .text()
        .await
        .context("the pool summary")?;
    anyhow::ensure!(summary.contains("zero"), "pool summary: {summary}");
    Ok(())
}
