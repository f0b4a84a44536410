//! [`RemoteError`]: the error type for remote functions, which any error
//! converts into with `?` and which travels back to the caller whole.

use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};

/// An error a remote function returns: any `std::error::Error` converts
/// into it with `?`, and it crosses to the caller with its message, the
/// messages of its chain of sources, and its kind.
///
/// ```
/// use flame_core::RemoteError;
///
/// // #[flame::remote]
/// async fn line_count(path: String) -> Result<usize, RemoteError> {
///     let text = tokio::fs::read_to_string(&path).await?; // an io::Error
///     let limit: usize = "1000".parse()?;                  // a ParseIntError
///     Ok(text.lines().count().min(limit))
/// }
/// ```
///
/// The caller gets it inside `Ok(..)` of the call, as any result of the
/// function: `flame::call!(pool, line_count(p)).await??` works in a
/// function returning `Result<_, Box<dyn std::error::Error + Send + Sync>>`,
/// `std::io::Result` (the remote I/O error's kind is kept) or, with the
/// cargo feature `anyhow`, `anyhow::Result`.
///
/// Like `anyhow::Error`, it does not implement `std::error::Error` itself
/// (that would overlap with converting every error into it); it converts
/// into a boxed one, and [`RemoteError::into_std`] gives one whose
/// `source()` chain holds the remote sources.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    message: String,
    kind: String,
    sources: Vec<String>,
}

impl RemoteError {
    /// An error with this message and the kind `"message"`.
    pub fn msg(message: impl fmt::Display) -> RemoteError {
        RemoteError {
            message: message.to_string(),
            kind: "message".to_string(),
            sources: Vec::new(),
        }
    }

    /// The error's own message (its `Display` on the runner).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// What kind of error it was: for an `std::io::Error`, the name of its
    /// [`io::ErrorKind`] (`"NotFound"`, ...; see [`RemoteError::io_kind`]);
    /// for any other error, the Rust type name of the error converted
    /// (`"core::num::error::ParseIntError"`); `"message"` for
    /// [`RemoteError::msg`].
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The messages of the error's sources, outermost first.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// The [`io::ErrorKind`] of an error that was an `std::io::Error` on
    /// the runner, so that the caller can tell `NotFound` from
    /// `PermissionDenied` as it would locally.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        io_kind_named(&self.kind)
    }

    /// An `std::error::Error` with this message, whose `source()` chain
    /// holds the sources' messages.
    pub fn into_std(self) -> impl std::error::Error + Send + Sync + 'static {
        Chain::from(self)
    }
}

impl<E: std::error::Error + 'static> From<E> for RemoteError {
    fn from(error: E) -> RemoteError {
        let any: &(dyn std::error::Error + 'static) = &error;
        let kind = match any.downcast_ref::<io::Error>() {
            Some(io) => format!("{:?}", io.kind()),
            None => std::any::type_name::<E>().to_string(),
        };
        let mut sources = Vec::new();
        let mut next = error.source();
        while let Some(source) = next {
            sources.push(source.to_string());
            next = source.source();
        }
        RemoteError {
            message: error.to_string(),
            kind,
            sources,
        }
    }
}

impl fmt::Display for RemoteError {
    /// The message; with `{:#}`, followed by its sources' messages, each
    /// after `": "` (as `anyhow` prints a chain).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if f.alternate() {
            for source in &self.sources {
                write!(f, ": {source}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteError")
            .field("message", &self.message)
            .field("kind", &self.kind)
            .field("sources", &self.sources)
            .finish()
    }
}

impl From<RemoteError> for Box<dyn std::error::Error + Send + Sync + 'static> {
    fn from(error: RemoteError) -> Self {
        Box::new(Chain::from(error))
    }
}

impl From<RemoteError> for Box<dyn std::error::Error + 'static> {
    fn from(error: RemoteError) -> Self {
        Box::new(Chain::from(error))
    }
}

/// `?` from a `RemoteError` in a function returning `anyhow::Result`
/// (cargo feature `anyhow`); the sources become the anyhow error's chain.
#[cfg(feature = "anyhow")]
impl From<RemoteError> for anyhow::Error {
    fn from(error: RemoteError) -> anyhow::Error {
        anyhow::Error::new(Chain::from(error))
    }
}

