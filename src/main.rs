//! The `plugin-server` binary: picks the mode from the command line (the reference's precedence:
//! help, version, healthcheck, migrate, idle, serve; or `plugin run|check`, the plugin dev loop in
//! `plugins::dev`, which turns its own errors into exit codes), builds the configuration from the
//! environment and runs the mode. This is the only other place that turns errors into exit codes.

use clap::Parser;
use plugin_server::config::{format_help, Config, NodeEnv};
use plugin_server::health::{healthcheck, HealthStatus, PING_KEY};
use plugin_server::migrate::MigrateOutcome;
use plugin_server::{lifecycle, logging, server, VERSION};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// mimalloc instead of glibc's malloc: the event path allocates many small short-lived values
/// (JSON maps, strings) from several threads, where glibc's malloc was a tenth of the server's
/// CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Flags are looked for anywhere on the command line and unknown arguments are ignored, as the
/// reference does (`argv.includes`).
#[derive(Parser, Debug)]
#[command(name = "plugin-server", disable_help_flag = true, disable_version_flag = true)]
struct Cli {
    /// Show the supported environment variables.
    #[arg(short = 'h', long = "help")]
    help: bool,
    /// Show the version.
    #[arg(short = 'v', long = "version")]
    version: bool,
    /// Exit 0 when a server's health ping is in Redis, 1 otherwise.
    #[arg(long)]
    healthcheck: bool,
    /// Run the job queue migrations and exit.
    #[arg(long)]
    migrate: bool,
    /// Stay up doing nothing (same as PLUGIN_SERVER_IDLE=true).
    #[arg(long)]
    idle: bool,
    /// Print the README's configuration table (Markdown) and exit.
    #[arg(long, hide = true)]
    config_table: bool,
}

enum Mode {
    Help,
    Version,
    Healthcheck,
    Migrate,
    Idle,
    Serve,
}

impl Mode {
    fn log_prefix(&self) -> &'static str {
        match self {
            Mode::Help => "HELP",
            Mode::Version => "VRSN",
            Mode::Healthcheck => "HLTH",
            Mode::Migrate => "MGRT",
            Mode::Idle => "IDLE",
            Mode::Serve => "MAIN",
        }
    }
}

/// mimalloc's `mi_option_arena_eager_commit` (index 4 in both mimalloc 2 and 3 that
/// `libmimalloc-sys` builds).
const MI_OPTION_ARENA_EAGER_COMMIT: std::os::raw::c_int = 4;

extern "C" {
    /// mimalloc's C API (the library `mimalloc` links).
    fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
    fn getenv(name: *const std::os::raw::c_char) -> *const std::os::raw::c_char;
}

/// Commit arena memory on demand rather than eagerly, unless `MIMALLOC_ARENA_EAGER_COMMIT` says
/// otherwise: with eager commit the server's resident memory under a backlog was 134 MB against
/// 89 MB without, at the same speed (`../shared/sidebyside`, scenario `none`, 20,000 events).
/// Runs as an early constructor, before the first allocation reserves mimalloc's first arena
/// (setting it in `main` is too late), so it allocates nothing itself.
extern "C" fn tune_allocator() {
    // SAFETY: `getenv` reads the environment with a NUL-terminated name and allocates nothing;
    // `mi_option_set` sets one of mimalloc's option values (no pointers).
    unsafe {
        if getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() {
            mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        }
    }
}

#[used]
#[link_section = ".init_array.00100"]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

fn main() {
    // `plugin-server plugin run|check …`: the plugin dev loop, with arguments of its own.
    if std::env::args().nth(1).as_deref() == Some("plugin") {
        std::process::exit(plugin_server::plugins::dev::main(std::env::args().skip(2).collect()));
    }
    // The reference looks for its flags anywhere (`argv.includes`) and ignores everything else:
    // hand clap only the arguments it knows, so a stray argument never hides a later flag.
    const KNOWN: &[&str] =
        &["-h", "--help", "-v", "--version", "--healthcheck", "--migrate", "--idle", "--config-table"];
    let args = std::env::args().take(1).chain(std::env::args().skip(1).filter(|arg| KNOWN.contains(&arg.as_str())));
    let cli = Cli::parse_from(args);
    let code = match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("{error:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let node_env = NodeEnv::from_process();
    if cli.config_table {
        print!("{}", plugin_server::config::markdown_table());
        return Ok(0);
    }
    if cli.help || cli.version {
        let mode = if cli.help { Mode::Help } else { Mode::Version };
        println!("[{}] ⚡ @posthog/plugin-server v{VERSION}", mode.log_prefix());
        if cli.help {
            println!("[HELP] ⚙️ Supported configuration environment variables:\n{}", format_help(node_env));
        }
        return Ok(0);
    }
    // A bad value stops here with one line naming the variable and the value.
    let config = Config::from_env()?;
    let mode = if cli.healthcheck {
        Mode::Healthcheck
    } else if cli.migrate {
        Mode::Migrate
    } else if cli.idle || config.PLUGIN_SERVER_IDLE {
        Mode::Idle
    } else {
        Mode::Serve
    };
    logging::init(config.LOG_LEVEL, mode.log_prefix());
    info!("⚡ @posthog/plugin-server v{VERSION}");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("plugin-server-main").build()?;
    runtime.block_on(async move {
        match mode {
            Mode::Healthcheck => Ok(run_healthcheck(&config).await),
            Mode::Migrate => Ok(run_migrate(&config).await),
            Mode::Idle => {
                let shutdown = CancellationToken::new();
                lifecycle::handle_signals(shutdown.clone())?;
                server::run_idle(shutdown).await;
                Ok(0)
            }
            Mode::Serve => {
                let shutdown = CancellationToken::new();
                lifecycle::handle_signals(shutdown.clone())?;
                match server::run(config, shutdown).await {
                    Ok(()) => Ok(0),
                    Err(error) => {
                        error!("💥 Launchpad failure! {error}");
                        eprintln!("plugin-server: {error}");
                        Ok(1)
                    }
                }
            }
            Mode::Help | Mode::Version => Ok(0),
        }
    })
}

async fn run_healthcheck(config: &Config) -> i32 {
    let status = healthcheck(config).await;
    match &status {
        HealthStatus::Alive(value) => println!("[HLTH] 💚 Redis key {PING_KEY} found with value {value}"),
        HealthStatus::Offline => {
            println!("[HLTH] 💔 Redis key {PING_KEY} not found! Plugin server seems to be offline")
        }
        HealthStatus::Unreachable(reason) => println!("[HLTH] 💥 Could not reach Redis: {reason}"),
    }
    status.exit_code()
}

async fn run_migrate(config: &Config) -> i32 {
    match plugin_server::migrate::run(config).await {
        Ok(MigrateOutcome::NothingToMigrate) => {
            println!("[MGRT] 😔 Graphile job queues not enabled. Nothing to migrate.");
            0
        }
        Ok(MigrateOutcome::Applied(applied)) => {
            println!("[MGRT] ✅ Graphile migrations are now up to date! (applied: {applied:?})");
            0
        }
        Err(error) => {
            println!("[MGRT] 🔴 Error running migrations for Graphile Worker! {error}");
            eprintln!("plugin-server: {error}");
            1
        }
    }
}
