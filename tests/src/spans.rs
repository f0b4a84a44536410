//! Captures the spans a process closes, with their fields, for tests of
//! trace joining: in the test process in memory, in a runner process as
//! JSON lines appended to the file named by [`SPAN_LOG_ENV`].

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Names the file a runner process appends its closed spans to.
pub const SPAN_LOG_ENV: &str = "FLAME_TEST_SPAN_LOG";

/// A closed span: its name and fields (values as text).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CapturedSpan {
    /// The span's name, e.g. `flame.call`.
    pub name: String,
    /// Its fields as recorded by the time it closed.
    pub fields: BTreeMap<String, String>,
}

impl CapturedSpan {
    /// A field's value.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// A layer keeping every span it sees close.
#[derive(Debug, Clone, Default)]
pub struct SpanLog {
    spans: Arc<Mutex<Vec<CapturedSpan>>>,
    file: Option<Arc<Mutex<std::fs::File>>>,
}

impl SpanLog {
    /// Keeps spans in memory.
    pub fn in_memory() -> SpanLog {
        SpanLog::default()
    }

    /// Also appends them to the file [`SPAN_LOG_ENV`] names, if set.
    pub fn from_env() -> SpanLog {
        let file = std::env::var_os(SPAN_LOG_ENV).and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        });
        SpanLog {
            spans: Arc::default(),
            file: file.map(|f| Arc::new(Mutex::new(f))),
        }
    }

    /// The spans closed so far, named `name`.
    pub fn named(&self, name: &str) -> Vec<CapturedSpan> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    /// The spans a runner process wrote to `path`, named `name`.
    pub fn read_file(path: &std::path::Path, name: &str) -> Vec<CapturedSpan> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<CapturedSpan>(l).ok())
            .filter(|s| s.name == name)
            .collect()
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
}

impl<S> Layer<S> for SpanLog
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(fields);
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let fields = span.extensions_mut().remove::<Fields>().unwrap_or_default();
        let captured = CapturedSpan {
            name: span.name().to_string(),
            fields: fields.0,
        };
        if let Some(file) = &self.file {
            if let Ok(line) = serde_json::to_string(&captured) {
                let _ = writeln!(file.lock().unwrap(), "{line}");
            }
        }
        self.spans.lock().unwrap().push(captured);
    }
}
