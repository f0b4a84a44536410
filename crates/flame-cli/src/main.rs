//! `flame`: what the flame pools on a NATS server are doing.
//!
//! ```text
//! flame pools               every pool, merged over its parents
//! flame runners <pool>      each runner of a pool: state, load, uptime, requests
//! flame watch <pool>|'*'    pool events as they happen (--json: raw)
//! flame top                 a refreshing view of all pools and the latest events
//! ```
//!
//! It connects like flame's parents and runners do: `--server`, else
//! `NATS_URL`, else `nats://127.0.0.1:4222`, with credentials and TLS from
//! the URL (`nats://user:password@host`, `nats://token@host`), `NATS_CREDS`,
//! `NATS_NKEY`, `NATS_USER`/`NATS_PASSWORD`, `NATS_TOKEN`, `NATS_CA`,
//! `NATS_CERT`/`NATS_KEY`.
//!
//! When the server refuses the command's user a subject it needs, the
//! command says `permission denied on <subject>` (exit 1); PROTOCOL.md,
//! section 9.1, lists what an operator's user needs.
//!
//! Exit codes: 0 done, 1 NATS unreachable, a permission denied or another
//! failure, 2 bad usage or `top` without a terminal.

mod connection;
mod error;
mod gather;
mod pools;
mod refusals;
mod runners;
mod table;
mod time;
mod top;
mod watch;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::connection::{connect, server_url};
use crate::error::CliError;

/// What the flame pools on a NATS server are doing.
#[derive(Debug, Parser)]
#[command(name = "flame", version, about, long_about = None)]
struct Cli {
    /// NATS server URL, or several separated by commas [default: $NATS_URL,
    /// else nats://127.0.0.1:4222]
    #[arg(long, short = 's', global = true)]
    server: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists the pools whose parents answer on `flame.pools.info`.
    Pools {
        /// How long to gather answers (`500ms`, `2s`).
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Lists the runners of a pool, from their micro service (and the
    /// pool's bucket for shared pools).
    Runners {
        /// The pool.
        pool: String,
        /// How long to gather answers (`500ms`, `2s`).
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Prints a pool's events as they happen (`*` for every pool).
    Watch {
        /// The pool, or `*` for all.
        pool: String,
        /// Prints each event's JSON as published.
        #[arg(long)]
        json: bool,
    },
    /// A refreshing view of every pool and the latest events; `q` quits.
    Top,
}

/// `500ms`, `2s`, `1.5s`, or a number of milliseconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 0.001)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        (text, 0.001)
    };
    number
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)
        .map(|n| Duration::from_secs_f64(n * scale))
        .ok_or_else(|| format!("`{text}` is not a duration such as 500ms or 2s"))
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let url = server_url(cli.server);
    match cli.command {
        Command::Pools { wait } => pools::run(&connect(&url).await?, wait).await,
        Command::Runners { pool, wait } => runners::run(&connect(&url).await?, &pool, wait).await,
        Command::Watch { pool, json } => watch::run(&connect(&url).await?, &url, &pool, json).await,
        Command::Top => {
            // Before connecting: without a terminal there is nothing to do.
            top::check_terminal()?;
            top::run(&connect(&url).await?, &url).await
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Failed(message)) => {
            eprintln!("flame: {message}");
            ExitCode::from(1)
        }
        Err(CliError::Usage(message)) => {
            eprintln!("flame: {message}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn the_command_line_parses() {
        let cli = Cli::try_parse_from(["flame", "--server", "nats://a:1", "watch", "*", "--json"])
            .unwrap();
        assert_eq!(cli.server.as_deref(), Some("nats://a:1"));
        assert!(matches!(cli.command, Command::Watch { ref pool, json: true } if pool == "*"));
        let cli = Cli::try_parse_from(["flame", "pools", "--wait", "1s"]).unwrap();
        assert!(matches!(cli.command, Command::Pools { wait } if wait == Duration::from_secs(1)));
        assert!(
            Cli::try_parse_from(["flame", "runners"]).is_err(),
            "pool needed"
        );
    }
}
