//! Where a plugin's code comes from, in the reference's priority order: a local folder
//! (`url` = `file:<path>` under `BASE_DIR`, with `plugin.json`), the `archive` column (zip or
//! tar.gz), or the `source` column (`plugin_type = 'source'`). Also the plugin.json config schema
//! defaults that fill in missing `meta.config` keys. Failures carry the reference's messages; the
//! caller records them and skips the plugin (they are not retried).

use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use super::archive::file_from_archive;
use super::errors::PluginFailure;
use super::rows::Plugin;

/// Code ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginCode {
    pub code: String,
    /// How the "🔌 Loaded …" line names the plugin.
    pub log_info: String,
    /// The `config` schema from plugin.json, when the plugin ships one.
    pub json_config_schema: Option<Value>,
}

/// Finds the plugin's code.
pub fn load_code(base_dir: &str, plugin: &Plugin) -> Result<PluginCode, PluginFailure> {
    let digest = plugin.digest(None);
    let row = &plugin.row;
    if let Some(local) = row.url.as_deref().and_then(|url| url.strip_prefix("file:")) {
        return load_local(base_dir, local, &digest);
    }
    if let Some(archive) = &row.archive {
        return load_archive(archive, &digest);
    }
    if row.plugin_type.as_deref() == Some("source") {
        if let Some(source) = row.source.as_ref().filter(|source| !source.is_empty()) {
            return Ok(PluginCode { code: source.clone(), log_info: digest, json_config_schema: None });
        }
    }
    Err(PluginFailure::Message(format!("Tried using undownloaded remote {digest}, which is not supported!")))
}

/// `plugin.json`'s `main` when it is a non-empty string.
fn main_file(plugin_json: &Value) -> Option<String> {
    plugin_json.get("main").and_then(Value::as_str).filter(|main| !main.is_empty()).map(str::to_string)
}

fn load_local(base_dir: &str, local: &str, digest: &str) -> Result<PluginCode, PluginFailure> {
    let folder = resolve_path(base_dir, local);
    let config_path = folder.join("plugin.json");
    let mut plugin_json = Value::Object(Map::new());
    if config_path.exists() {
        let parsed = std::fs::read(&config_path).ok().and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
        match parsed {
            Some(json) => plugin_json = json,
            None => {
                return Err(PluginFailure::Message(format!(
                    "Could not load posthog config at \"{}\" for {digest}",
                    config_path.display()
                )))
            }
        }
    }
    let main = main_file(&plugin_json);
    if main.is_none() && !folder.join("index.js").exists() {
        return Err(PluginFailure::Message(format!("No \"main\" config key or \"index.js\" file found for {digest}")));
    }
    let code_path = resolve_path(&folder.to_string_lossy(), main.as_deref().unwrap_or("index.js"));
    let code = std::fs::read(&code_path)
        .map_err(|err| PluginFailure::named("Error", format!("{err}, open '{}'", code_path.display())))?;
    Ok(PluginCode {
        code: String::from_utf8_lossy(&code).into_owned(),
        log_info: format!("local {digest} from \"{}\"!", folder.display()),
        json_config_schema: plugin_json.get("config").cloned(),
    })
}

fn load_archive(archive: &[u8], digest: &str) -> Result<PluginCode, PluginFailure> {
    let unreadable = |err: super::archive::ArchiveError| PluginFailure::named("Error", err.to_string());
    let mut plugin_json = Value::Object(Map::new());
    if let Some(json) = file_from_archive(archive, "plugin.json").map_err(unreadable)? {
        plugin_json = serde_json::from_str(&json)
            .map_err(|_| PluginFailure::Message(format!("Can not load plugin.json for {digest}")))?;
    }
    let main = main_file(&plugin_json).unwrap_or_else(|| "index.js".to_string());
    match file_from_archive(archive, &main).map_err(unreadable)? {
        Some(code) => Ok(PluginCode {
            code,
            log_info: digest.to_string(),
            json_config_schema: plugin_json.get("config").cloned(),
        }),
        None => Err(PluginFailure::Message(format!("Could not load index.js for {digest}!"))),
    }
}

/// Node's `path.resolve(base, rest)`: absolute (against the working directory) and normalized.
fn resolve_path(base: &str, rest: &str) -> PathBuf {
    let joined = Path::new(base).join(rest);
    let absolute = if joined.is_absolute() {
        joined
    } else {
        std::env::current_dir().map(|cwd| cwd.join(&joined)).unwrap_or(joined)
    };
    let mut normalized = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                normalized.pop();
            }
            Component::CurDir => {}
            other => normalized.push(other.as_os_str()),
        }
    }
    normalized
}

/// Fills keys missing from `config` with the `default` of their schema entry. The schema is an
/// object keyed by config key (`posthog_plugin.config_schema`) or an array of entries with a
/// `key` (plugin.json's `config`). Keys the config has, even as `null`/empty, are kept.
pub fn apply_schema_defaults(config: &mut Map<String, Value>, schema: &Value) {
    let entries: Vec<(String, &Value)> = match schema {
        Value::Object(map) => map.iter().map(|(key, entry)| (key.clone(), entry)).collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(|entry| entry.get("key").and_then(Value::as_str).map(|key| (key.to_string(), entry)))
            .collect(),
        _ => Vec::new(),
    };
    for (key, entry) in entries {
        if let Some(default) = entry.get("default").filter(|default| !default.is_null()) {
            if !config.contains_key(&key) {
                config.insert(key, default.clone());
            }
        }
    }
}

/// Whether a schema declares anything (an empty object or array does not).
pub fn schema_is_empty(schema: &Value) -> bool {
    match schema {
        Value::Object(map) => map.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_fill_only_missing_keys() {
        let mut config = json!({"a": "set", "b": null}).as_object().unwrap().clone();
        apply_schema_defaults(&mut config, &json!({"a": {"default": "x"}, "b": {"default": "y"}, "c": {"default": 3}}));
        assert_eq!(Value::Object(config.clone()), json!({"a": "set", "b": null, "c": 3}));
        apply_schema_defaults(&mut config, &json!([{"key": "d", "default": "dd"}, {"key": "e"}]));
        assert_eq!(config["d"], "dd");
        assert!(!config.contains_key("e"));
    }

    #[test]
    fn paths_resolve_like_node() {
        assert_eq!(resolve_path("/base", "../x/./y"), PathBuf::from("/x/y"));
        assert_eq!(resolve_path("/base", "/abs/plugin"), PathBuf::from("/abs/plugin"));
    }
}
