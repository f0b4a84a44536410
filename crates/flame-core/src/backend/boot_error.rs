//! How a backend says whether a failed boot is worth trying again.

use std::fmt;

use crate::BoxError;

/// A failed boot, marked permanent or transient.
///
/// A backend returns it (boxed) from [`super::Backend::boot`] to tell the
/// pool what to do next:
///
/// - **permanent** (bad credentials, a refused permission, an invalid
///   configuration, an image that cannot start): booting again would fail
///   the same way. The pool fails every caller waiting for a runner at once
///   with `Error::BootFailed` carrying this error, and boots again only for
///   a call that comes after its boot cooldown.
/// - **transient** (rate limited, no capacity right now, the platform's own
///   5xx, an unreachable API): the pool tries again with exponential
///   backoff and jitter while callers wait.
///
/// An error that is not a `BootError` (anywhere in its chain of sources)
/// counts as transient.
///
/// ```
/// use flame_core::backend::BootError;
///
/// let e = BootError::permanent("Machines API answered 401: unauthorized");
/// assert!(e.is_permanent());
/// let boxed: flame_core::BoxError = Box::new(e);
/// assert!(BootError::is_permanent_error(boxed.as_ref()));
/// ```
pub struct BootError {
    permanent: bool,
    source: BoxError,
}

impl BootError {
    /// A failure that booting again would meet too.
    pub fn permanent(source: impl Into<BoxError>) -> BootError {
        BootError {
            permanent: true,
            source: source.into(),
        }
    }

    /// A failure that may pass: the pool tries again with backoff.
    pub fn transient(source: impl Into<BoxError>) -> BootError {
        BootError {
            permanent: false,
            source: source.into(),
        }
    }

    /// True when booting again would fail the same way.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// True when `error`, or any error in its chain of sources, is a
    /// permanent [`BootError`].
    pub fn is_permanent_error(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(boot) = e.downcast_ref::<BootError>() {
                return boot.permanent;
            }
            next = e.source();
        }
        false
    }
}

// Shows as the error it wraps: the pool's `BootFailed` quotes it.
impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl fmt::Debug for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootError")
            .field("permanent", &self.permanent)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for BootError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(BootError);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "outer")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn permanence_is_found_in_the_chain_and_shows_as_its_source() {
        let wrapped = Outer(BootError::permanent("no such image"));
        assert!(BootError::is_permanent_error(&wrapped));
        assert_eq!(wrapped.0.to_string(), "no such image");
        let transient = BootError::transient("429");
        assert!(!BootError::is_permanent_error(&transient));
        let plain = std::io::Error::other("refused");
        assert!(!BootError::is_permanent_error(&plain));
    }
}
