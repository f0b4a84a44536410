//! Tests of the errors: they stay `Clone` and keep their source.

use super::*;
use std::error::Error as _;

#[test]
fn errors_stay_clone_and_keep_their_source() {
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    let err = Error::nats("cannot subscribe", io);
    let copy = err.clone();
    assert_eq!(copy.to_string(), "cannot subscribe: refused");
    let source = copy.source().expect("a source");
    assert_eq!(source.to_string(), "refused");
    let boot = Error::boot_failed("p", "machine failed: bad image");
    assert!(boot.to_string().contains("bad image"));
    assert!(boot.source().is_some());
    assert_eq!(boot.kind(), ErrorKind::BootFailed);
    assert_eq!(boot.kind().as_str(), "boot_failed");
    assert_eq!(
        Error::PoolClosed("p".into()).kind().to_string(),
        "pool_closed"
    );
    assert!(Error::Config("x".into()).kind().is_setup());
    assert!(!boot.kind().is_setup());
}
