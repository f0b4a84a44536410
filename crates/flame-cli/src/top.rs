//! `flame top`: every pool, refreshed each second, and the latest pool
//! events; `q` (or Esc, Ctrl-C) quits.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::time::Duration;

use flame_nats::ops::{events_wildcard, PoolEventMessage};
use futures::StreamExt;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;

use crate::connection::Connection;
use crate::error::CliError;
use crate::pools::{gather_rows, PoolRow, HEADER};
use crate::watch::line;

/// Events kept for the view.
const KEPT_EVENTS: usize = 500;

/// How long each refresh gathers answers; one refresh a second.
const GATHER: Duration = Duration::from_millis(400);
const REFRESH: Duration = Duration::from_secs(1);

/// `top` draws on a terminal: refuse at once without one.
pub(crate) fn check_terminal() -> Result<(), CliError> {
    if std::io::stdout().is_terminal() && std::io::stdin().is_terminal() {
        Ok(())
    } else {
        Err(CliError::Usage(
            "`flame top` needs a terminal (standard input and output are not a TTY); \
             use `flame pools` or `flame watch` in scripts"
                .into(),
        ))
    }
}

/// What is on screen.
#[derive(Debug, Default)]
struct View {
    url: String,
    pools: Vec<PoolRow>,
    refreshed: bool,
    events: VecDeque<String>,
    error: Option<String>,
}

/// `flame top`.
pub(crate) async fn run(connection: &Connection, url: &str) -> Result<(), CliError> {
    let client = &connection.client;
    let subject = events_wildcard("*");
    // Before the terminal is taken: a user refused the events or the pools
    // is told so plainly, and the command ends.
    let first = async {
        let events = client
            .subscribe(subject.clone())
            .await
            .map_err(|e| CliError::nats(&format!("cannot subscribe to {subject}"), e))?;
        let rows = gather_rows(client, GATHER).await?;
        Ok((events, rows))
    };
    let (mut events, rows) = connection.refusals.guard(client, first).await?;
    let (tx, mut refreshed) = tokio::sync::mpsc::channel(1);
    let refresher = tokio::spawn({
        let client = client.clone();
        let refusals = connection.refusals.clone();
        async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.tick().await;
            loop {
                tick.tick().await;
                let rows = gather_rows(&client, GATHER).await;
                // A permission taken away meanwhile shows in the view.
                let rows = match refusals.first() {
                    Some(e) => Err(e),
                    None => rows,
                };
                if tx.send(rows).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut terminal = ratatui::try_init()
        .map_err(|e| CliError::Failed(format!("cannot set up the terminal: {e}")))?;
    let mut view = View {
        url: flame_nats::tool::without_credentials(url),
        pools: rows,
        refreshed: true,
        ..View::default()
    };
    let mut keys = tokio::time::interval(Duration::from_millis(50));
    let result = loop {
        tokio::select! {
            rows = refreshed.recv() => match rows {
                Some(Ok(rows)) => {
                    view.pools = rows;
                    view.refreshed = true;
                    view.error = None;
                }
                Some(Err(CliError::Failed(e) | CliError::Usage(e))) => view.error = Some(e),
                None => break Ok(()),
            },
            msg = events.next() => match msg {
                Some(msg) => {
                    let text = serde_json::from_slice::<PoolEventMessage>(&msg.payload)
                        .map(|e| line(&e))
                        .unwrap_or_else(|_| format!("{} (not a pool event)", msg.subject));
                    view.events.push_front(text);
                    view.events.truncate(KEPT_EVENTS);
                }
                None => break Err(CliError::Failed("the connection to NATS closed".into())),
            },
            _ = keys.tick() => {
                match quit_pressed() {
                    Ok(true) => break Ok(()),
                    Ok(false) => {}
                    Err(e) => break Err(CliError::Failed(format!("cannot read the terminal: {e}"))),
                }
            }
        }
        if let Err(e) = terminal.draw(|f| draw(f, &view)) {
            break Err(CliError::Failed(format!("cannot draw: {e}")));
        }
    };
    ratatui::restore();
    refresher.abort();
    result
}

/// Reads pending key presses: true on `q`, Esc or Ctrl-C.
fn quit_pressed() -> std::io::Result<bool> {
    while event::poll(Duration::ZERO)? {
        if let Event::Key(key) = event::read()? {
            if key.kind != KeyEventKind::Press {
                continue;
            }
            let ctrl_c =
                key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
            if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn draw(frame: &mut Frame, view: &View) {
    let pool_lines = view.pools.len().max(1) as u16 + 3;
    let [title, pools, events] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(pool_lines),
        Constraint::Min(3),
    ])
    .areas(frame.area());
    let status = match (&view.error, view.refreshed) {
        (Some(e), _) => format!("error: {e}"),
        (None, false) => "asking for pools…".to_string(),
        (None, true) => format!("{} pools", view.pools.len()),
    };
    frame.render_widget(
        Paragraph::new(format!("flame top — {} — {status} — q quits", view.url)),
        title,
    );
    let cells: Vec<Vec<String>> = view.pools.iter().map(PoolRow::cells).collect();
    let widths: Vec<Constraint> = HEADER
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let widest = cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0);
            Constraint::Length(widest.max(h.len()) as u16)
        })
        .collect();
    let table = Table::new(cells.into_iter().map(Row::new), widths)
        .header(Row::new(HEADER).style(Style::new().add_modifier(Modifier::BOLD)))
        .column_spacing(2)
        .block(Block::bordered().title(" pools "));
    frame.render_widget(table, pools);
    let shown = events.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = view
        .events
        .iter()
        .take(shown)
        .map(|l| Line::from(l.as_str()))
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" events (newest first) ")),
        events,
    );
}
