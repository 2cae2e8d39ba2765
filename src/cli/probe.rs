//! `tandem probe`: the kubelet's exec probe of the node plugin. It asks this pod's own plugin
//! instance over the Unix socket in the pod's emptyDir, because the TCP port is shared with
//! the other pod on the node during a rolling update and would answer for either of them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::parse_duration;
use crate::metrics_http;

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// The plugin's Unix socket (an `unix:` entry of its `--metrics-addr`).
    #[arg(long)]
    pub socket: PathBuf,
    /// Give up after this long (keep it below the probe's timeoutSeconds, so the reason is
    /// printed before the kubelet kills the command).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The path to GET, e.g. `/readyz` or `/healthz`.
    pub path: String,
}

/// Prints the body; succeeds on HTTP 200 only.
pub fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let answer = runtime.block_on(metrics_http::get_unix(
        &args.socket,
        &args.path,
        args.timeout,
    ))?;
    print!("{}", answer.body);
    if answer.status != 200 {
        bail!(
            "GET {} on {} answered HTTP {}",
            args.path,
            args.socket.display(),
            answer.status
        );
    }
    Ok(())
}
