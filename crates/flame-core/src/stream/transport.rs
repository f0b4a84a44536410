//! How stream items move between parent and runner: the runtime's
//! [`StreamTransport`], and which one a [`Stream`](super::Stream) being
//! encoded or decoded uses (the current call's, else the process's).

use std::cell::RefCell;
use std::sync::Arc;

use crate::stream::items::{ItemSender, ItemSink, ItemSource};

/// Moves stream items between parent and runner. Implemented by the
/// runtime; backend authors never need it.
pub trait StreamTransport: Send + Sync + 'static {
    /// Offers `source` to one consumer; returns the address it is opened
    /// at. The items flow once a consumer opens it.
    fn produce(&self, source: ItemSource) -> String;
    /// Opens the stream offered at `address`.
    fn consume(&self, address: String) -> ItemSink;
    /// Waits for one stream to be offered at the returned address (by
    /// [`StreamTransport::offer`] on the other side), and forwards its
    /// items into `items`.
    fn sink(&self, items: ItemSender) -> String;
    /// Offers `source` to the sink at `sink_address`, whose owner opens it.
    fn offer(&self, sink_address: String, source: ItemSource);
}

thread_local! {
    static TRANSPORT: RefCell<Option<Arc<dyn StreamTransport>>> = const { RefCell::new(None) };
}

/// The transport of this process's flame connection, for streams and
/// channels used outside a call's encoding (a `Sender` sending a message
/// that holds another `Sender`, say).
static DEFAULT_TRANSPORT: std::sync::RwLock<Option<Arc<dyn StreamTransport>>> =
    std::sync::RwLock::new(None);

/// Makes `transport` the one used where no call is being encoded or
/// decoded. Used by the runtime when it connects.
pub fn set_default_transport(transport: Arc<dyn StreamTransport>) {
    *DEFAULT_TRANSPORT.write().unwrap() = Some(transport);
}

/// Runs `f` with `transport` as the current stream transport: encoding or
/// decoding a [`Stream`](super::Stream) inside `f` uses it. Used by the runtime.
pub fn with_transport<R>(transport: &Arc<dyn StreamTransport>, f: impl FnOnce() -> R) -> R {
    let previous = TRANSPORT.with(|t| t.replace(Some(transport.clone())));
    // Restored even if `f` panics (the runner catches panics and serves on).
    struct Restore(Option<Arc<dyn StreamTransport>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            TRANSPORT.with(|t| *t.borrow_mut() = previous);
        }
    }
    let _restore = Restore(previous);
    f()
}

pub(crate) fn current_transport() -> Option<Arc<dyn StreamTransport>> {
    TRANSPORT
        .with(|t| t.borrow().clone())
        .or_else(|| DEFAULT_TRANSPORT.read().unwrap().clone())
}
