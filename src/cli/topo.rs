//! `tandem topo`: discover the machine (or a built-in fixture) and print its accelerators,
//! NICs, affinity matrix and pairs, as text or as the JSON named in design.md.

use super::machine::MachineArgs;
use super::topo_report::TopoReport;
#[cfg(feature = "demo")]
use crate::fixture;
use crate::prepare::vendor_cdi::{self, VendorSpecs};
use crate::sysfs::MachineRoots;
use crate::sysfs::discover;
use crate::topology::Inventory;
#[cfg(feature = "demo")]
use anyhow::Context;
use anyhow::bail;
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
    let mut tempdir = None;
    let roots = match &args.fixture {
        Some(name) => fixture_roots(name, &mut tempdir)?,
        None => args.machine.roots(),
    };
    let inventory = discover(&roots)?;
    let report = TopoReport::new(&inventory);
    let mut vendor_dirs = args.vendor_cdi_dirs.clone();
    vendor_dirs.retain(|d| !d.as_os_str().is_empty());
    if let Some(name) = &args.fixture {
        vendor_dirs.extend(fixture_vendor_dir(name, &inventory, &roots)?);
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

/// A built-in fixture written to a temporary tree (kept alive in `tempdir`), read back
/// through the same discovery code the real machine goes through.
#[cfg(feature = "demo")]
fn fixture_roots(
    name: &str,
    tempdir: &mut Option<tempfile::TempDir>,
) -> anyhow::Result<MachineRoots> {
    let Some(description) = fixture::builtin(name) else {
        bail!(
            "unknown fixture {name:?}; built-in fixtures: {}",
            fixture::builtin_names().join(", ")
        );
    };
    let dir = tempdir.insert(anyhow::Context::context(
        fixture::scratch_dir(),
        "creating a temporary directory",
    )?);
    fixture::write_machine(&description, dir.path())
        .with_context(|| format!("writing fixture {name}"))
}

/// The fixture's vendor CDI spec directory, beside its sys/, proc/ and dev/ as /etc/cdi is
/// beside them on a node, when the fixture carries one.
#[cfg(feature = "demo")]
fn fixture_vendor_dir(
    name: &str,
    inventory: &Inventory,
    roots: &MachineRoots,
) -> anyhow::Result<Option<std::path::PathBuf>> {
    let dir = roots.sys.with_file_name("etc").join("cdi");
    let written = fixture::write_builtin_vendor_spec(name, inventory, &dir)
        .with_context(|| format!("writing the vendor CDI spec of fixture {name}"))?;
    Ok(written.then_some(dir))
}

#[cfg(not(feature = "demo"))]
fn fixture_roots(name: &str, _: &mut Option<tempfile::TempDir>) -> anyhow::Result<MachineRoots> {
    bail!(
        "--fixture {name}: this build has no built-in fixtures (built without the `demo` feature)"
    )
}

#[cfg(not(feature = "demo"))]
fn fixture_vendor_dir(
    _: &str,
    _: &Inventory,
    _: &MachineRoots,
) -> anyhow::Result<Option<std::path::PathBuf>> {
    Ok(None)
}
