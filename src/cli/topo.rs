//! `tandem topo`: discover the machine (or a built-in fixture) and print its accelerators,
//! NICs, affinity matrix and pairs, as text or as the JSON named in design.md.

use super::machine::MachineArgs;
use crate::fixture;
use crate::prepare::vendor_cdi::{self, VendorSpecs};
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
    /// Also show which GPUs the vendor CDI specs in these directories have a device for
    /// (e.g. `/etc/cdi,/var/run/cdi`); a fixture that carries a vendor spec shows its own.
    #[arg(long, value_delimiter = ',')]
    pub vendor_cdi_dirs: Vec<std::path::PathBuf>,
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
    let mut vendor_dirs = args.vendor_cdi_dirs.clone();
    vendor_dirs.retain(|d| !d.as_os_str().is_empty());
    if let Some(name) = &args.fixture {
        // Beside the fixture's sys/, proc/ and dev/, as /etc/cdi is beside them on a node.
        let dir = roots.sys.with_file_name("etc").join("cdi");
        if fixture::write_builtin_vendor_spec(name, &inventory, &dir)
            .with_context(|| format!("writing the vendor CDI spec of fixture {name}"))?
        {
            vendor_dirs.push(dir);
        }
    }
    // Shown only where vendor specs were asked for and found, so plain output is unchanged.
    let vendor = (!vendor_dirs.is_empty())
        .then(|| {
            let mut specs =
                VendorSpecs::new(vendor_dirs.clone(), crate::names::DEFAULT_DRIVER_NAME);
            let snapshot = specs.refresh();
            (!snapshot.specs.is_empty() || !snapshot.broken.is_empty())
                .then(|| vendor_cdi::match_inventory(&snapshot, &inventory))
        })
        .flatten();
    match args.output {
        OutputFormat::Json => {
            let mut json = serde_json::to_value(&report)?;
            if let (Some(vendor), Some(object)) = (&vendor, json.as_object_mut()) {
                object.insert("vendorCdiDevices".into(), vendor_cdi::to_json(vendor));
            }
            println!("{}", serde_json::to_string_pretty(&json)?)
        }
        OutputFormat::Text => {
            print!("{}", report.render_text());
            if let Some(vendor) = &vendor {
                println!("\nVendor CDI devices (listed before Tandem's when a GPU is prepared):");
                print!("{}", vendor_cdi::render_text(vendor));
            }
        }
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
