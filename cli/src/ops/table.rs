//! Plain text tables in the seed's (`stackato services`) style:
//!
//! ```text
//! +---------------+---------+
//! | Service       | Version |
//! +---------------+---------+
//! | elasticsearch | 1.0     |
//! +---------------+---------+
//! ```

use super::progress::sanitize;

/// A table: a header row and data rows of cells.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are dropped. Cell
    /// text is cleaned of control characters (it comes from the broker).
    pub fn row<S: AsRef<str>>(&mut self, cells: &[S]) {
        let mut row: Vec<String> = cells
            .iter()
            .take(self.headers.len())
            .map(|c| sanitize(c.as_ref()))
            .collect();
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    /// Renders the table, each line ending in a newline.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain(std::iter::once(self.headers[i].chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let rule: String = {
            let mut s = String::from("+");
            for w in &widths {
                s.push_str(&"-".repeat(w + 2));
                s.push('+');
            }
            s.push('\n');
            s
        };
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (cell, w) in cells.iter().zip(&widths) {
                let pad = w - cell.chars().count();
                s.push(' ');
                s.push_str(cell);
                s.push_str(&" ".repeat(pad + 1));
                s.push('|');
            }
            s.push('\n');
            s
        };
        let mut out = rule.clone();
        out.push_str(&line(&self.headers));
        out.push_str(&rule);
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out.push_str(&rule);
        out
    }
}

/// A title line like the seed's `============== System Services ==============`.
pub fn banner(title: &str) -> String {
    let bar = "=".repeat(14);
    format!("{bar} {title} {bar}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_the_seed() {
        let mut t = Table::new(&["Service", "Version", "Description"]);
        t.row(&["elasticsearch", "1.0", "Elasticsearch full-text searching"]);
        t.row(&["harbor", "1.0"]);
        let want = "\
+---------------+---------+-----------------------------------+
| Service       | Version | Description                       |
+---------------+---------+-----------------------------------+
| elasticsearch | 1.0     | Elasticsearch full-text searching |
| harbor        | 1.0     |                                   |
+---------------+---------+-----------------------------------+
";
        assert_eq!(t.render(), want);
    }

    #[test]
    fn widths_count_characters_and_cells_are_cleaned() {
        let mut t = Table::new(&["A"]);
        t.row(&["é\u{1b}"]);
        assert_eq!(t.render().lines().nth(3), Some("| é  |"));
    }
}
