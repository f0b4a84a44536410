//! The size of a runner Machine ([`Guest`]), checked against the sizes Fly
//! offers, with defaults from the machine the parent runs on.

use flame_core::Error;
use serde::Serialize;

/// CPU counts Fly offers per kind: shared 1, 2, 4, 8; performance also 16.
const SHARED_CPUS: [u32; 4] = [1, 2, 4, 8];
const PERFORMANCE_CPUS: [u32; 5] = [1, 2, 4, 8, 16];

/// Size of a runner Machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Guest {
    /// `shared` or `performance`.
    pub cpu_kind: String,
    /// Number of CPUs.
    pub cpus: u32,
    /// Memory in MB, a multiple of 256.
    pub memory_mb: u32,
    /// GPU model, e.g. `a100-pcie-40gb`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_kind: Option<String>,
    /// Number of GPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
}

/// Checks a guest against the sizes Fly offers, filling in the defaults:
/// unset CPUs are this machine's count rounded down to an offered one, and
/// unset memory is 4096 MB brought within what those CPUs allow. Settings
/// given explicitly are checked, never changed.
pub(crate) fn sized(mut guest: Guest, cpus_set: bool, memory_set: bool) -> Result<Guest, Error> {
    let bad = |msg: String| Err(Error::Config(format!("Fly backend: {msg}")));
    let (offered, per_cpu): (&[u32], (u32, u32)) = match guest.cpu_kind.as_str() {
        "shared" => (&SHARED_CPUS, (256, 2048)),
        "performance" => (&PERFORMANCE_CPUS, (2048, 8192)),
        other => {
            return bad(format!(
                "cpu_kind must be `shared` or `performance`, not `{other}`"
            ))
        }
    };
    if !cpus_set {
        guest.cpus = offered
            .iter()
            .copied()
            .filter(|&n| n <= guest.cpus.max(1))
            .max()
            .unwrap_or(1);
    }
    if !offered.contains(&guest.cpus) {
        return bad(format!(
            "{} CPUs are not offered for cpu_kind `{}`; choose one of {offered:?}",
            guest.cpus, guest.cpu_kind
        ));
    }
    let (least, most) = (per_cpu.0 * guest.cpus, per_cpu.1 * guest.cpus);
    if !memory_set {
        guest.memory_mb = guest.memory_mb.clamp(least, most);
    }
    if guest.memory_mb == 0 || !guest.memory_mb.is_multiple_of(256) {
        return bad(format!(
            "memory_mb must be a multiple of 256, not {}",
            guest.memory_mb
        ));
    }
    if !(least..=most).contains(&guest.memory_mb) {
        return bad(format!(
            "memory_mb {} is outside what {} {} CPU(s) allow: {least} to {most}",
            guest.memory_mb, guest.cpus, guest.cpu_kind
        ));
    }
    Ok(guest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(kind: &str, cpus: u32, memory_mb: u32) -> Guest {
        Guest {
            cpu_kind: kind.into(),
            cpus,
            memory_mb,
            gpu_kind: None,
            gpus: None,
        }
    }

    #[test]
    fn default_sizes_are_ones_fly_offers() {
        // Defaults: cores rounded down to an offered count, memory within
        // what those CPUs allow.
        let g = sized(guest("performance", 12, 4096), false, false).unwrap();
        assert_eq!((g.cpus, g.memory_mb), (8, 16384));
        let g = sized(guest("performance", 2, 4096), false, false).unwrap();
        assert_eq!((g.cpus, g.memory_mb), (2, 4096));
        let g = sized(guest("shared", 32, 4096), false, false).unwrap();
        assert_eq!((g.cpus, g.memory_mb), (8, 4096));
        let g = sized(guest("shared", 1, 4096), false, false).unwrap();
        assert_eq!((g.cpus, g.memory_mb), (1, 2048));
        // Explicit settings are checked, not changed.
        let err = sized(guest("performance", 3, 8192), true, true).unwrap_err();
        assert!(
            err.to_string().contains("choose one of [1, 2, 4, 8, 16]"),
            "{err}"
        );
        let err = sized(guest("shared", 1, 4096), true, true).unwrap_err();
        assert!(err.to_string().contains("256 to 2048"), "{err}");
        let err = sized(guest("performance", 4, 4096), true, true).unwrap_err();
        assert!(err.to_string().contains("8192 to 32768"), "{err}");
        let err = sized(guest("gpu", 1, 4096), true, true).unwrap_err();
        assert!(err.to_string().contains("cpu_kind"), "{err}");
    }
}
