//! The database layer is the one place with SQL: every statement the server runs against
//! PostHog's tables is in `src/db/` (the graphile job queue, which owns its schema, keeps its own
//! in `src/jobs/`). This test fails when SQL appears in any other source file.

use std::path::{Path, PathBuf};

/// Where SQL may live, relative to `src/`.
const ALLOWED: &[&str] = &["db/", "jobs/graphile.rs", "jobs/migrations.rs"];

/// Marks of a statement or of running one: the sqlx query functions, and the clauses that name a
/// table (every statement against PostHog's tables has one, on some line).
fn sql_marks(line: &str) -> Option<&'static str> {
    let code = line.split("//").next().unwrap_or("");
    for mark in ["sqlx::query", "query_as(", "query_scalar(", "QueryBuilder", "query_as::<", "query_scalar::<"] {
        if code.contains(mark) {
            return Some(mark);
        }
    }
    ["INSERT INTO ", "DELETE FROM ", "UPDATE posthog_", "FROM posthog_", "JOIN posthog_", "FROM ee_", "FROM person_"]
        .into_iter()
        .find(|keyword| code.contains(keyword))
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn sql_lives_only_in_the_db_module() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 50, "found only {} source files under {}", files.len(), src.display());
    let mut offenders = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap_or(&file).to_string_lossy().replace('\\', "/");
        if ALLOWED.iter().any(|allowed| relative.starts_with(allowed)) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for (number, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            if let Some(mark) = sql_marks(line) {
                offenders.push(format!("src/{relative}:{}: `{mark}` in {}", number + 1, line.trim()));
            }
        }
    }
    assert!(offenders.is_empty(), "SQL outside src/db/ (move it into a db function):\n{}", offenders.join("\n"));
}

#[test]
fn the_check_sees_sql() {
    assert!(sql_marks(r#"    sqlx::query("SELECT 1").execute(&pool)"#).is_some());
    assert!(sql_marks(r#"        "INSERT INTO posthog_event (created_at) VALUES ($1)","#).is_some());
    assert!(sql_marks(r#"    let x = "SELECT name FROM posthog_team";"#).is_some());
    assert!(sql_marks("         FROM posthog_team").is_some());
    assert!(sql_marks(r#"    warn!("ClickHouse did not answer SELECT 1");"#).is_none());
    assert!(sql_marks("    // SELECT name FROM posthog_team in a comment").is_none());
    assert!(sql_marks("    let selected = items.iter().map(select);").is_none());
}
