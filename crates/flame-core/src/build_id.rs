//! Build identity: parent and runners must run the same build.

use std::sync::OnceLock;

/// Environment variable that overrides the computed build id, e.g. with a
/// commit hash from your deploy pipeline.
pub const BUILD_ID_ENV: &str = "FLAME_BUILD_ID";

/// This process's build id.
///
/// `FLAME_BUILD_ID` when set; otherwise a hash of the running executable, so
/// two processes agree exactly when they run the same binary. Computed once.
pub fn build_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        if let Ok(id) = std::env::var(BUILD_ID_ENV) {
            if !id.is_empty() {
                return id;
            }
        }
        executable_hash().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read own executable; using the package version as build id");
            format!("v{}", env!("CARGO_PKG_VERSION"))
        })
    })
}

fn executable_hash() -> std::io::Result<String> {
    let path = std::env::current_exe()?;
    let bytes = std::fs::read(path)?;
    Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)))
}
