//! The plugin dev loop through the real binary: `plugin-server plugin run|check`, on the example
//! plugin of the README (`examples/plugin-dev`) and the fixtures under `tests/data/plugin_dev`.
//! No database or Redis: the commands run with `DATABASE_URL`/`REDIS_URL` pointing nowhere.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_plugin-server");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn fixture(name: &str) -> PathBuf {
    repo("tests/data/plugin_dev").join(name)
}

fn plugin_command(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BINARY);
    command
        .arg("plugin")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // Nothing to connect to: the dev loop must not need it.
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .env_remove("NODE_ENV")
        .env_remove("TASK_TIMEOUT");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("the binary runs")
}

/// Runs `plugin run … --json` and returns the exit code and the report.
fn run_json(args: &[&str], env: &[(&str, &str)]) -> (i32, Value) {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.push("--json");
    let output = plugin_command(&all, env);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!("not JSON ({error}): {stdout}\nstderr: {}", String::from_utf8_lossy(&output.stderr))
    });
    (output.status.code().unwrap_or(-1), report)
}

fn steps(report: &Value) -> &Vec<Value> {
    report["steps"].as_array().expect("steps")
}

fn step<'a>(report: &'a Value, prefix: &str) -> &'a Value {
    steps(report)
        .iter()
        .find(|step| step["step"].as_str().is_some_and(|name| name.starts_with(prefix)))
        .unwrap_or_else(|| panic!("no step {prefix} in {report:#}"))
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn the_readme_example_runs_a_typescript_plugin_and_shows_its_writes() {
    let plugin = repo("examples/plugin-dev/hello-world");
    let events = repo("examples/plugin-dev/events.json");
    let (code, report) = run_json(&[path_str(&plugin), "--event", path_str(&events)], &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["plugin"]["name"], "Hello World");
    // plugin.json's default fills the config.
    assert_eq!(report["plugin"]["config"]["greeting"], "Hello, world!");

    let setup = step(&report, "load and setupPlugin");
    assert_eq!(setup["ok"], true);
    // Console calls reach the host asynchronously; each step waits for its lines (plugins/dev.rs).
    assert!(
        setup["logs"].as_array().unwrap().iter().any(|log| log["message"] == "set up with greeting \"Hello, world!\""),
        "{setup:#}"
    );
    assert!(setup["calls"][0]["heap_bytes"].as_i64().is_some_and(|bytes| bytes > 0), "{setup:#}");

    let first = step(&report, "event 1");
    let output = &first["output"];
    assert_eq!(output["properties"]["greeting"], "Hello, world!");
    assert_eq!(output["properties"]["events_seen"], 1);
    assert_eq!(output["properties"]["$current_url"], "https://example.com/");
    // Filled as the pipeline hands events to plugins.
    assert_eq!(output["team_id"], 2);
    assert!(output["uuid"].as_str().is_some_and(|uuid| uuid.len() == 36));
    assert!(output["now"].as_str().is_some_and(|now| !now.is_empty()));
    assert_eq!(output["properties"]["$plugins_succeeded"][0], "Hello World (1)");
    let functions: Vec<&str> =
        first["calls"].as_array().unwrap().iter().filter_map(|c| c["function"].as_str()).collect();
    assert_eq!(functions, ["processEvent", "onEvent"]);
    for call in first["calls"].as_array().unwrap() {
        assert!(call["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
        assert!(call["heap_bytes"].as_i64().is_some_and(|bytes| bytes > 0));
    }
    assert_eq!(first["cache_writes"][0]["operation"], "incr");
    assert_eq!(first["cache_writes"][0]["key"], "events_seen");
    assert_eq!(first["storage_writes"][0]["key"], "last_event");
    assert_eq!(first["storage_writes"][0]["value"], "$pageview");
    assert!(first["logs"].as_array().unwrap().iter().any(|log| log["message"] == "onEvent: $pageview from user-1"));

    let second = step(&report, "event 2");
    assert_eq!(second["output"]["properties"]["events_seen"], 2);
    assert_eq!(second["storage_writes"][0]["value"], "signed_up");
}

#[test]
fn text_output_shows_calls_logs_and_events() {
    let plugin = repo("examples/plugin-dev/hello-world");
    let events = repo("examples/plugin-dev/events.json");
    let output = plugin_command(&["run", path_str(&plugin), "--event", path_str(&events)], &[]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{text}");
    for expected in ["processEvent", "onEvent", "set up with greeting", "cache   incr events_seen = 1", "out: {", "OK"]
    {
        assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
    }
}

#[test]
fn a_throwing_plugin_fails_the_run_with_its_error() {
    let (code, report) = run_json(&[path_str(&fixture("throwing")), "--event", path_str(&fixture("events.json"))], &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);
    assert_eq!(step(&report, "event 1")["ok"], true);
    let failed = step(&report, "event 2");
    assert_eq!(failed["ok"], false);
    assert_eq!(failed["calls"][0]["ok"], false);
    assert_eq!(failed["errors"][0]["message"], "boom: cannot handle explode");
    assert!(failed["errors"][0]["stack"].as_str().is_some_and(|stack| stack.contains("index.ts")), "{failed:#}");
    // The event goes on as the server sends it on: unchanged, with the plugin listed as failed.
    assert_eq!(failed["output"]["properties"]["$plugins_failed"][0], "Throwing (1)");
    assert!(failed["logs"].as_array().unwrap().iter().any(|log| log["type"] == "ERROR"));

    let text =
        plugin_command(&["run", path_str(&fixture("throwing")), "--event", path_str(&fixture("events.json"))], &[]);
    assert_eq!(text.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&text.stdout).contains("boom: cannot handle explode"));
}

#[test]
fn a_failing_set_up_fails_the_run_before_any_event() {
    let (code, report) =
        run_json(&[path_str(&fixture("setup_fails")), "--event", path_str(&fixture("events.json"))], &[]);
    assert_eq!(code, 1, "{report:#}");
    let setup = step(&report, "load and setupPlugin");
    assert_eq!(setup["ok"], false);
    assert_eq!(setup["errors"][0]["message"], "no api key");
    assert!(setup["logs"].as_array().unwrap().iter().any(|log| log["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("Plugin failed to load") && m.ends_with("Retrying in 3 s."))));
    // No event runs on a plugin that did not load.
    assert_eq!(steps(&report).len(), 1);
}

#[test]
fn config_and_attachments_reach_the_plugin() {
    let attachment = format!("words={}", path_str(&fixture("config_attachment/words.txt")));
    let (code, report) = run_json(
        &[
            path_str(&fixture("config_attachment")),
            "--event",
            path_str(&fixture("events.json")),
            "--config",
            "label=given",
            "--attachment",
            &attachment,
        ],
        &[],
    );
    assert_eq!(code, 0, "{report:#}");
    let properties = &step(&report, "event 1")["output"]["properties"];
    // `label` given, `suffix` from plugin.json's default.
    assert_eq!(properties["label"], "given-default-suffix");
    assert_eq!(properties["words"], "alpha beta");
    assert_eq!(properties["words_file"], "words.txt");
}

#[test]
fn a_zip_archive_loads_as_the_server_loads_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let archive = dir.path().join("hello.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&archive).expect("zip file"));
    let options = zip::write::SimpleFileOptions::default();
    zip.add_directory("hello-world-main", options).expect("folder");
    for name in ["plugin.json", "index.ts"] {
        zip.start_file(format!("hello-world-main/{name}"), options).expect("entry");
        let contents = std::fs::read(repo("examples/plugin-dev/hello-world").join(name)).expect("example file");
        zip.write_all(&contents).expect("write");
    }
    zip.finish().expect("finish");
    let (code, report) =
        run_json(&[path_str(&archive), "--event", path_str(&repo("examples/plugin-dev/events.json"))], &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["plugin"]["name"], "Hello World");
    assert_eq!(step(&report, "event 1")["output"]["properties"]["greeting"], "Hello, world!");
}

#[test]
fn an_npm_tarball_loads_as_the_server_loads_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let archive = dir.path().join("hello.tgz");
    let file = std::fs::File::create(&archive).expect("tgz file");
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(file, flate2::Compression::default()));
    for name in ["plugin.json", "index.ts"] {
        tar.append_path_with_name(repo("examples/plugin-dev/hello-world").join(name), format!("package/{name}"))
            .expect("entry");
    }
    tar.into_inner().expect("tar").finish().expect("gzip");
    let (code, report) =
        run_json(&[path_str(&archive), "--event", path_str(&repo("examples/plugin-dev/events.json"))], &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(step(&report, "event 2")["output"]["properties"]["events_seen"], 2);
    let check = plugin_command(&["check", path_str(&archive)], &[]);
    assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stdout));
}

#[test]
fn fetch_is_refused_unless_allowed() {
    let (code, report) = run_json(&[path_str(&fixture("fetching")), "--event", path_str(&fixture("events.json"))], &[]);
    assert_eq!(code, 0, "{report:#}");
    let first = step(&report, "event 1");
    let error = first["output"]["properties"]["fetch_error"].as_str().unwrap_or_default();
    assert!(error.contains("--allow-fetch"), "{first:#}");
    assert!(
        first["logs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|log| log["message"].as_str().is_some_and(|m| m.starts_with("fetch refused"))),
        "{first:#}"
    );
    // Allowed: the request really goes out (nothing listens on port 9: connection refused).
    let (code, report) = run_json(
        &[path_str(&fixture("fetching")), "--event", path_str(&fixture("events.json")), "--allow-fetch"],
        &[("ALLOW_INTERNAL_IPS", "true")],
    );
    assert_eq!(code, 0, "{report:#}");
    let error =
        step(&report, "event 1")["output"]["properties"]["fetch_error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("ECONNREFUSED"), "{error}");
}

#[test]
fn a_spinning_plugin_is_stopped_by_task_timeout() {
    let started = std::time::Instant::now();
    let (code, report) = run_json(
        &[path_str(&fixture("spinning")), "--event", path_str(&fixture("events.json"))],
        &[("TASK_TIMEOUT", "1")],
    );
    assert_eq!(code, 1, "{report:#}");
    let first = step(&report, "event 1");
    // The reference's loop guard: a plain Error naming the loop.
    let message = first["errors"][0]["message"].as_str().unwrap_or_default();
    assert_eq!(message, "Script execution timed out after looping for 1 second on line 2:4", "{first:#}");
    assert_eq!(first["calls"][0]["ok"], false);
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "took {:?}", started.elapsed());
}

#[test]
fn a_plugin_over_the_memory_limit_fails_its_call() {
    let (code, report) =
        run_json(&[path_str(&fixture("memory_hog")), "--event", path_str(&fixture("events.json"))], &[]);
    assert_eq!(code, 1, "{report:#}");
    let first = step(&report, "event 1");
    assert_eq!(first["calls"][0]["ok"], false);
    assert_eq!(first["errors"][0]["message"], "out of memory", "{first:#}");
    // The VM is usable again for the next event (its heap was freed).
    assert!(step(&report, "event 2")["calls"][0]["heap_bytes"].as_i64().is_some_and(|bytes| bytes < 16 << 20));
}

#[test]
fn scheduled_tasks_run_with_their_writes() {
    let (code, report) = run_json(&[path_str(&fixture("tasks")), "--run-task", "runEveryMinute"], &[]);
    assert_eq!(code, 0, "{report:#}");
    let task = step(&report, "task runEveryMinute");
    assert_eq!(task["calls"][0]["function"], "runEveryMinute");
    assert_eq!(task["storage_writes"][0]["key"], "ran");
    assert_eq!(task["cache_writes"][0]["operation"], "lpush");
    assert_eq!(task["captured"][0]["event"], "task_ran");
    assert_eq!(report["plugin"]["capabilities"]["scheduled_tasks"][0], "runEveryMinute");
    // A task the plugin does not have fails the run.
    let (code, _) = run_json(&[path_str(&fixture("tasks")), "--run-task", "runEveryHour"], &[]);
    assert_eq!(code, 1);
}

#[test]
fn check_accepts_a_good_plugin() {
    let output = plugin_command(&["check", path_str(&repo("examples/plugin-dev/hello-world"))], &[]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.starts_with("OK: plugin Hello World"), "{text}");
}

#[test]
fn check_lists_every_problem_of_a_bad_plugin() {
    let output = plugin_command(&["check", path_str(&fixture("bad")), "--json"], &[]);
    assert_eq!(output.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let problems: Vec<&str> = report["problems"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let expected = [
        "\"name\" is missing",
        "default \"c\" is not one of the choices",
        "key \"mode\" appears twice",
        "unknown type \"number\"",
        "config[2]: \"key\" must be a non-empty string",
        "Cannot import 'fs'! This package is not provided by PostHog in plugins.",
    ];
    for text in expected {
        assert!(problems.iter().any(|problem| problem.contains(text)), "{text:?} not in {problems:#?}");
    }
    let missing_main = plugin_command(&["check", path_str(&fixture("no-such-plugin"))], &[]);
    assert_eq!(missing_main.status.code(), Some(1));
}
