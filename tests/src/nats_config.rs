//! Editing the shipped least-privilege nats-server configuration
//! (`deploy/nats/least-privilege.conf`) for tests that take a permission
//! away.

/// The shipped configuration file.
pub const LEAST_PRIVILEGE_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/nats/least-privilege.conf"
);

/// `config` without `line` (compared trimmed, quotes included) in the
/// `list` (`publish` or `subscribe`) of `section` (`PARENT_PERMISSIONS`,
/// ...). Panics when the line is not there.
pub fn without_line(config: &str, section: &str, list: &str, line: &str) -> String {
    let wanted = format!("\"{line}\"");
    let mut out = Vec::new();
    let (mut in_section, mut in_list, mut removed) = (false, false, false);
    for l in config.lines() {
        let t = l.trim();
        if t.starts_with(&format!("{section}:")) {
            in_section = true;
        } else if in_section && t.starts_with(&format!("{list}:")) {
            in_list = true;
        } else if in_list && t == "}" {
            in_list = false;
            in_section = false;
        }
        if in_list && !removed && t == wanted {
            removed = true;
            continue;
        }
        out.push(l);
    }
    assert!(removed, "{line} not found in {section}.{list}");
    out.join("\n")
}