impl From<RemoteError> for io::Error {
    /// An `io::Error` of the remote error's I/O kind (`Other` when it was
    /// no I/O error), with the whole error as its inner error.
    fn from(error: RemoteError) -> io::Error {
        let kind = error.io_kind().unwrap_or(io::ErrorKind::Other);
        io::Error::new(kind, Chain::from(error))
    }
}

/// A [`RemoteError`] as an `std::error::Error`: one link per message.
#[derive(Debug)]
struct Chain {
    message: String,
    source: Option<Box<Chain>>,
}

impl From<RemoteError> for Chain {
    fn from(error: RemoteError) -> Chain {
        let source = error
            .sources
            .into_iter()
            .rev()
            .fold(None, |inner, message| {
                Some(Box::new(Chain {
                    message,
                    source: inner,
                }))
            });
        Chain {
            message: error.message,
            source,
        }
    }
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Chain {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

/// The stable `io::ErrorKind`s, by their `Debug` names.
fn io_kind_named(name: &str) -> Option<io::ErrorKind> {
    use io::ErrorKind::*;
    let kinds = [
        NotFound,
        PermissionDenied,
        ConnectionRefused,
        ConnectionReset,
        HostUnreachable,
        NetworkUnreachable,
        ConnectionAborted,
        NotConnected,
        AddrInUse,
        AddrNotAvailable,
        NetworkDown,
        BrokenPipe,
        AlreadyExists,
        WouldBlock,
        NotADirectory,
        IsADirectory,
        DirectoryNotEmpty,
        ReadOnlyFilesystem,
        StaleNetworkFileHandle,
        InvalidInput,
        InvalidData,
        TimedOut,
        WriteZero,
        StorageFull,
        NotSeekable,
        QuotaExceeded,
        FileTooLarge,
        ResourceBusy,
        ExecutableFileBusy,
        Deadlock,
        CrossesDevices,
        TooManyLinks,
        InvalidFilename,
        ArgumentListTooLong,
        Interrupted,
        Unsupported,
        UnexpectedEof,
        OutOfMemory,
        Other,
    ];
    kinds.into_iter().find(|k| format!("{k:?}") == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("cannot save the thumbnail")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn fails() -> Result<(), RemoteError> {
        std::fs::read("/nonexistent/flame/file")?;
        Ok(())
    }

    #[test]
    fn an_io_error_keeps_its_message_and_kind_across_the_wire() {
        let error = fails().unwrap_err();
        let bytes = crate::codec::encode(&error).unwrap();
        let back: RemoteError = crate::codec::decode(&bytes).unwrap();
        assert_eq!(back, error);
        assert_eq!(back.kind(), "NotFound");
        assert_eq!(back.io_kind(), Some(io::ErrorKind::NotFound));
        assert!(back.message().contains("No such file"), "{back}");
        let io: io::Error = back.into();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn the_chain_of_sources_is_kept_and_printed_with_alternate() {
        let inner = io::Error::new(io::ErrorKind::StorageFull, "disk full");
        let error = RemoteError::from(Outer(inner));
        assert_eq!(error.sources(), ["disk full"]);
        assert!(error.kind().ends_with("Outer"), "{}", error.kind());
        assert_eq!(error.io_kind(), None);
        assert_eq!(error.to_string(), "cannot save the thumbnail");
        assert_eq!(format!("{error:#}"), "cannot save the thumbnail: disk full");
        let boxed: Box<dyn std::error::Error + Send + Sync> = error.into();
        assert_eq!(boxed.to_string(), "cannot save the thumbnail");
        assert_eq!(boxed.source().unwrap().to_string(), "disk full");
        assert!(boxed.source().unwrap().source().is_none());
    }

    #[test]
    fn other_errors_and_messages() {
        let parse = "x".parse::<u32>().unwrap_err();
        let error = RemoteError::from(parse);
        assert!(error.kind().contains("ParseIntError"), "{}", error.kind());
        let msg = RemoteError::msg("no frames");
        assert_eq!((msg.message(), msg.kind()), ("no frames", "message"));
        assert!(msg.sources().is_empty());
    }
}
