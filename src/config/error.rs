//! Config errors that point at the file, line, column and key, and say what is allowed.

use std::fmt;

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as named on the command line.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// The dotted key, like `routes[1].upstream`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Every error found in one config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Turns byte offsets in one file's text into line and column.
pub(crate) struct Locator<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl Locator<'_> {
    /// Line and column (both 1-based) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    /// An error at a byte offset.
    pub fn error(
        &self,
        offset: usize,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = self.line_col(offset);
        ConfigError {
            file: self.file.to_owned(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        }
    }

    /// The dotted key whose name or value covers `offset`, innermost first.
    pub fn key_at(&self, offset: usize) -> Option<String> {
        let doc = toml_edit::ImDocument::parse(self.text).ok()?;
        let mut best: Option<(usize, String)> = None;
        walk_table(doc.as_table(), String::new(), offset, &mut best);
        best.map(|(_, k)| k)
    }
}

fn consider(
    span: Option<std::ops::Range<usize>>,
    offset: usize,
    path: &str,
    best: &mut Option<(usize, String)>,
) {
    if let Some(r) = span
        && r.start <= offset
        && offset < r.end.max(r.start + 1)
    {
        let width = r.end - r.start;
        if best.as_ref().is_none_or(|(w, _)| width <= *w) {
            *best = Some((width, path.to_owned()));
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn walk_table(
    t: &toml_edit::Table,
    prefix: String,
    offset: usize,
    best: &mut Option<(usize, String)>,
) {
    for (k, item) in t.iter() {
        let path = join(&prefix, k);
        if let Some((key, _)) = t.get_key_value(k) {
            consider(key.span(), offset, &path, best);
        }
        walk_item(item, path, offset, best);
    }
}

fn walk_item(
    item: &toml_edit::Item,
    path: String,
    offset: usize,
    best: &mut Option<(usize, String)>,
) {
    match item {
        toml_edit::Item::Value(v) => walk_value(v, path, offset, best),
        toml_edit::Item::Table(t) => walk_table(t, path, offset, best),
        toml_edit::Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                walk_table(t, format!("{path}[{i}]"), offset, best);
            }
        }
        toml_edit::Item::None => {}
    }
}

fn walk_value(
    v: &toml_edit::Value,
    path: String,
    offset: usize,
    best: &mut Option<(usize, String)>,
) {
    consider(v.span(), offset, &path, best);
    match v {
        toml_edit::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                walk_value(v, format!("{path}[{i}]"), offset, best);
            }
        }
        toml_edit::Value::InlineTable(t) => {
            for (k, v) in t.iter() {
                let p = join(&path, k);
                if let Some((key, _)) = t.get_key_value(k) {
                    consider(key.span(), offset, &p, best);
                }
                walk_value(v, p, offset, best);
            }
        }
        _ => {}
    }
}
