//! `tandem topo`: discover the machine (or a built-in fixture) and print its accelerators,
//! NICs, affinity matrix and pairs, as text or as the JSON named in design.md.

use super::machine::MachineArgs;
use crate::fixture;
use crate::sysfs::discover;
use crate::topology::report::TopoReport;
use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct TopoArgs {
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Read a built-in fixture machine instead of the real one (see `tandem fixture --list`).
    #[arg(long, conflicts_with_all = ["sysfs_root", "proc_root", "dev_root"])]
    pub fixture: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: OutputFormat,
}

/// Exit status of `tandem topo` when the machine has accelerators that discovery found but
/// could not place (an unknown sysfs path shape, an unreadable identity): the report is
/// printed, but it does not describe the whole machine.
pub const EXIT_LOST_ACCELERATORS: i32 = 3;

pub fn run(args: TopoArgs) -> anyhow::Result<()> {
    // A fixture is written to a temporary tree and read back through the same discovery code
    // the real machine goes through.
    let tempdir;
    let roots = match &args.fixture {
        Some(name) => {
            let Some(description) = fixture::builtin(name) else {
                bail!(
                    "unknown fixture {name:?}; built-in fixtures: {}",
                    fixture::builtin_names().join(", ")
                );
            };
            tempdir = fixture::scratch_dir().context("creating a temporary directory")?;
            fixture::write_machine(&description, tempdir.path())
                .with_context(|| format!("writing fixture {name}"))?
        }
        None => args.machine.roots(),
    };
    let inventory = discover(&roots)?;
    let report = TopoReport::new(&inventory);
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Text => print!("{}", report.render_text()),
    }
    if report.lost_accelerators > 0 {
        use std::io::Write as _;
        std::io::stdout().flush()?;
        eprintln!(
            "tandem topo: {} accelerator(s) found but not placed; see problems",
            report.lost_accelerators
        );
        std::process::exit(EXIT_LOST_ACCELERATORS);
    }
    Ok(())
}
