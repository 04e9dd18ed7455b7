//! The one way tests write an invsync configuration file: databases, pipelines, repositories
//! and any further TOML, with every name and value quoted by the `toml` crate, so a URL with
//! quotes or backslashes still reads back as written.

use std::path::{Path, PathBuf};

/// A configuration file being assembled, section by section, in the order of the calls.
#[derive(Default, Clone)]
pub struct ConfigFile {
    text: String,
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(items: &[&str]) -> String {
    let items: Vec<String> = items.iter().map(|s| quoted(s)).collect();
    format!("[{}]", items.join(", "))
}

impl ConfigFile {
    pub fn new() -> ConfigFile {
        ConfigFile::default()
    }

    /// `[databases.NAME]` at `url`.
    pub fn database(mut self, name: &str, url: &str) -> ConfigFile {
        self.text += &format!("[databases.{name}]\nurl = {}\n\n", quoted(url));
        self
    }

    /// `[pipelines.NAME]` from `source` to `targets` over `tables` (names or patterns).
    pub fn pipeline(
        mut self,
        name: &str,
        source: &str,
        targets: &[&str],
        tables: &[&str],
    ) -> ConfigFile {
        self.text += &format!(
            "[pipelines.{name}]\nsource = {}\ntargets = {}\ntables = {}\n",
            quoted(source),
            list(targets),
            list(tables)
        );
        self
    }

    /// `[repositories.NAME]` at `url`; `keys` is the rest of its body (recipients,
    /// identity_file, passphrase, options), as TOML lines.
    pub fn repository(mut self, name: &str, url: &str, keys: &str) -> ConfigFile {
        self.text += &format!("[repositories.{name}]\nurl = {}\n", quoted(url));
        if !keys.is_empty() {
            self.text += keys;
            self.text += "\n";
        }
        self
    }

    /// Further TOML as is: keys of the section written last, or whole sections such as
    /// `[agent]` and `[[schedules]]`.
    pub fn toml(mut self, text: &str) -> ConfigFile {
        self.text += text;
        if !self.text.ends_with('\n') {
            self.text.push('\n');
        }
        self
    }

    /// Writes the file at `path` and returns the path.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.text).unwrap();
        path.to_path_buf()
    }
}
