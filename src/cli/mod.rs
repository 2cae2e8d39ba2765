//! Command-line interface: argument parsing and dispatch to the library. Each subcommand
//! lives in its own file.

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

pub mod controller;
#[cfg(feature = "demo")]
pub mod demo;
#[cfg(feature = "demo")]
pub mod fixture;
pub mod hook;
pub mod machine;
pub mod plugin;
pub mod probe;
pub mod topo;
pub mod topo_report;

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "DRA driver for GPU + RDMA NIC pairs"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show the node's accelerators, NICs, affinity matrix and pairs.
    Topo(topo::TopoArgs),
    /// Write a fixture machine (sysfs/procfs/devfs tree) to a directory.
    #[cfg(feature = "demo")]
    Fixture(fixture::FixtureArgs),
    /// Run the node agent the kubelet talks to (registration, DRA gRPC, health).
    Plugin(Box<plugin::PluginArgs>),
    /// Run the cluster controller (device classes, fleet labels, rails; leader-elected).
    Controller(controller::ControllerArgs),
    /// Run the whole node path on a built-in fixture machine, no cluster or root needed.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// OCI runtime hooks that claim CDI specs name (attach exclusive NICs).
    Hook(hook::HookArgs),
    /// GET a path of the node plugin's endpoint over its Unix socket (exec probes).
    Probe(probe::ProbeArgs),
    /// Print version information.
    Version,
}

impl Command {
    /// Log level when RUST_LOG is unset: the long-running agents log their work; the commands
    /// a person runs at a terminal print their own output and log only what went wrong.
    pub fn default_log_level(&self) -> &'static str {
        match self {
            Command::Plugin(_) => "info",
            _ => "warn",
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Topo(args) => topo::run(args),
        #[cfg(feature = "demo")]
        Command::Fixture(args) => fixture::run(args),
        Command::Plugin(args) => plugin::run(*args),
        Command::Controller(args) => controller::run(args),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(args),
        Command::Hook(args) => hook::run(args),
        Command::Probe(args) => probe::run(args),
        Command::Version => {
            println!("tandem {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

/// Worker threads of the node agent's and the controller's runtime unless
/// `--worker-threads` says otherwise. Their work is a few RPCs and API calls at a time, and
/// file I/O runs on the blocking pool; tokio's default, one worker per CPU, would start 224
/// threads on a DGX H100 (2 x 56 cores, SMT), each with its stack and malloc arena: 2.6 MiB more
/// idle RSS than with 2, measured with TOKIO_WORKER_THREADS=224 (BENCHMARKS.md).
pub const DEFAULT_WORKER_THREADS: usize = 2;

/// The multi-threaded runtime of a long-running subcommand, with `worker_threads` workers,
/// its threads sharing one malloc arena.
pub fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    one_malloc_arena();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// glibc gives each thread that allocates an arena of its own (up to 8 per CPU), which keeps
/// what its thread freed: every blocking-pool thread a burst of calls starts adds one, and the
/// pool starts up to one per call in flight. One arena, before any thread starts, bounds that:
/// 0.7 MiB of anonymous growth over 10,000 prepare/unprepare cycles instead of 1.5-2.3 MiB
/// (BENCHMARKS.md); the threads' own caches (tcache) keep most allocations off its lock.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of glibc's allocator; called before the runtime
    // starts its threads, and a refusal (return 0) leaves the default in place.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

/// A thread-count flag: a whole number above zero.
pub fn parse_thread_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("the thread count must be above zero".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{text:?} is not a thread count: {e}")),
    }
}

/// A duration flag: `30s`, `2m`, `500ms`, `1h30m` (humantime's units), or plain seconds;
/// never zero, since every duration flag is a period or a timeout.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse()
            .map(Duration::from_secs)
            .map_err(|e| format!("{text:?}: {e}"))?
    } else {
        humantime::parse_duration(text)
            .map_err(|e| format!("{text:?} is not a duration like 30s, 2m or 500ms: {e}"))?
    };
    if duration.is_zero() {
        return Err(format!("duration {text:?} must be above zero"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_are_whole_numbers_above_zero() {
        assert_eq!(parse_thread_count("2"), Ok(2));
        assert_eq!(parse_thread_count(" 16 "), Ok(16));
        assert!(parse_thread_count("0").unwrap_err().contains("above zero"));
        assert!(parse_thread_count("two").unwrap_err().contains("\"two\""));
        assert!(parse_thread_count("-1").is_err());
    }

    #[test]
    fn durations_parse_with_units_or_as_seconds() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
    }
}
