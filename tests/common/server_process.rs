//! The `plugin-server` binary run as a process: its environment is exactly what a test gives it,
//! and a running server's stdout and stderr lines are collected for assertions.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BINARY: &str = env!("CARGO_BIN_EXE_plugin-server");

pub fn command(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BINARY);
    command.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    // The engine of scripts/test's pass (`JS_ENGINE`), unless the test sets one.
    if let Ok(engine) = std::env::var("JS_ENGINE") {
        command.env("JS_ENGINE", engine);
    }
    // Servers run side by side in the suite: no HTTP listener on the fixed default port (6738)
    // unless a test asks for one.
    if !env.iter().any(|(key, _)| *key == "HTTP_SERVER_PORT") {
        command.env("HTTP_SERVER_PORT", "0");
    }
    // The locks of this test database's servers only (see `TestDb::config`), unless the test
    // sets a prefix or runs the server without a database URL.
    let database = env.iter().find(|(key, _)| *key == "DATABASE_URL").and_then(|(_, url)| url.rsplit('/').next());
    if let (Some(database), false) = (database, env.iter().any(|(key, _)| *key == "REDIS_LOCK_PREFIX")) {
        command.env("REDIS_LOCK_PREFIX", format!("{database}:"));
    }
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(env).args(args).output().expect("run plugin-server")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A running server whose stdout lines are collected in the background.
pub struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Server {
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = command(env).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
        let (sender, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = sender.send(line);
                }
            });
        }
        Server { child, lines, seen: Vec::new() }
    }

    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> bool {
        if self.seen.iter().any(|line| line.contains(needle)) {
            return true;
        }
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// The process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).expect("send signal");
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn output(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
