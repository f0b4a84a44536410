//! Plain text tables: a header and rows, columns padded to their widest
//! cell, two spaces apart.

/// Lays out `header` and `rows` as lines (no trailing spaces).
pub(crate) fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            let pad = widths[i].saturating_sub(cell.chars().count());
            out.extend(std::iter::repeat_n(' ', pad));
        }
        out.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out.push('\n');
    out
}

/// The first `n` characters of an id, for narrow columns.
pub(crate) fn short(id: &str, n: usize) -> String {
    id.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["thumbs".to_string(), "2".to_string()],
            vec!["a".to_string(), "10".to_string()],
        ];
        assert_eq!(
            render(&["POOL", "RUNNERS"], &rows),
            "POOL    RUNNERS\nthumbs  2\na       10\n"
        );
        assert_eq!(render(&["POOL"], &[]), "POOL\n");
        assert_eq!(short("3f2a9c1e8b7d", 8), "3f2a9c1e");
    }
}
